"""Bad checkpoint input: each case gives a clear error on every rank, no hang, and nothing on disk is lost.

 1. loading a path that does not exist
 2. loading a directory that is not a checkpoint
 3. loading a root that holds only a save that never completed (.tmp-*)
 4. loading a checkpoint of another architecture (BERT into GPT-2)
 5. resuming with a different model size
 6. a truncated shard file
 7. a shard file with flipped bytes (same size: caught by CRC32)
 8. corrupted metadata JSON
 9. metadata of an unknown format version
10. a missing shard file
11. saving with a negative step
12. saving over an existing step without overwrite=True (the old one stays loadable)
13. a checkpoint root that is a regular file
14. `extra` that is not JSON (nothing is written, the previous checkpoint stays `latest`)
15. an optimizer with other param groups than the checkpoint's
16. an optimizer of another class
17. asking for optimizer state from a checkpoint saved without it
18. an optimizer built before sharding (on the full parameters)
19. resuming on a layout that cannot exist (partition size 3 on 2 ranks): refused before loading
20. keep_last=0
21. saving a model that was never sharded
22. `mics-hf export` of a checkpoint without a Hugging Face config
23. exporting onto a path that is a regular file
24. one rank fails to write (disk full): every rank raises naming that rank; `latest` still loads
25. saving from inside a backward pass
Any valid layout (any world size and partition size that shard_model accepts) can load any checkpoint: there
is no "cannot be resharded" case beyond case 19, because shards are cut by rows at load time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mics_hf
from mics_hf.checkpoint.format import CheckpointError
from models import global_batches, tiny_bert, tiny_gpt2


def _model(n_embd: int = 36):
    net = mics_hf.shard_model(tiny_gpt2(n_embd=n_embd), mics_hf.MiCSConfig(partition_size=2, devices_per_node=2))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    return net, opt


def _step(net, opt, rank, world):
    data = global_batches(steps=1, accum=1, world=world, micro=1)
    net(input_ids=data[0, 0, rank], labels=data[0, 0, rank]).loss.backward()
    opt.step()
    opt.zero_grad()


def _good_checkpoint(root: Path, rank: int, world: int):
    net, opt = _model()
    _step(net, opt, rank, world)
    return mics_hf.save_checkpoint(root, net, opt, step=1), net, opt


def _first_shard(ckpt: Path) -> Path:
    return ckpt / "shard-q0000.safetensors"


RANK0_ONLY = "single-process case: checked on rank 0"


class _Rank0Only(Exception):
    """Raised on the other ranks for cases that only one process runs; they still take part in the checks."""


def _case(rank: int, world: int, *, case: str, root: str) -> str:
    import torch.distributed as dist

    root_p = Path(root) / case
    ckpt, net, opt = _good_checkpoint(root_p, rank, world)
    before = {p.name for p in root_p.iterdir()}
    dist.barrier()

    def corrupt(fn):
        if rank == 0:
            fn()
        dist.barrier()

    try:
        if case == "missing_path":
            mics_hf.load_checkpoint(root_p / "nope", net, opt)
        elif case == "not_a_checkpoint":
            mics_hf.load_checkpoint(Path(root), net, opt)
        elif case == "only_partial_save":
            partial = Path(root) / f"{case}-partial"
            corrupt(lambda: (partial.mkdir(exist_ok=True), (partial / ".tmp-step_00000009").mkdir(exist_ok=True)))
            mics_hf.load_checkpoint(partial, net, opt)
        elif case == "other_architecture":
            other = mics_hf.shard_model(tiny_bert(), mics_hf.MiCSConfig(partition_size=2, devices_per_node=2))
            mics_hf.load_checkpoint(ckpt, other)
        elif case == "other_size":
            bigger, bigger_opt = _model(n_embd=48)
            mics_hf.load_checkpoint(ckpt, bigger, bigger_opt)
        elif case == "truncated_file":
            corrupt(lambda: _first_shard(ckpt).write_bytes(_first_shard(ckpt).read_bytes()[:-100]))
            mics_hf.load_checkpoint(ckpt, net, opt)
        elif case == "flipped_bytes":
            def flip():
                data = bytearray(_first_shard(ckpt).read_bytes())
                data[-50] ^= 0xFF
                _first_shard(ckpt).write_bytes(bytes(data))
            corrupt(flip)
            mics_hf.load_checkpoint(ckpt, net, opt)
        elif case == "corrupted_metadata":
            corrupt(lambda: (ckpt / "mics_checkpoint.json").write_text('{"format": "mics_hf-checkp'))
            mics_hf.load_checkpoint(ckpt, net, opt)
        elif case == "future_version":
            def bump():
                meta = json.loads((ckpt / "mics_checkpoint.json").read_text())
                meta["version"] = 99
                (ckpt / "mics_checkpoint.json").write_text(json.dumps(meta))
            corrupt(bump)
            mics_hf.load_checkpoint(ckpt, net, opt)
        elif case == "missing_shard":
            corrupt(lambda: _first_shard(ckpt).unlink())
            mics_hf.load_checkpoint(ckpt, net, opt)
        elif case == "negative_step":
            mics_hf.save_checkpoint(root_p, net, opt, step=-1)
        elif case == "existing_step":
            mics_hf.save_checkpoint(root_p, net, opt, step=1)
        elif case == "root_is_file":
            f = Path(root) / f"{case}-file"
            corrupt(lambda: f.write_text("x"))
            mics_hf.save_checkpoint(f, net, opt, step=2)
        elif case == "extra_not_json":
            mics_hf.save_checkpoint(root_p, net, opt, step=2, extra={"loader": object()})
        elif case == "other_param_groups":
            params = list(net.parameters())
            split = torch.optim.AdamW([{"params": params[:3]}, {"params": params[3:], "lr": 1e-4}])
            mics_hf.load_checkpoint(ckpt, net, split)
        elif case == "other_optimizer_class":
            mics_hf.load_checkpoint(ckpt, net, torch.optim.SGD(net.parameters(), lr=0.1))
        elif case == "no_optimizer_saved":
            plain = mics_hf.save_checkpoint(Path(root) / f"{case}-noopt", net, step=1)
            mics_hf.load_checkpoint(plain, net, opt)
        elif case == "optimizer_before_sharding":
            model = tiny_gpt2()
            early = torch.optim.AdamW(model.parameters())
            mics_hf.shard_model(model, mics_hf.MiCSConfig(partition_size=2, devices_per_node=2))
            mics_hf.load_checkpoint(ckpt, model, early)
        elif case == "impossible_layout":
            mics_hf.shard_model(tiny_gpt2(), mics_hf.MiCSConfig(partition_size=3, devices_per_node=2))
        elif case == "keep_last_zero":
            mics_hf.save_checkpoint(root_p, net, opt, step=2, keep_last=0)
        elif case == "unsharded_model":
            mics_hf.save_checkpoint(root_p, tiny_gpt2(), step=2)
        elif case == "export_without_config":
            lin = mics_hf.shard_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), mics_hf.MiCSConfig(partition_size=2, devices_per_node=2))
            plain = mics_hf.save_checkpoint(Path(root) / f"{case}-plain", lin, step=0)
            if rank != 0:  # export is a single-process command: only rank 0 runs it
                raise _Rank0Only()
            mics_hf.export_checkpoint(plain, Path(root) / f"{case}-out")
        elif case == "export_onto_file":
            f = Path(root) / f"{case}-file"
            corrupt(lambda: f.write_text("x"))
            if rank != 0:
                raise _Rank0Only()
            mics_hf.export_checkpoint(ckpt, f)
        elif case == "disk_full_on_one_rank":
            import mics_hf.checkpoint.save as C

            saved = C.save_file

            def failing(tensors, path, *a, **k):
                if rank == 1:
                    raise OSError(28, "No space left on device")
                return saved(tensors, path, *a, **k)

            C.save_file = failing
            try:
                mics_hf.save_checkpoint(root_p, net, opt, step=2)
            finally:
                C.save_file = saved
        elif case == "save_inside_backward":
            data = global_batches(steps=1, accum=1, world=world, micro=1)
            loss = net(input_ids=data[0, 0, rank], labels=data[0, 0, rank]).loss
            errors = []

            def hook(grad):
                try:
                    mics_hf.save_checkpoint(root_p, net, opt, step=5)
                except CheckpointError as exc:
                    errors.append(str(exc))
                return grad

            loss.register_hook(hook)
            loss.backward()
            opt.zero_grad()
            if errors:
                raise CheckpointError(errors[0])
        else:
            raise AssertionError(f"unknown case {case}")
    except _Rank0Only:
        message = RANK0_ONLY
    except (CheckpointError, ValueError) as exc:
        message = str(exc)
    else:
        message = "no error"
    dist.barrier()
    # nothing lost: the good checkpoint is still there, still `latest`, and still loads
    if case not in {"truncated_file", "flipped_bytes", "corrupted_metadata", "future_version", "missing_shard"}:
        assert before <= {p.name for p in root_p.iterdir()}, "a file of the good checkpoint disappeared"
        assert mics_hf.latest_checkpoint(root_p) == ckpt
        fresh, fresh_opt = _model()
        mics_hf.load_checkpoint(root_p, fresh, fresh_opt)
    return message


EXPECTED = {
    "missing_path": "does not exist",
    "not_a_checkpoint": "is not a mics_hf checkpoint",
    "only_partial_save": "never completed",
    "other_architecture": "saved from a different model",
    "other_size": r"shapes differ for \d+ tensor\(s\), e.g. .*: checkpoint \(36,\) vs model \(48,\)",
    "truncated_file": "truncated",
    "flipped_bytes": "CRC32",
    "corrupted_metadata": "is corrupted",
    "future_version": "format version 99",
    "missing_shard": "is missing",
    "negative_step": "must be a non-negative integer",
    "existing_step": "already exists; pass overwrite=True",
    "root_is_file": "is not a directory",
    "extra_not_json": "extra is not JSON-serialisable",
    "other_param_groups": "do not hold the same parameters",
    "other_optimizer_class": "checkpoint optimizer is AdamW, the given one is SGD",
    "no_optimizer_saved": "holds no optimizer state",
    "optimizer_before_sharding": "build the optimizer on model.parameters\\(\\) after mics_hf.shard_model",
    "impossible_layout": r"partition_size=3 does not divide the world size 2",
    "keep_last_zero": "keep_last=0 must be a positive integer",
    "unsharded_model": "is not sharded by mics_hf",
    "export_without_config": "has no config.json",
    "export_onto_file": "exists and is not a directory",
    "disk_full_on_one_rank": r"failed on 1 rank\(s\): rank 1: OSError: .*No space left on device",
    "save_inside_backward": "in the middle of a forward/backward",
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_bad_checkpoint_input(pools, tmp_path_factory, case):
    import re

    root = tmp_path_factory.mktemp("bad")
    messages = pools(2).run(_case, case=case, root=str(root))
    for rank, message in enumerate(messages):
        if message == RANK0_ONLY:
            assert rank != 0
            continue
        assert re.search(EXPECTED[case], message), (rank, message)
