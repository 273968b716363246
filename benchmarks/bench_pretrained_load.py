"""Peak memory per rank of loading a pretrained model: mics_hf.from_pretrained against from_pretrained on every rank.

A GPT-2-shaped model of about 1B parameters is built once and written with save_pretrained (sharded safetensors
and an index) into --dir (kept between runs). Then --nproc CPU ranks (gloo) load it twice, each time in fresh
forked processes: `mics_hf.from_pretrained(..., MiCSConfig(partition_size=p))` and transformers'
`from_pretrained` on every rank (what a stock script does before any sharding). Each rank resets its peak
resident set (/proc/self/clear_refs) after joining the process group, reads every weight once (a memory-mapped
load is lazy; the first step reads everything) and reports the peak minus its resident set at that moment: the
memory the load itself cost, memory-mapped file pages included (on CPU those pages are shared between the ranks
through the page cache; on GPUs every rank copies the whole model to its device).

    python benchmarks/bench_pretrained_load.py --dir /tmp/gpt2-1b --record

The expectation printed beside the result: model bytes / p + one transformer block (a unit that is not wholly
in the file is materialised whole; here every tensor is read row-wise, so this is an upper bound) + the stated
overhead (one extra copy of the largest tensor's rows, e.g. while casting them to the fp32 master).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import ROOT, fork_ranks, gpt2_config, machine_info, write_record  # noqa: E402

GIB = 1 << 30


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def build(opts: argparse.Namespace) -> None:
    """Write the model once (in its own process, so no benchmark process ever held it)."""
    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = gpt2_config(vocab=50257, n_positions=1024, n_embd=opts.n_embd, n_layer=opts.n_layer, n_head=16)
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(opts.dir, max_shard_size="1GB")
    print(f"wrote {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters to {opts.dir}")


def rank_main(rank: int, opts: argparse.Namespace, port: int, results_path: str) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    import mics_hf

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=opts.nproc)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set (VmHWM) to the current one
    base = _status("VmRSS")
    start = time.perf_counter()
    if opts.mode == "mics":
        model = mics_hf.from_pretrained(AutoModelForCausalLM, opts.dir, mics_hf.MiCSConfig(partition_size=opts.p, devices_per_node=opts.nproc))
        local = sum(p.numel() * p.element_size() for p in model.parameters())
    else:
        model = AutoModelForCausalLM.from_pretrained(opts.dir)
        local = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad():  # touch every weight once, as the first step does: a memory-mapped load reads lazily
        for param in model.parameters():
            param.sum()
    seconds = time.perf_counter() - start
    peak = _status("VmHWM") - base
    out = [None] * opts.nproc
    dist.all_gather_object(out, {"rank": rank, "peak": peak, "local_bytes": local, "seconds": seconds})
    if rank == 0:
        Path(results_path).write_text(json.dumps(out))
    mics_hf.close_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, help="where the model is (or is first written)")
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--p", type=int, default=4, help="partition size of the MiCS load")
    ap.add_argument("--n-embd", type=int, default=2048)
    ap.add_argument("--n-layer", type=int, default=18)
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--record", action="store_true", help="write benchmarks/pretrained_load_<date>.md / .json")
    opts = ap.parse_args()
    if opts.build_only:
        return build(opts)
    started = time.time()
    if not (Path(opts.dir) / "config.json").is_file():
        subprocess.run([sys.executable, __file__, "--dir", opts.dir, "--n-embd", str(opts.n_embd), "--n-layer", str(opts.n_layer),
                        "--build-only"], check=True)
    index = json.loads((Path(opts.dir) / "model.safetensors.index.json").read_text())
    model_bytes = index["metadata"]["total_size"]
    from safetensors import safe_open

    largest_tensor = 0
    for name in set(index["weight_map"].values()):
        with safe_open(str(Path(opts.dir) / name), "pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                largest_tensor = max(largest_tensor, 4 * math.prod(shape))
    block = model_bytes // (opts.n_layer + 1)  # a transformer block, roughly (the root holds the embeddings)
    results = {}
    errors = []
    for mode in ("mics", "every_rank"):
        opts.mode = mode
        path = f"/tmp/bench_pretrained_load_{os.getpid()}_{mode}.json"
        out, error = fork_ranks(rank_main, opts, opts.nproc, path)
        if error:
            errors.append(f"{mode}: {error}")
        results[mode] = out
    expected = model_bytes / opts.p + block + largest_tensor / opts.p
    lines = [
        f"- model: {model_bytes / GIB:.2f} GiB of fp32 weights ({model_bytes / 4 / 1e9:.2f}B parameters), GPT-2 shape, "
        f"n_embd {opts.n_embd}, {opts.n_layer} layers, in {len(set(index['weight_map'].values()))} safetensors files",
        f"- {opts.nproc} CPU ranks, mics_hf at p = {opts.p}; peak = VmHWM - VmRSS measured around the load on each rank",
        "",
        "| load | rank | peak GiB | local parameters GiB | seconds |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode, rows in results.items():
        for r in rows or []:
            lines.append(f"| {mode} | {r['rank']} | {r['peak'] / GIB:.2f} | {r['local_bytes'] / GIB:.2f} | {r['seconds']:.1f} |")
    summary = []
    if results.get("mics") and results.get("every_rank"):
        ours = max(r["peak"] for r in results["mics"])
        full = max(r["peak"] for r in results["every_rank"])
        summary = [
            f"- mics_hf peak per rank (largest rank): {ours / GIB:.2f} GiB; from_pretrained on every rank: {full / GIB:.2f} GiB",
            f"- ratio mics / every rank: {ours / full:.3f} (goal: <= 1/p + 20% = {1 / opts.p * 1.2:.3f})",
            f"- expected bound model/p + one block + largest tensor's rows: {expected / GIB:.2f} GiB "
            f"(ours is {ours / expected:.2f} of it)",
        ]
    for line in summary + lines[:2]:
        print(line)
    for line in lines[2:]:
        print(line)
    if opts.record:
        info = machine_info()
        path = write_record(
            ROOT / "benchmarks", "pretrained_load", title="Loading a pretrained ~1B model: peak memory per rank",
            intro=__doc__.split("\n\n")[1].replace("\n", " "), info=info, versions=("python", "torch", "transformers"),
            wall_s=time.time() - started, sections=[("Result", summary + [""] + lines)], errors=errors,
            payload={"model_bytes": model_bytes, "p": opts.p, "nproc": opts.nproc, "results": results, "expected_bytes": expected},
        )
        print(f"recorded {path}")


if __name__ == "__main__":
    main()
