"""Model presets: parameter counts against the paper's table, validation messages, real tiny models."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from mics_hf.planning.flops import model_state_bytes_per_rank
from mics_hf.planning.presets import PRESETS, ModelPreset, build_config, count_parameters, get_preset, model_class


def test_gpt_175b_counts_on_meta_quickly():
    start = time.perf_counter()
    n = count_parameters(get_preset("gpt-175b"))
    elapsed = time.perf_counter() - start
    assert 170e9 < n < 180e9
    # Meta-device construction allocates nothing; a real build would need 700 GB and take minutes.
    assert elapsed < 30


@pytest.mark.parametrize(
    ("name", "table_params", "rel"),
    [
        # The table's counts are rounded to 0.1B; "~50B" and "100B" are rounder still.
        ("gpt2-10b", 10.0e9, 0.01),
        ("bert-10b", 10.1e9, 0.01),
        ("bert-15b", 15.0e9, 0.01),
        ("roberta-10b", 9.7e9, 0.01),
        ("bert-50b", 50e9, 0.02),
        ("gpt-100b", 100e9, 0.02),
    ],
)
def test_paper_presets_match_table(name, table_params, rel):
    assert count_parameters(get_preset(name)) == pytest.approx(table_params, rel=rel)


def test_gpt_175b_state_bytes_per_rank_at_p64():
    n = count_parameters(get_preset("gpt-175b"))
    per_rank = model_state_bytes_per_rank(n, 64)
    # 16 bytes/param over 64 ranks = n / 4 bytes: ~43.7 GB, more than half an A100 40GB before activations.
    assert per_rank == n * 16 / 64 == n / 4
    assert 42.5e9 < per_rank < 45e9


@pytest.mark.parametrize("name", ["tiny", "tiny-bert"])
def test_meta_count_equals_real_model_count(name):
    preset = get_preset(name)
    model = model_class(preset)(build_config(preset))
    assert count_parameters(preset) == sum(p.numel() for p in model.parameters())


def test_tiny_gpt_runs_forward_on_cpu():
    preset = get_preset("tiny")
    config = build_config(preset)
    assert (config.n_embd, config.n_layer, config.n_head, config.n_inner) == (64, 2, 4, 256)
    assert (config.vocab_size, config.n_positions) == (512, 128)
    assert config.eos_token_id < config.vocab_size
    torch.manual_seed(0)
    model = model_class(preset)(config)
    ids = torch.randint(0, preset.vocab, (2, preset.seq))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, preset.seq, preset.vocab)
    assert torch.isfinite(out.loss)
    # Tied LM head: one tensor, counted once.
    assert model.lm_head.weight is model.transformer.wte.weight


def test_tiny_bert_runs_forward_on_cpu_at_full_seq():
    preset = get_preset("tiny-bert")
    config = build_config(preset)
    assert config.max_position_embeddings == preset.seq + 2
    assert config.type_vocab_size == 1
    torch.manual_seed(0)
    model = model_class(preset)(config)
    # A full-length sequence uses position ids up to seq + 1 (RoBERTa offsets by padding_idx + 1).
    ids = torch.randint(3, preset.vocab, (2, preset.seq))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, preset.seq, preset.vocab)
    assert torch.isfinite(out.loss)


def test_family_override_and_field_overrides():
    bert = get_preset("small", family="bert")
    assert bert.family == "bert" and bert.hidden == PRESETS["small-bert"].hidden
    assert model_class(bert).__name__ == "RobertaPreLayerNormForMaskedLM"
    shallow = get_preset("gpt2-10b", layers=2, seq=64)
    assert (shallow.layers, shallow.seq, shallow.hidden) == (2, 64, 5120)
    assert "overridden: layers=2, seq=64" in shallow.note
    assert get_preset("tiny") is PRESETS["tiny"]


def test_presets_are_frozen_and_named_consistently():
    for name, preset in PRESETS.items():
        assert preset.name == name and preset.note
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["tiny"].hidden = 128  # type: ignore[misc]


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown preset 'gpt-3'.*'gpt-175b'.*'tiny'"):
        get_preset("gpt-3")


def test_unknown_override_lists_fields():
    with pytest.raises(ValueError, match=r"\['hiden'\].*valid fields: \['name', 'family', 'hidden'"):
        get_preset("tiny", hiden=128)


def test_bad_head_count_suggests_divisors():
    with pytest.raises(ValueError, match=r"hidden=64 is not divisible by heads=5.*\[1, 2, 4, 8, 16, 32, 64\]"):
        get_preset("tiny", heads=5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"family": "t5"}, r"family='t5'; use one of \['bert', 'gpt'\]"),
        ({"layers": 0}, "layers=0; must be a positive integer"),
        ({"seq": 12.5}, "seq=12.5; must be a positive integer"),
        ({"heads": True}, "heads=True; must be a positive integer"),
    ],
)
def test_bad_fields_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        get_preset("tiny", **overrides)


def test_bert_vocab_must_hold_special_tokens():
    with pytest.raises(ValueError, match="vocab >= 3"):
        ModelPreset(name="x", family="bert", hidden=8, layers=1, heads=2, ffn=8, vocab=2, seq=4, micro_batch=1)
