"""Shared pieces of the pretraining recipes: data, tokenizers and batches (see ``data.py``)."""
