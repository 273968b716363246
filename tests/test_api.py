"""The sharded model stays the user's model: class, config, HF methods, eval and generation all keep working."""

from __future__ import annotations

import copy

import torch
from transformers import GPT2LMHeadModel

import mics_hf
from models import global_batches, tiny_gpt2


def _api_checks(rank: int, world: int) -> dict:
    ref = tiny_gpt2()
    net = mics_hf.shard_model(copy.deepcopy(ref), mics_hf.MiCSConfig(partition_size=2, devices_per_node=2))
    out = {
        "isinstance": isinstance(net, GPT2LMHeadModel) and isinstance(net, mics_hf.MiCSModule),
        "config": net.config.n_embd == ref.config.n_embd,
        "accelerate_mark": getattr(net, "_is_accelerate_prepared", False),
        "sharded": mics_hf.is_sharded(net),
        "shard_numel": sum(p.numel() for p in net.parameters()),
        "full_numel": sum(p.numel() for p in ref.parameters()),
    }
    net.gradient_checkpointing_enable()
    out["checkpointing"] = net.is_gradient_checkpointing
    net.gradient_checkpointing_disable()
    ids = global_batches(steps=1, accum=1, world=1, micro=2)[0, 0, 0]
    net.eval(); ref.eval()
    with torch.no_grad():
        out["eval_logits"] = (net(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max().item()
    gen = net.generate(ids[:1, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref_gen = ref.generate(ids[:1, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
    out["generate_equal"] = torch.equal(gen, ref_gen)
    # nothing stays gathered after inference
    state = mics_hf.engine.shard.get_state(net)
    out["gathered_after_eval"] = sum(sp.unsharded.untyped_storage().size() > 0 for _, g in state.units for sp in g.params)
    return out


def test_model_keeps_its_identity_and_hf_behaviour(pools):
    for r in pools(4).run(_api_checks):
        assert r["isinstance"] and r["config"] and r["accelerate_mark"] and r["sharded"], r
        assert r["checkpointing"], r
        assert r["shard_numel"] < r["full_numel"], r  # parameters() are the local shards
        assert r["eval_logits"] <= 1e-5 and r["generate_equal"], r
        assert r["gathered_after_eval"] == 0, r


def _shard_sizes(rank: int, world: int) -> list[int]:
    net = mics_hf.shard_model(tiny_gpt2(), mics_hf.MiCSConfig(partition_size=4, devices_per_node=2))
    return [p.numel() for p in net.parameters()]


def test_shards_partition_every_parameter_exactly(pools):
    """Across a partition group the local shards add up to each full parameter (padding never stored)."""
    sizes = pools(4).run(_shard_sizes)
    ref = tiny_gpt2()
    full = [p.numel() for p in ref.parameters()]
    assert [sum(col) for col in zip(*sizes)] == full


def _group_timeouts(rank: int, world: int) -> list[float]:
    net = mics_hf.shard_model(tiny_gpt2(), mics_hf.MiCSConfig(partition_size=2, devices_per_node=2))
    groups = mics_hf.engine.shard.get_state(net).units[-1][1].groups
    return [g.pg._get_backend(torch.device("cpu")).options._timeout.total_seconds() for g in (groups.partition, groups.replication)]


def test_process_groups_inherit_the_world_timeout(pools):
    """A dead rank must fail collectives after the user's timeout (120 s in the test pool), not gloo's 30 min."""
    for timeouts in pools(4).run(_group_timeouts):
        assert timeouts == [120.0, 120.0]


def test_default_units_are_the_transformer_layers_for_both_families():
    """RobertaPreLayerNorm's _no_split_modules names attention and embeddings only; the default must still pick
    whole layers, so no FFN weight ends up in the root unit (gathered for the whole step)."""
    from mics_hf.planning.presets import build_config, get_preset, model_class
    from mics_hf.engine.shard import get_state

    for name, layer in (("tiny", "GPT2Block"), ("tiny-bert", "RobertaPreLayerNormLayer")):
        preset = get_preset(name)
        model = mics_hf.shard_model(model_class(preset)(build_config(preset)))
        units = get_state(model).units
        kinds = [type(module).__name__ for module, _ in units]
        assert kinds[:-1] == [layer] * preset.layers, kinds
        root = units[-1][1]
        assert root.segment_numel < units[0][1].segment_numel, "the root holds more than one layer's parameters"
