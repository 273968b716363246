"""Issue #15: checkpoints and exports that never lose data and never trust their files.

Each defect of the issue is a test that failed before the fix and passes now (the resume crash with 0-row
shards, defect 1, is in test_checkpoint_resume.py). "Before" is the code of the commit the issue was filed
against, run with this file.

| test (input)                                             | before                                        | after                                   |
|----------------------------------------------------------|-----------------------------------------------|-----------------------------------------|
| export_refuses_non_empty_out_dir (a file in out_dir)     | out_dir replaced wholesale, the file lost, rc 0 | refused, rc 2; --overwrite keeps it     |
| export_never_touches_the_checkpoint (out = root, step    | every checkpoint deleted / `latest` names     | refused even with overwrite; all load   |
|   dir, inside the step dir)                              |   nothing                                     |                                         |
| overwrite_refuses_stale_weights (old sharded weights)    | (no overwrite mode)                           | refused: they would shadow the new ones |
| tokenizer_dir_never_replaces_the_weights (--tokenizer    | the exported weights replaced by the          | only tokenizer files are copied         |
|   = a model directory)                                   |   tokenizer directory's model.safetensors     |                                         |
| save_pretrained_refuses_non_empty_out_dir                | out_dir replaced wholesale                    | refused on every rank                   |
| export_writes_only_persistent_buffers (BERT)             | position_ids, token_type_ids exported:        | exactly the model's state_dict keys     |
|                                                          |   from_pretrained reports unexpected keys     |                                         |
| crafted_paths_never_open_a_file_outside (12 path fields) | /etc/passwd opened (CRC read, safe_open,      | refused naming the field; an audit hook |
|                                                          |   tokenizer copied), raw errors               |   sees no open outside the checkpoint   |
| row_ranges_must_tile (gap, overlap)                      | gap: uninitialised memory loaded silently;    | refused, naming the file and row        |
|                                                          |   overlap: rows silently overwritten          |                                         |
| metadata_checksum (a value edited, no rehash)            | loaded silently                               | refused: fails its checksum             |
| dtypes_are_checked (metadata vs model, file vs metadata) | values cast silently                          | refused, naming the tensor              |
| buffer_of_broadcastable_shape                            | broadcast into the buffer silently            | refused, naming the tensor              |
| bad_rng_or_buffer_changes_nothing                        | params and optimizer overwritten, then raise  | refused; model and optimizer unchanged  |
| scheduler_state_is_checked (unknown key, wrong kinds)    | attributes overwritten after the model was    | refused; nothing changed                |
|                                                          |   loaded (or a crash at the next step)        |                                         |
| other_errors_are_agreed_across_ranks (2 ranks)           | rank 0 hangs in the agreement (timeout)       | one CheckpointError on both, naming it  |
| extra_step_is_refused                                    | extra's step returned as the step             | refused at save                         |
| concurrent_saver_is_refused (lock held)                  | the other job's .tmp- directory deleted       | refused; nothing of the other touched   |
| keep_last_orders_steps_numerically (10^8)                | the newest checkpoint deleted                 | the oldest deleted                      |
| crash_at_every_step_of_a_save (new and overwrite)        | crash between the renames of an overwrite:    | the newest published checkpoint always  |
|                                                          |   `latest` names nothing, .old- never removed |   loads; the next save leaves nothing   |
| yaml_alias_bomb_is_bounded (~330 bytes, 2 readers)      | minutes and GBs to print the value            | ValueError in < 1 s, message < 2 kB     |
| hierarchical_must_be_a_bool (1, "yes")                   | hierarchical=1 accepted as True               | ValueError (config.py; kept here)       |
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mics_hf
from distributed import DistPool
from mics_hf.checkpoint.format import METADATA, CheckpointError
from models import global_batches, tiny_bert, tiny_gpt2

try:
    from mics_hf.checkpoint.format import metadata_checksum
except ImportError:  # the code before the fix: no checksum (lets this file run against it)
    def metadata_checksum(meta):
        return None


# ---- helpers (a world of one: shard_model works without a process group) -----------------------------------
def _gpt(seed: int = 0):
    net = mics_hf.shard_model(tiny_gpt2(seed=seed), mics_hf.MiCSConfig())
    return net, torch.optim.AdamW(net.parameters(), lr=1e-2)


def _step(net, opt, seed: int = 1) -> None:
    data = global_batches(steps=1, accum=1, world=1, micro=1, seed=seed)
    net(input_ids=data[0, 0, 0], labels=data[0, 0, 0]).loss.backward()
    opt.step()
    opt.zero_grad()


def _trained(seed: int = 0):
    net, opt = _gpt(seed)
    _step(net, opt)
    return net, opt


def _weights(net) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in mics_hf.full_state_dict(net).items()}


def _optim(opt) -> list[torch.Tensor]:
    return [v.clone() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _edit_meta(ckpt: Path, edit, *, rehash: bool = True) -> None:
    """Edit the metadata as an attacker would (recomputing the checksum), or as corruption would (not)."""
    meta = json.loads((ckpt / METADATA).read_text())
    edit(meta)
    if rehash and "checksum" in meta:
        meta["checksum"] = metadata_checksum(meta)
    (ckpt / METADATA).write_text(json.dumps(meta))


def _edit_file(ckpt: Path, name: str, edit) -> None:
    """Rewrite one safetensors file and fix its size, CRC32 and the checksum: only the content check remains."""
    tensors = load_file(str(ckpt / name))
    edit(tensors)
    save_file(tensors, str(ckpt / name))
    size, crc = (ckpt / name).stat().st_size, zlib.crc32((ckpt / name).read_bytes())

    def fix(meta):
        entry = next(f for f in meta["files"] if f["file"] == name)
        entry["bytes"], entry["crc32"] = size, crc

    _edit_meta(ckpt, fix)


def _leftovers(root: Path) -> list[str]:
    return sorted(n for n in os.listdir(root) if n.startswith((".tmp-", ".old-")) or n.endswith(".tmp"))


# ---- outputs never destroy -------------------------------------------------------------------------------
def test_export_refuses_non_empty_out_dir(tmp_path):
    from transformers import AutoModelForCausalLM

    from mics_hf.cli import main

    net, opt = _trained()
    mics_hf.save_checkpoint(tmp_path / "ckpt", net, opt, step=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(tmp_path / "ckpt"), str(out)]) == 2
    assert os.listdir(out) == ["notes.txt"]
    assert main(["export", str(tmp_path / "ckpt"), str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    loaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert torch.equal(loaded.transformer.wte.weight, _weights(net)["transformer.wte.weight"])
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "new")]) == 0  # a new directory needs nothing


def test_export_never_touches_the_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    net, opt = _trained()
    first = mics_hf.save_checkpoint(root, net, opt, step=1)
    second = mics_hf.save_checkpoint(root, net, opt, step=2)
    before = sorted(p.name for p in root.rglob("*"))
    for out in (root, second, second / "hf", first, tmp_path):  # tmp_path: contains the checkpoint
        with pytest.raises(CheckpointError, match="checkpoint"):
            mics_hf.export_checkpoint(second, out, overwrite=True)
    assert sorted(p.name for p in root.rglob("*")) == before
    assert mics_hf.latest_checkpoint(root) == second
    for path in (root, first, second):
        mics_hf.load_checkpoint(path, *_gpt(5))


def test_overwrite_refuses_stale_weights(tmp_path):
    net, opt = _trained()
    ckpt = mics_hf.save_checkpoint(tmp_path / "ckpt", net, opt, step=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"old")
    (out / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="weight files this export does not write"):
        mics_hf.export_checkpoint(ckpt, out, overwrite=True)
    assert sorted(os.listdir(out)) == ["model-00001-of-00002.safetensors", "model.safetensors.index.json"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_tokenizer_dir_never_replaces_the_weights(tmp_path):
    from safetensors.torch import load_file as load

    net, opt = _trained()
    ckpt = mics_hf.save_checkpoint(tmp_path / "ckpt", net, opt, step=1)
    base = tmp_path / "base_model"  # a model directory given as the tokenizer, as users do
    base.mkdir()
    save_file({"transformer.wte.weight": torch.zeros(2, 2)}, str(base / "model.safetensors"))
    (base / "config.json").write_text("{}")
    (base / "tokenizer.json").write_text("{}")
    out = mics_hf.export_checkpoint(ckpt, tmp_path / "out", tokenizer=base)
    assert (out / "tokenizer.json").is_file()
    assert torch.equal(load(str(out / "model.safetensors"))["transformer.wte.weight"], _weights(net)["transformer.wte.weight"])
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"


def test_save_pretrained_refuses_non_empty_out_dir(tmp_path):
    net, _ = _gpt()
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        mics_hf.save_pretrained(net, out)
    assert os.listdir(out) == ["notes.txt"]
    mics_hf.save_pretrained(net, out, overwrite=True)
    assert {"config.json", "model.safetensors", "notes.txt"} <= set(os.listdir(out))
    assert (out / "notes.txt").read_text() == "mine"


def test_export_writes_only_persistent_buffers(tmp_path):
    from transformers import AutoModelForMaskedLM

    net = mics_hf.shard_model(tiny_bert(), mics_hf.MiCSConfig())
    ckpt = mics_hf.save_checkpoint(tmp_path / "ckpt", net, step=0)
    out = mics_hf.export_checkpoint(ckpt, tmp_path / "out")
    keys = set(load_file(str(out / "model.safetensors")))
    assert not {k for k in keys if "position_ids" in k or "token_type_ids" in k}, keys
    _, info = AutoModelForMaskedLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"], info


# ---- untrusted paths: refused by field, and no file outside the checkpoint is opened -----------------------
PATH_CASES = {
    # case: (what is crafted, which call, regex the error must match)
    "shard_dotdot": ("load", r"field files\[\d+\]\.file is '\.\./"),
    "shard_absolute": ("export", r"field files\[\d+\]\.file is '/etc/passwd'"),
    "rng_dotdot": ("load", r"field files\[\d+\]\.file is '\.\./"),
    "shard_symlink": ("load", r"files\[position 0\]: .*shard-q0000\.safetensors is a symbolic link"),
    "metadata_symlink": ("load", r"mics_checkpoint\.json: .* is a symbolic link"),
    "latest_dotdot": ("load", r"the `latest` pointer .* holds '\.\./"),
    "latest_absolute": ("export", r"the `latest` pointer .* holds '/etc/passwd'"),
    "latest_is_symlink": ("load", r"the `latest` pointer .* is a symbolic link"),
    "latest_names_symlinked_dir": ("load", r"the `latest` pointer .* names step_00000007, a symbolic link"),
    "config_symlink": ("export", r"config\.json: .* is a symbolic link"),
    "tokenizer_dir_symlink": ("export", r"tokenizer is a symbolic link"),
    "tokenizer_file_symlink": ("export", r"tokenizer/ file 'vocab\.json': .* is a symbolic link"),
}
SECRET = "/etc/passwd"


def _craft(case: str, root: Path, elsewhere: Path) -> None:
    """Turn the good checkpoint under `root` into the crafted one (hook inactive)."""
    ckpt = root / "step_00000001"
    index = {(f["kind"]): i for i, f in enumerate(json.loads((ckpt / METADATA).read_text())["files"])}

    def set_file(kind, value):
        _edit_meta(ckpt, lambda m: m["files"][index[kind]].__setitem__("file", value))

    def link(path: Path, target: str | Path) -> None:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
        path.symlink_to(target)

    if case == "shard_dotdot":
        set_file("shard", "../../../../../../../../../../etc/passwd")
    elif case == "shard_absolute":
        set_file("shard", SECRET)
    elif case == "rng_dotdot":
        set_file("rng", "../../../../../../../../../../etc/passwd")
    elif case == "shard_symlink":
        link(ckpt / "shard-q0000.safetensors", SECRET)
    elif case == "metadata_symlink":
        link(ckpt / METADATA, SECRET)
    elif case == "latest_dotdot":
        (root / "latest").write_text("../../../../../../../../../../etc\n")
    elif case == "latest_absolute":
        (root / "latest").write_text(SECRET + "\n")
    elif case == "latest_is_symlink":
        link(root / "latest", SECRET)
    elif case == "latest_names_symlinked_dir":
        shutil.copytree(ckpt, elsewhere / "step_00000007")
        (root / "step_00000007").symlink_to(elsewhere / "step_00000007")
        (root / "latest").write_text("step_00000007\n")
    elif case == "config_symlink":
        link(ckpt / "config.json", SECRET)
    elif case == "tokenizer_dir_symlink":
        link(ckpt / "tokenizer", "/etc")
    elif case == "tokenizer_file_symlink":
        link(ckpt / "tokenizer" / "vocab.json", SECRET)


def _opened_outside(rank: int, world: int, *, base: str) -> dict[str, tuple[str, list[str]]]:
    """In a forked process of its own (audit hooks cannot be removed): craft, then run each case under the hook."""
    events: list[tuple[str, int]] = []
    active = [False]

    def hook(event, args):
        if active[0] and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            events.append((os.fsdecode(args[0]), flags))

    def target(path: str, flags: int) -> str:
        """What the kernel would open: the link itself when O_NOFOLLOW is set (it then fails), else its target."""
        path = os.path.abspath(path)
        if flags & os.O_NOFOLLOW:
            return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        return os.path.realpath(path)

    sys.addaudithook(hook)
    base_p = Path(base)
    good = base_p / "good"
    net, opt = _trained()
    tok = good / "tok"
    tok.mkdir(parents=True)
    (tok / "vocab.json").write_text("{}")

    class Tok:
        def save_pretrained(self, d):
            shutil.copytree(tok, d)

    mics_hf.save_checkpoint(good / "root", net, opt, step=1, tokenizer=Tok())
    mics_hf.export_checkpoint(good / "root", good / "warm")  # imports done before watching
    python = [os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, os.path.dirname(mics_hf.__file__))]
    results = {}
    for case, (call, _) in [("control", ("control", None)), *PATH_CASES.items()]:
        root, elsewhere, out = base_p / case / "root", base_p / case / "elsewhere", base_p / case / "out"
        shutil.copytree(good / "root", root, symlinks=True)
        elsewhere.mkdir()
        _craft(case, root, elsewhere)
        dirs = [os.path.realpath(root), os.path.realpath(out), *python]
        tmp_prefix = os.path.realpath(base_p / case) + "/.tmp-"
        events.clear()
        active[0] = True
        try:
            if call == "control":  # shows that the hook sees such an open
                open(SECRET).close()
                raise CheckpointError("control")
            if call == "load":
                mics_hf.load_checkpoint(root, *_gpt(3))
            else:
                mics_hf.export_checkpoint(root, out)
            message = "no error"
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
        finally:
            active[0] = False
        outside = sorted({
            t for t in (target(p, f) for p, f in events)
            if not (t.startswith(tmp_prefix) or any(t == d or t.startswith(d + "/") for d in dirs))
        })
        inside = sum(1 for p, f in events if target(p, f).startswith(dirs[0] + "/"))
        results[case] = (message, outside, inside)
    return results


def test_crafted_paths_never_open_a_file_outside(tmp_path):
    with DistPool(1, init=False, timeout=120) as pool:
        results = pool.run(_opened_outside, base=str(tmp_path))[0]
    assert results.pop("control") == ("CheckpointError: control", [os.path.realpath(SECRET)], 0)
    for case, (_, pattern) in PATH_CASES.items():
        message, outside, inside = results[case]
        assert message.startswith("CheckpointError") and re.search(pattern, message), (case, message)
        assert not outside, (case, outside)
        assert inside > 0, case  # the hook did watch this call's opens


# ---- untrusted content: tiling, checksum, dtypes, shapes -------------------------------------------------
def _save_p2(rank: int, world: int, *, root: str) -> None:
    net = mics_hf.shard_model(tiny_gpt2(), mics_hf.MiCSConfig(partition_size=2, devices_per_node=2))
    mics_hf.save_checkpoint(root, net, step=1)


@pytest.fixture(scope="module")
def p2_checkpoint(tmp_path_factory, pools) -> Path:
    root = tmp_path_factory.mktemp("p2") / "ckpt"
    pools(2).run(_save_p2, root=str(root))
    return root / "step_00000001"


@pytest.mark.parametrize("shift, what", [(1, "a gap"), (-1, "an overlap")])
def test_row_ranges_must_tile(tmp_path, p2_checkpoint, shift, what):
    ckpt = Path(shutil.copytree(p2_checkpoint, tmp_path / "c"))
    fqn = "transformer.wte.weight"

    def move(meta):
        entry = next(f for f in meta["files"] if f.get("position") == 1)
        entry["rows"][fqn][0] += shift

    _edit_meta(ckpt, move)
    net, _ = _gpt(4)
    before = _weights(net)
    with pytest.raises(CheckpointError, match=rf"rows\['{fqn}'\] starts at row \d+ where row \d+ was due \({what}\)"):
        mics_hf.load_checkpoint(ckpt, net)
    assert _same(_weights(net), before)


def test_metadata_checksum(tmp_path, p2_checkpoint):
    ckpt = Path(shutil.copytree(p2_checkpoint, tmp_path / "c"))
    fqn = "transformer.h.0.attn.c_attn.weight"

    def swap(meta):  # position 0 and 1 claim each other's rows: the union still tiles
        a, b = (next(f for f in meta["files"] if f.get("position") == q) for q in (0, 1))
        a["rows"][fqn], b["rows"][fqn] = b["rows"][fqn], a["rows"][fqn]

    _edit_meta(ckpt, swap, rehash=False)
    with pytest.raises(CheckpointError, match="fails its checksum"):
        mics_hf.load_checkpoint(ckpt, _gpt(4)[0])


def test_dtypes_are_checked(tmp_path):
    net, opt = _trained()
    ckpt = mics_hf.save_checkpoint(tmp_path / "a", net, opt, step=1)
    _edit_meta(ckpt, lambda m: m["params"]["transformer.wte.weight"].__setitem__("dtype", "float16"))
    with pytest.raises(CheckpointError, match=r"another dtype than the model, e.g. \['transformer.wte.weight: checkpoint float16"):
        mics_hf.load_checkpoint(ckpt, *_gpt(4))
    ckpt = mics_hf.save_checkpoint(tmp_path / "b", net, opt, step=1)
    key = "param/transformer.wpe.weight"
    _edit_file(ckpt, "shard-q0000.safetensors", lambda t: t.__setitem__(key, t[key].double()))
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' is float64 \[32, 36\], the metadata says float32"):
        mics_hf.load_checkpoint(ckpt, *_gpt(4))


def _bn_net(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    model[1].running_mean.uniform_()
    return mics_hf.shard_model(model, mics_hf.MiCSConfig())


def test_buffer_of_broadcastable_shape(tmp_path):
    ckpt = mics_hf.save_checkpoint(tmp_path / "c", _bn_net(), step=1)
    key = "buffer/1.running_mean"
    _edit_file(ckpt, "shard-q0000.safetensors", lambda t: t.__setitem__(key, t[key][:1].clone()))
    net = _bn_net(seed=1)
    before = net[1].running_mean.clone()
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' is float32 \[1\], the metadata says float32 \[4\]"):
        mics_hf.load_checkpoint(ckpt, net)
    assert torch.equal(net[1].running_mean, before)


@pytest.mark.parametrize("bad", ["rng", "buffer"])
def test_bad_rng_or_buffer_changes_nothing(tmp_path, bad):
    if bad == "rng":
        net, opt = _trained()
        ckpt = mics_hf.save_checkpoint(tmp_path / "c", net, opt, step=1)
        _edit_file(ckpt, "rng-rank0000.safetensors", lambda t: t.__setitem__("python", t["python"][:10].clone()))
        fresh, fresh_opt = _trained(seed=4)
    else:
        ckpt = mics_hf.save_checkpoint(tmp_path / "c", _bn_net(), step=1)
        _edit_file(ckpt, "shard-q0000.safetensors", lambda t: t.__setitem__("buffer/1.running_var", t["buffer/1.running_var"].double()))
        fresh = _bn_net(seed=1)
        fresh_opt = torch.optim.AdamW(fresh.parameters())
        fresh(torch.ones(3, 4)).sum().backward()
        fresh_opt.step()
        fresh_opt.zero_grad()
    weights, state, rng = _weights(fresh), _optim(fresh_opt), torch.get_rng_state()
    with pytest.raises(CheckpointError):
        mics_hf.load_checkpoint(ckpt, fresh, fresh_opt if bad == "rng" else None)
    assert _same(_weights(fresh), weights)
    assert all(torch.equal(a, b) for a, b in zip(_optim(fresh_opt), state))
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("edit", [{"optimizer": "not mine"}, {"last_epoch": "seven"}, {"base_lrs": [1.0, 2.0]}])
def test_scheduler_state_is_checked(tmp_path, edit):
    net, opt = _trained()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    ckpt = mics_hf.save_checkpoint(tmp_path, net, opt, step=1, scheduler=sched)
    _edit_meta(ckpt, lambda m: m["scheduler"].update(edit))
    fresh, fresh_opt = _trained(seed=4)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda s: 0.5)
    weights, state = _weights(fresh), fresh_sched.state_dict()
    with pytest.raises(CheckpointError, match="the LR scheduler state"):
        mics_hf.load_checkpoint(ckpt, fresh, fresh_opt, scheduler=fresh_sched)
    assert _same(_weights(fresh), weights) and fresh_sched.state_dict() == state


def _load_with_failure_on_rank1(rank: int, world: int, *, root: str) -> str:
    net = mics_hf.shard_model(tiny_gpt2(), mics_hf.MiCSConfig(partition_size=2, devices_per_node=2))
    mics_hf.save_checkpoint(root, net, step=1)
    real = zlib.crc32
    if rank == 1:
        def failing(*args):
            raise MemoryError("injected while reading")
        zlib.crc32 = failing
    try:
        mics_hf.load_checkpoint(root, net)
    except CheckpointError as exc:
        return str(exc)
    finally:
        zlib.crc32 = real
    return "no error"


def test_other_errors_are_agreed_across_ranks(pools, tmp_path):
    messages = pools(2).run(_load_with_failure_on_rank1, root=str(tmp_path / "c"))
    for message in messages:
        assert re.search(r"failed on 1 rank\(s\): rank 1: MemoryError: injected while reading", message), message


def test_extra_step_is_refused(tmp_path):
    net, opt = _trained()
    with pytest.raises(CheckpointError, match="extra has a key 'step'"):
        mics_hf.save_checkpoint(tmp_path, net, opt, step=3, extra={"step": 99})
    mics_hf.save_checkpoint(tmp_path, net, opt, step=3, extra={"data": 5})
    assert mics_hf.load_checkpoint(tmp_path, *_gpt(4)) == {"step": 3, "data": 5}


# ---- publication: lock, ordering, crashes ----------------------------------------------------------------
def test_concurrent_saver_is_refused(tmp_path):
    net, opt = _trained()
    mics_hf.save_checkpoint(tmp_path, net, opt, step=1)
    other = tmp_path / ".tmp-step_00000005"  # another job's save in progress
    other.mkdir()
    (other / "shard-q0000.safetensors").write_bytes(b"theirs")
    fd = os.open(tmp_path / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(CheckpointError, match="another save into .* is running"):
            mics_hf.save_checkpoint(tmp_path, net, opt, step=2)
        assert (other / "shard-q0000.safetensors").read_bytes() == b"theirs"
        assert not (tmp_path / "step_00000002").exists()
    finally:
        os.close(fd)
    mics_hf.save_checkpoint(tmp_path, net, opt, step=2)  # once the other save is over, it cleans up after it
    assert _leftovers(tmp_path) == []


def test_keep_last_orders_steps_numerically(tmp_path):
    net, _ = _gpt()
    for step in (99_999_999, 100_000_000, 100_000_001):
        mics_hf.save_checkpoint(tmp_path, net, step=step, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_100000000", "step_100000001"]
    assert mics_hf.latest_checkpoint(tmp_path) == tmp_path / "step_100000001"


CRASHED = 86
_FS_EVENTS = {"os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate", "os.link", "os.symlink"}


def _save_crashing_at(k: int, root: Path, net, opt, step: int, overwrite: bool) -> int:
    """Fork; in the child, save with os._exit just before its k-th file-system step; return the exit code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        code = 1
        try:
            count = [0]

            def step_once():
                count[0] += 1
                if count[0] == k:
                    os._exit(CRASHED)

            def hook(event, args):
                writes = event == "open" and len(args) > 2 and isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
                if event in _FS_EVENTS or writes:
                    step_once()

            import mics_hf.checkpoint.save as save_module

            real_save_file = save_module.save_file

            def counted_save_file(*args, **kwargs):  # safetensors writes from Rust: no audit event
                step_once()
                return real_save_file(*args, **kwargs)

            save_module.save_file = counted_save_file
            sys.addaudithook(hook)
            mics_hf.save_checkpoint(root, net, opt, step=step, overwrite=overwrite)
            code = 0
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.parametrize("overwrite", [False, True], ids=["new_step", "overwrite"])
def test_crash_at_every_step_of_a_save(tmp_path, overwrite):
    nets = {name: _trained(seed) for name, seed in (("A", 0), ("B", 1), ("C", 2))}
    states = {name: _weights(net) for name, (net, _) in nets.items()}
    base = tmp_path / "base"
    mics_hf.save_checkpoint(base, *nets["A"], step=1)
    mics_hf.save_checkpoint(base, *nets["B"], step=2)
    step = 2 if overwrite else 3
    old, new = (2, "B"), (step, "C")
    seen = []
    for k in range(1, 200):
        root = tmp_path / f"k{k}"
        shutil.copytree(base, root, symlinks=True)
        code = _save_crashing_at(k, root, *nets["C"], step=step, overwrite=overwrite)
        assert code in (CRASHED, 0), code
        fresh, fresh_opt = _gpt(9)
        info = mics_hf.load_checkpoint(root, fresh, fresh_opt)
        got = next(name for name in "ABC" if _same(_weights(fresh), states[name]))
        seen.append((info["step"], got))
        assert (info["step"], got) in (old, new), (k, info, got)
        if code == 0:
            assert (info["step"], got) == new
            break
        mics_hf.save_checkpoint(root, *nets["A"], step=4)  # the next save cleans every leftover
        assert _leftovers(root) == [], (k, _leftovers(root))
        assert mics_hf.load_checkpoint(root, *_gpt(9))["step"] == 4
        assert _same(_weights(_load(root / "step_00000001")), states["A"])
        assert any(_same(_weights(_load(root / "step_00000002")), states[n]) for n in "BC")
    assert seen[-1] == new and k > 8, seen
    first_new = seen.index(new)
    assert seen[:first_new] == [old] * first_new and set(seen[first_new:]) == {new}, seen  # one commit point


def _load(path: Path):
    net, opt = _gpt(9)
    mics_hf.load_checkpoint(path, net, opt)
    return net


def test_leftover_old_directory_is_restored_or_removed(tmp_path):
    net, opt = _trained()
    mics_hf.save_checkpoint(tmp_path, net, opt, step=1)
    os.replace(tmp_path / "step_00000001", tmp_path / ".old-step_00000001")  # crash between the two renames
    assert mics_hf.load_checkpoint(tmp_path, *_gpt(9))["step"] == 1  # `latest` falls back to the old version
    mics_hf.save_checkpoint(tmp_path, net, opt, step=2)
    assert (tmp_path / "step_00000001" / METADATA).is_file() and _leftovers(tmp_path) == []


# ---- config readers ----------------------------------------------------------------------------------------
def _parse(rank: int, world: int, *, mics_file: str, accelerate_file: str) -> list[str]:
    from mics_hf.integrations.settings import parse_mics_value, read_accelerate_config

    messages = []
    for fn in (lambda: parse_mics_value(mics_file, what="MICS_CONFIG"), lambda: read_accelerate_config(accelerate_file)):
        start = time.monotonic()
        try:
            fn()
            messages.append("no error")
        except ValueError as exc:
            messages.append(f"{time.monotonic() - start:.2f}s {str(exc)[:10_000]}")
    return messages


def _bomb(indent: str) -> list[str]:
    """9 anchors of 9 aliases each: ~330 bytes that expand to 9^9 (387 million) values."""
    lines = [f"{indent}a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{indent}{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    return lines


def test_yaml_alias_bomb_is_bounded(tmp_path):
    mics_file, accelerate_file = tmp_path / "mics.yaml", tmp_path / "accelerate.yaml"
    mics_file.write_text("\n".join(_bomb("") + ["mics:", "  partition_size: 1", "  node_of_rank: *i"]) + "\n")
    accelerate_file.write_text("\n".join(
        ["compute_environment: LOCAL_MACHINE", "distributed_type: MULTI_GPU", "num_processes: 1", "fsdp_config:"]
        + _bomb("  ") + ["  mics:", "    partition_size: 1", "    node_of_rank: *i"]) + "\n")
    with DistPool(1, init=False, timeout=30) as pool:  # before the fix: minutes and gigabytes (killed here)
        messages = pool.run(_parse, mics_file=str(mics_file), accelerate_file=str(accelerate_file))[0]
    for message in messages:
        seconds, text = message.split("s ", 1)
        assert float(seconds) < 1.0 and len(text) < 2000 and "expands to more than" in text, message[:300]


@pytest.mark.parametrize("value", ["1", "yes_please"])
def test_hierarchical_must_be_a_bool(tmp_path, value):
    from mics_hf.integrations.settings import parse_mics_value

    path = tmp_path / "mics.yaml"
    path.write_text(f"mics:\n  partition_size: 1\n  hierarchical: {value}\n")
    with pytest.raises(ValueError, match='hierarchical=.* must be "auto", True or False'):
        parse_mics_value(str(path), what="MICS_CONFIG")
