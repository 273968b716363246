"""Pretrained checkpoints straight into shards: bit-exact weights, DDP's first step, replicas checked.

Tiny GPT-2 (tied embedding / LM head, one safetensors file) and Llama (untied, rotary buffers, a sharded
safetensors index) are written with save_pretrained and loaded on 4 gloo ranks at p = 1, 2 and 4 by each path:
`mics_hf.from_pretrained`, a deferred `AutoModelForCausalLM.from_pretrained` (what stock scripts call under
--mics) through `MiCSAccelerator.prepare_model`'s path, and a CPU model sharded then moved. References: the
files themselves (the gathered weights must equal them bit for bit) and DDP started from the same file in
float64 (one SGD step within 1e-10).
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import mics_hf
from distributed import RankError
from mics_hf.checkpoint.files import CheckpointError
from mics_hf.checkpoint.pretrained import PretrainedWeights
from mics_hf.integrations.pretrained import defer_from_pretrained, pending_checkpoint, shard_pretrained
from models import VOCAB, tiny_gpt2

WORLD = 4


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
    )
    return LlamaForCausalLM(cfg).float()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pretrained")
    gpt2, llama = root / "gpt2", root / "llama"
    tiny_gpt2(seed=3).save_pretrained(gpt2)
    tiny_llama(seed=4).save_pretrained(llama, max_shard_size="40KB")  # several files and an index
    assert (llama / "model.safetensors.index.json").is_file() and (gpt2 / "model.safetensors").is_file()
    return {"gpt2": gpt2, "llama": llama}


def file_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# ---- rank functions ---------------------------------------------------------------------------------------
def _load(path: str, p: int, how: str, dtype: torch.dtype | None) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*newly initialised")  # every weight must come from the file
        return _load_by(path, p, how, dtype)


def _load_by(path: str, p: int, how: str, dtype: torch.dtype | None) -> torch.nn.Module:
    config = mics_hf.MiCSConfig(partition_size=p, devices_per_node=2)
    if how == "from_pretrained":
        return mics_hf.from_pretrained(AutoModelForCausalLM, path, config, dtype=dtype)
    if how == "deferred":  # a stock script's call under --mics, then prepare()
        with defer_from_pretrained():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        assert pending_checkpoint(model) is not None and next(model.parameters()).is_meta
        with pytest.raises(RuntimeError, match="pass it to the MiCSTrainer"):
            model(torch.zeros(1, 2, dtype=torch.long))
        return shard_pretrained(model, config)
    if how == "cpu_then_shard":  # transformers' own loader on CPU, then shard (what prepare() does with it)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return mics_hf.shard_model(model, config, device="cpu")
    raise AssertionError(how)


def _gathered_equals_file(rank, world, path, p, how):
    model = _load(path, p, how, None)
    full = mics_hf.full_state_dict(model, rank0_only=False)
    saved = file_tensors(Path(path))
    assert not model.training, "from_pretrained returns the model in eval mode, as transformers does"
    mismatched = [k for k, v in saved.items() if not torch.equal(full[k], v)]
    missing = sorted(set(saved) - set(full))
    extra = sorted(set(full) - set(saved))
    # the only key not in the file may be the LM head tied to the embedding (the file keeps one name)
    untied = [k for k in extra if not (k == "lm_head.weight" and model.lm_head.weight is model.get_input_embeddings().weight)]
    return mismatched, missing, untied


def _one_step(model: torch.nn.Module, ids: torch.Tensor) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()


def _step_matches_ddp(rank, world, path, p, how):
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, VOCAB, (world, 2, 10), generator=g)[rank]
    model = _load(path, p, how, torch.float64)
    _one_step(model, ids)
    ours = mics_hf.full_state_dict(model, rank0_only=False)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    ddp = torch.nn.parallel.DistributedDataParallel(ref)
    _one_step(ddp, ids)
    ref_state = ref.state_dict()
    return max(float((ours[k] - v).abs().max() / v.abs().max().clamp_min(1e-30)) for k, v in ref_state.items() if v.is_floating_point())


# ---- tests ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("p", [1, 2, 4])
@pytest.mark.parametrize("how", ["from_pretrained", "deferred", "cpu_then_shard"])
def test_gathered_weights_equal_the_file_bit_for_bit(pools, checkpoints, name, p, how):
    for mismatched, missing, extra in pools(WORLD).run(_gathered_equals_file, str(checkpoints[name]), p, how):
        assert mismatched == [] and missing == [] and extra == []


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("p", [1, 2, 4])
def test_first_step_matches_ddp_from_the_same_file(pools, checkpoints, name, p):
    how = {1: "from_pretrained", 2: "deferred", 4: "from_pretrained"}[p]
    for err in pools(WORLD).run(_step_matches_ddp, str(checkpoints[name]), p, how):
        assert err < 1e-10


def _different_seeds(rank, world, p):
    model = tiny_gpt2(seed=rank // 2)  # ranks 0, 1 and 2, 3 differ: the replicas of every shard differ at p < 4
    mics_hf.shard_model(model, mics_hf.MiCSConfig(partition_size=p, devices_per_node=2))


@pytest.mark.parametrize("p", [1, 2])
def test_replicas_built_differently_are_an_error_naming_the_parameter(pools, p):
    with pytest.raises(RankError) as info:
        pools(WORLD).run(_different_seeds, p)
    assert len(info.value.errors) == WORLD  # every rank raises: none is left waiting
    for error in info.value.errors.values():
        assert re.search(r"the replicas of 'transformer\.h\.0\.[\w.]+' differ between ranks", error) and "seed identically" in error, error


def test_a_base_checkpoint_loads_under_a_model_with_a_head(pools, checkpoints, tmp_path):
    base = tmp_path / "base"
    GPT2LMHeadModel.from_pretrained(checkpoints["gpt2"]).transformer.save_pretrained(base)
    full = pools(WORLD).run(_gathered_equals_file_under_head, str(base), str(checkpoints["gpt2"]))[0]
    assert full


def _gathered_equals_file_under_head(rank, world, base, original):
    model = mics_hf.from_pretrained(GPT2LMHeadModel, base, mics_hf.MiCSConfig(partition_size=2, devices_per_node=2))
    full = mics_hf.full_state_dict(model, rank0_only=False)
    saved = load_file(Path(original) / "model.safetensors")
    return all(torch.equal(full[k], v) for k, v in saved.items())


# ---- hostile or unusual checkpoints (world of one: no collectives needed to refuse them) ---------------------
def test_pickled_checkpoint_is_refused_with_the_way_out(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_gpt2().config.to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="unpickling can run code"):
        mics_hf.from_pretrained(GPT2LMHeadModel, tmp_path)


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/etc/passwd", "sub/dir.safetensors"])
def test_index_naming_a_file_outside_the_directory_is_refused(checkpoints, tmp_path, entry):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in checkpoints["llama"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = entry
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a plain file name"):
        PretrainedWeights(bad)


def test_damaged_safetensors_file_is_refused(checkpoints, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in checkpoints["gpt2"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:8] + b"{" + data[9:200])
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        mics_hf.from_pretrained(GPT2LMHeadModel, bad)


def test_shape_mismatch_names_the_tensor(checkpoints):
    config = copy.deepcopy(GPT2LMHeadModel.from_pretrained(checkpoints["gpt2"]).config)
    config.vocab_size = VOCAB + 3  # e.g. a resized tokenizer
    with pytest.raises(CheckpointError, match="wte.weight.*has shape"):
        mics_hf.from_pretrained(GPT2LMHeadModel, checkpoints["gpt2"], config=config)


def test_a_new_head_is_initialised_with_a_warning(checkpoints):
    from transformers import GPT2ForSequenceClassification

    with pytest.warns(UserWarning, match="newly initialised.*score.weight"):
        model = mics_hf.from_pretrained(GPT2ForSequenceClassification, checkpoints["gpt2"], num_labels=3, pad_token_id=0)
    assert mics_hf.full_state_dict(model)["score.weight"].abs().sum() > 0


# ---- PEFT on a base read into the shards ---------------------------------------------------------------------
def _lora(base: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(21)  # the adapter's A is drawn at random: the same seed on every rank and in the reference
    return get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], lora_dropout=0.0, fan_in_fan_out=True))


def _peft_on_deferred_base(rank, world, path, p):
    g = torch.Generator().manual_seed(13)
    ids = torch.randint(0, VOCAB, (world, 2, 10), generator=g)[rank]
    with defer_from_pretrained():
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    model = shard_pretrained(_lora(base), mics_hf.MiCSConfig(partition_size=p, devices_per_node=2))
    start = mics_hf.full_state_dict(model, rank0_only=False)
    ref = _lora(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64))
    # The adapter's A is a fresh random draw on the sharded side (PEFT drew it on a meta base, where values are
    # lost); B starts at zero either way, so the model starts as the pretrained one. DDP starts from the same A.
    assert all(not v.any() for k, v in start.items() if "lora_B" in k)
    base_ok = all(torch.equal(start[k], v) for k, v in ref.state_dict().items() if "lora_" not in k)
    ref.load_state_dict(start)
    _one_step(model, ids)
    ours = mics_hf.full_state_dict(model, rank0_only=False)
    _one_step(torch.nn.parallel.DistributedDataParallel(ref), ids)
    errs = {k: float((ours[k] - v).abs().max() / v.abs().max().clamp_min(1e-30)) for k, v in ref.state_dict().items()}
    moved = float((ours["base_model.model.transformer.h.0.attn.c_attn.lora_B.default.weight"]).abs().max())
    return max(errs.values()), moved, base_ok


@pytest.mark.parametrize("p", [2, 4])
def test_lora_on_a_base_read_into_shards_matches_ddp(pools, checkpoints, p):
    for err, moved, base_ok in pools(WORLD).run(_peft_on_deferred_base, str(checkpoints["gpt2"]), p):
        assert base_ok and err < 1e-10 and moved > 0  # B starts at zero (PEFT's init) and one step moves it


def test_a_hub_cache_snapshot_loads_through_its_links(checkpoints, tmp_path):
    """A model name resolves to the Hub cache's snapshot, whose files are symbolic links to content-addressed
    blobs (the layout huggingface_hub writes); offline, nothing is downloaded."""
    import hashlib
    import os

    repo = tmp_path / "hub" / "models--local--tiny-gpt2"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in checkpoints["gpt2"].iterdir():
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
    model = mics_hf.from_pretrained(GPT2LMHeadModel, "local/tiny-gpt2", cache_dir=str(tmp_path / "hub"), local_files_only=True)
    saved = load_file(checkpoints["gpt2"] / "model.safetensors")
    full = mics_hf.full_state_dict(model)
    assert all(torch.equal(full[k], v) for k, v in saved.items())
