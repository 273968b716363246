"""A sharded model still behaves as the user's HF model: save_pretrained writes full weights, PEFT saves its
adapter, generate() decodes in lockstep. References: the unsharded model (same weights, same greedy tokens),
the gathered weights, and transformers / peft loading what was written.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

import mics_hf
from distributed import DistPool, RankError
from models import VOCAB, tiny_gpt2

WORLD = 4


def _sharded(p: int, seed: int = 0) -> torch.nn.Module:
    return mics_hf.shard_model(tiny_gpt2(seed=seed), mics_hf.MiCSConfig(partition_size=p, devices_per_node=2))


# ---- save_pretrained ------------------------------------------------------------------------------------
def _save_the_usual_way(rank, world, out, p):
    model = _sharded(p)
    model.save_pretrained(out)  # on every rank, as after accelerator.unwrap_model(model)
    full = mics_hf.full_state_dict(model)
    if rank == 0:
        loaded = GPT2LMHeadModel.from_pretrained(out)  # a size mismatch would raise here
        return all(torch.equal(loaded.state_dict()[k], v) for k, v in full.items())
    return not any(Path(out).glob("*.tmp*"))


@pytest.mark.parametrize("p", [2, 4])
def test_save_pretrained_of_a_sharded_model_writes_full_weights(pools, tmp_path, p):
    assert all(pools(WORLD).run(_save_the_usual_way, str(tmp_path / "out"), p))


def _save_with_local_state_dict(rank, world, out):
    model = _sharded(2)
    model.save_pretrained(out, state_dict=model.state_dict())


def test_save_pretrained_with_shards_as_state_dict_is_refused(pools, tmp_path):
    with pytest.raises(RankError) as info:
        pools(WORLD).run(_save_with_local_state_dict, str(tmp_path / "out"))
    assert "accelerator.get_state_dict(model)" in info.value.errors[0]
    assert not (tmp_path / "out" / "model.safetensors").exists()


def _save_on_rank0_only(rank, world, out):
    from mics_hf.checkpoint import hf_save

    hf_save.JOIN_TIMEOUT_S = 2.0
    model = _sharded(2)
    if rank == 0:
        model.save_pretrained(out)  # the mistake: the others never join the gather
    return "done"


def test_save_pretrained_on_one_rank_is_an_error_not_a_hang(tmp_path):
    with DistPool(WORLD) as pool, pytest.raises(RankError) as info:  # its own ranks: this one's are left out of step
        pool.run(_save_on_rank0_only, str(tmp_path / "out"))
    assert list(info.value.errors) == [0] and "call it on every rank" in info.value.errors[0]


# ---- PEFT: the adapter, saved the PEFT way ---------------------------------------------------------------
def _lora_gpt2():
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny_gpt2(seed=2), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], lora_dropout=0.0,
                                                         fan_in_fan_out=True, init_lora_weights=False))


def _peft_adapter_save(rank, world, out, p):
    model = mics_hf.shard_model(_lora_gpt2(), mics_hf.MiCSConfig(partition_size=p, devices_per_node=2))
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(rank))
    opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.1)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.save_pretrained(out)
    full = mics_hf.full_state_dict(model)
    if rank != 0:
        return True
    from peft import PeftModel

    saved = load_file(Path(out) / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved), sorted(saved)  # the adapter only, never the base
    reloaded = PeftModel.from_pretrained(tiny_gpt2(seed=2), out)
    ref = reloaded.state_dict()
    return all(torch.equal(ref[k], v) for k, v in full.items() if "lora_" in k)


def _peft_export_merged(rank, world, out):
    model = mics_hf.shard_model(_lora_gpt2(), mics_hf.MiCSConfig(partition_size=2, devices_per_node=2))
    mics_hf.save_pretrained(model, out)  # an export: one model, adapters merged
    full = mics_hf.full_state_dict(model)
    if rank != 0:
        return True
    from peft import set_peft_model_state_dict  # noqa: F401  (the reference merges with PEFT on one process)

    ref = _lora_gpt2()
    ref.load_state_dict(full)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    merged = GPT2LMHeadModel.from_pretrained(out)
    assert not any("lora" in k for k in load_file(Path(out) / "model.safetensors"))
    with torch.no_grad():
        return torch.allclose(merged(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)


def test_peft_export_merges_the_adapter(pools, tmp_path):
    assert all(pools(WORLD).run(_peft_export_merged, str(tmp_path / "merged")))


@pytest.mark.parametrize("p", [2, 4])
def test_peft_save_pretrained_writes_the_full_adapter(pools, tmp_path, p):
    assert all(pools(WORLD).run(_peft_adapter_save, str(tmp_path / "adapter"), p))


# ---- generate ---------------------------------------------------------------------------------------------
def _generate(rank, world, p, keep):
    model = _sharded(p, seed=5)
    ref = tiny_gpt2(seed=5).eval()
    prompt = torch.randint(1, VOCAB, (1, 2 + rank), generator=torch.Generator().manual_seed(rank))  # lengths differ
    n = 2 + 3 * rank  # and so do the numbers of new tokens: ranks finish at different steps
    stats = mics_hf.comm_stats(model)
    stats.reset()
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0, mics_keep_gathered=keep)
        want = ref.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0)
    gathers = sum(v for (op, _), v in stats.calls.items() if "all_gather" in op)
    units = len(mics_hf.engine.shard.get_state(model).units)
    return torch.equal(out, want), gathers, units


@pytest.mark.parametrize("p", [2, 4])
def test_generate_with_different_lengths_per_rank_matches_the_unsharded_model(pools, p):
    results = pools(WORLD).run(_generate, p, None)
    assert all(same for same, _, _ in results)
    for _, gathers, units in results:  # units gathered once for the whole call, not once per token
        assert gathers <= 2 * units, (gathers, units)


def test_generate_can_regather_every_step(pools):
    results = pools(WORLD).run(_generate, 2, False)
    assert all(same for same, _, _ in results)
    assert all(gathers > 2 * units for _, gathers, units in results)


def _peft_after_sharding(rank, world):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_sharded(2), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    model(torch.zeros(1, 4, dtype=torch.long))


def test_adapters_added_after_sharding_are_refused(pools):
    with pytest.raises(RankError) as info:
        pools(WORLD).run(_peft_after_sharding)
    assert all("added to the model after it was sharded" in e for e in info.value.errors.values())


def _peft_generate(rank, world, keep):
    model = mics_hf.shard_model(_lora_gpt2(), mics_hf.MiCSConfig(partition_size=2, devices_per_node=2))
    ref = _lora_gpt2().eval()
    model.eval()
    prompt = torch.randint(1, VOCAB, (1, 2 + rank), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():  # PeftModel.generate runs the wrapped model's forward, not the sharded root's
        out = model.generate(input_ids=prompt, max_new_tokens=2 + rank, do_sample=False, pad_token_id=0, mics_keep_gathered=keep)
        want = ref.generate(input_ids=prompt, max_new_tokens=2 + rank, do_sample=False, pad_token_id=0)
    return torch.equal(out, want)


@pytest.mark.parametrize("keep", [True, False])
def test_generate_of_a_peft_model(pools, keep):
    assert all(pools(WORLD).run(_peft_generate, keep))


def _export_fine_tuned_head(rank, world, pretrained, ckpt, out):
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(pretrained, num_labels=3)  # architectures: BertForMaskedLM
    mics_hf.shard_model(model, mics_hf.MiCSConfig(partition_size=2, devices_per_node=2))
    mics_hf.save_checkpoint(ckpt, model, step=1)
    full = mics_hf.full_state_dict(model)
    if rank == 0:
        mics_hf.export_checkpoint(mics_hf.latest_checkpoint(ckpt), out)
        loaded = BertForSequenceClassification.from_pretrained(out)
        return all(torch.equal(loaded.state_dict()[k], v) for k, v in full.items())
    return True


def test_export_of_a_model_fine_tuned_with_a_new_head(pools, tmp_path):
    """The exported class is the one trained, not config.json's `architectures` inherited from the base."""
    from models import tiny_bert

    torch.manual_seed(0)
    tiny_bert().save_pretrained(tmp_path / "mlm")
    assert all(pools(WORLD).run(_export_fine_tuned_head, str(tmp_path / "mlm"), str(tmp_path / "ckpt"), str(tmp_path / "out")))


def _peft_checkpoint(rank, world, ckpt):
    model = mics_hf.shard_model(_lora_gpt2(), mics_hf.MiCSConfig(partition_size=2, devices_per_node=2))
    mics_hf.save_checkpoint(ckpt, model, step=1)
    full = mics_hf.full_state_dict(model)  # every rank gathers; rank 0 keeps it
    return full if rank == 0 else None


def test_export_of_a_peft_checkpoint_merges_the_adapter(pools, tmp_path):
    """`mics-hf export` (offline, one process) of a PEFT model's checkpoint: one merged model, the adapter's
    output included; a tampered adapter config is refused."""
    import json

    full = pools(WORLD).run(_peft_checkpoint, str(tmp_path / "ckpt"))[0]
    step = mics_hf.latest_checkpoint(tmp_path / "ckpt")
    mics_hf.export_checkpoint(step, tmp_path / "out")
    ref = _lora_gpt2()
    ref.load_state_dict(full)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(GPT2LMHeadModel.from_pretrained(tmp_path / "out")(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
    (step / "adapter_config.json").write_text(json.dumps({"adapter_name": "default", "base_class": "GPT2LMHeadModel", "config": {"peft_type": "NOPE"}}))
    with pytest.raises(mics_hf.CheckpointError, match="does not describe a PEFT adapter"):
        mics_hf.export_checkpoint(step, tmp_path / "out2")
