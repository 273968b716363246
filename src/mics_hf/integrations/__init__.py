"""Integrations with Accelerate and the Hugging Face Trainer; the engine never imports these."""
