"""Tiny Hugging Face models and deterministic data for the parity tests (odd sizes on purpose: padding)."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

VOCAB = 97  # odd: the tied embedding / LM head needs padding for every p > 1


def tiny_gpt2(*, seed: int = 0, n_layer: int = 2, n_embd: int = 36, vocab: int = VOCAB) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab, n_positions=32, n_embd=n_embd, n_layer=n_layer, n_head=3, n_inner=None,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).float()


def tiny_bert(*, seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=50,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        tie_word_embeddings=True, pad_token_id=0,
    )
    return BertForMaskedLM(cfg).float()


def global_batches(*, steps: int, accum: int, world: int, micro: int, seq: int = 12, seed: int = 1) -> torch.Tensor:
    """Token ids shaped (steps, accum, world, micro, seq): rank r's micro-batch m of step s is [s, m, r]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (steps, accum, world, micro, seq), generator=g)
