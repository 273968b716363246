"""Single-GPU throughput of mics_hf against a bare PyTorch loop on the same model, in one run.

    python benchmarks/gpu_bench.py                       # GPT ~1.3B, seq 2048, bf16, activation checkpointing
    python benchmarks/gpu_bench.py --record              # also writes benchmarks/gpu_<date>.md / .json
    python benchmarks/gpu_bench.py --preset tiny --device cpu --steps 2 --warmup 1   # smoke test without a GPU

What is compared (world size 1, so no communication; this measures the engine's own overhead):
  bare    fp32 parameters, torch.autocast(bf16), fused AdamW on the parameters
  mics_hf shard_model(MiCSConfig(param_dtype=bf16)): bf16 gathered parameters, fp32 master shards, fused AdamW
  fsdp2   fully_shard on each GPT2Block and the root, MixedPrecisionPolicy(param_dtype=bf16), a world-1 process
          group (--engines bare,mics_hf leaves it out); its peak memory is the one to compare mics_hf's with
Both use HF's gradient checkpointing (non-reentrant) and SDPA attention. Engines alternate over rounds so
clock and thermal drift hit both. TFLOPS per GPU: 8N (the paper's: 6N plus 2N of recomputation) and 6N,
per token, attention excluded; MFU against the bf16 matmul rate measured on this card in the same run.
Also: fp32 parity of a tiny model against an unsharded reference on this device (the engine's CUDA path).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import mics_hf  # noqa: E402

PRESETS = {
    # ~1.31B: 12 * 24 * 2048^2 + (50257 + 2048) * 2048
    "gpt-1.3b": dict(n_embd=2048, n_layer=24, n_head=16, vocab_size=50257, seq=2048, batch=8),
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=256, seq=64, batch=2),
}


def build(cfg: dict, device: torch.device):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=cfg["vocab_size"], n_positions=cfg["seq"], n_embd=cfg["n_embd"], n_layer=cfg["n_layer"],
        n_head=cfg["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_pytorch_tanh",
        bos_token_id=0, eos_token_id=0,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT2LMHeadModel(config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def measured_matmul_peak(device: torch.device) -> float:
    """bf16 TFLOP/s of an 8192^3 matmul on this card (the MFU denominator)."""
    if device.type != "cuda":
        return float("nan")
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    reps = 20
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def _fully_shard(model) -> None:
    """FSDP2 on a world of one: each block, then the root; bf16 compute, fp32 parameters."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    if not dist.is_initialized():
        from bench_common import free_port  # this script's folder is on sys.path when run as a script

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device_type, (1,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    for module in model.modules():
        if isinstance(module, GPT2Block):
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def run_engine(engine: str, cfg: dict, device: torch.device, steps: int, warmup: int, data: torch.Tensor) -> dict:
    if device.type == "cuda":  # peak memory counts from here: this engine's model, state and step only
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build(cfg, device)
    n_params = sum(p.numel() for p in model.parameters())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if engine == "bare" else torch.autocast(device.type, enabled=False)
    if engine == "mics_hf":
        mics_hf.shard_model(model, mics_hf.MiCSConfig(param_dtype=torch.bfloat16))
    elif engine == "fsdp2":
        _fully_shard(model)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    times, losses = [], []
    for step in range(warmup + steps):
        ids = data[step % len(data)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if engine == "mics_hf":
            mics_hf.clip_grad_norm_(model, 1.0)
        elif engine == "fsdp2":  # DTensor gradients: torch's clip works on them at world 1
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # the .item() synchronises: the step is complete
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    metrics = mics_hf.comm_stats(model).as_dict() if engine == "mics_hf" else {}
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"times": times, "losses": losses, "params": n_params, "peak_gib": peak, "metrics": metrics}


def cuda_parity(device: torch.device) -> float:
    """fp32, tiny GPT-2, 3 AdamW steps: max relative parameter difference of mics_hf vs an unsharded copy."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=97, n_positions=32, n_embd=36, n_layer=2, n_head=3, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    ref = GPT2LMHeadModel(cfg).to(device)
    net = copy.deepcopy(ref)
    net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # at p = 1 in fp32 the unsharded parameters alias the shards: this checks hooks, hop 1 and the fp32
    # gradient buffers on the device; the bf16 copying path is exercised by the timed runs below
    mics_hf.shard_model(net, mics_hf.MiCSConfig(param_dtype=torch.float32))
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, eps=1e-4) for m in (net, ref)]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        ids = torch.randint(0, 97, (4, 16), generator=g).to(device)
        for m, o in zip((net, ref), opts):
            m(input_ids=ids, labels=ids).loss.backward()
            o.step()
            o.zero_grad()
    full = mics_hf.full_state_dict(net, cpu=True)
    worst = 0.0
    for k, v in ref.state_dict().items():
        v = v.detach().float().cpu()
        worst = max(worst, (full[k] - v).abs().max().item() / max(v.abs().max().item(), 1e-3))
    return worst


def tflops(n_params: int, tokens: int, seconds: float, factor: int) -> float:
    return factor * n_params * tokens / seconds / 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="gpt-1.3b")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--engines", default="bare,mics_hf,fsdp2", help="comma-separated subset of bare, mics_hf, fsdp2")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = dict(PRESETS[args.preset])
    if args.batch:
        cfg["batch"] = args.batch
    torch.backends.cuda.matmul.allow_tf32 = True
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg["vocab_size"], (4, cfg["batch"], cfg["seq"]), generator=g).to(device)
    tokens = cfg["batch"] * cfg["seq"]

    parity = cuda_parity(device)
    print(f"fp32 parity of mics_hf vs unsharded reference on {device}: max rel diff {parity:.2e} (goal <= 1e-5)")
    peak = measured_matmul_peak(device)
    print(f"measured bf16 matmul peak: {peak:.0f} TFLOP/s")

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not {"bare", "mics_hf"} <= set(engines) or not set(engines) <= {"bare", "mics_hf", "fsdp2"}:
        ap.error("--engines needs bare and mics_hf, and may add fsdp2")
    results: dict[str, dict] = {e: {"times": []} for e in engines}
    for r in range(args.rounds):
        order = engines if r % 2 == 0 else engines[::-1]
        for engine in order:
            out = run_engine(engine, cfg, device, args.steps, args.warmup, data)
            results[engine]["times"] += out["times"]
            results[engine].update({k: v for k, v in out.items() if k != "times"})
            print(f"round {r} {engine}: median step {statistics.median(out['times']) * 1e3:.1f} ms, "
                  f"first losses {[round(x, 4) for x in out['losses'][:3]]}, peak {out['peak_gib']:.1f} GiB")

    rows = []
    n = results["bare"]["params"]
    for engine in engines:
        med = statistics.median(results[engine]["times"])
        t8, t6 = tflops(n, tokens, med, 8), tflops(n, tokens, med, 6)
        rows.append({"engine": engine, "median_step_s": med, "tflops_8n": t8, "tflops_6n": t6,
                     "mfu_8n": t8 / peak, "peak_gib": results[engine]["peak_gib"]})
    by = {row["engine"]: row for row in rows}
    ratio = by["mics_hf"]["median_step_s"] / by["bare"]["median_step_s"]
    loss_gap = max(abs(a - b) for a, b in zip(results["bare"]["losses"][:3], results["mics_hf"]["losses"][:3]))
    lines = [
        f"model {args.preset}: {n / 1e9:.3f}B parameters, batch {cfg['batch']} x seq {cfg['seq']} = {tokens} tokens/step, "
        "bf16, activation checkpointing, world 1",
        "",
        "| engine | median step (ms) | TFLOPS/GPU 8N | TFLOPS/GPU 6N | MFU (8N, vs measured peak) | peak memory (GiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['engine']} | {row['median_step_s'] * 1e3:.1f} | {row['tflops_8n']:.1f} | {row['tflops_6n']:.1f} | "
                     f"{row['mfu_8n'] * 100:.1f}% | {row['peak_gib']:.1f} |")
    lines += [
        "",
        f"mics_hf / bare step time: {ratio:.3f} (goal <= 1.00) -> {'PASS' if ratio <= 1.0 else 'MISS'}",
        f"mics_hf MFU (8N): {by['mics_hf']['mfu_8n'] * 100:.1f}% (goal >= 55%) -> {'PASS' if by['mics_hf']['mfu_8n'] >= 0.55 else 'MISS'}",
        f"first 3 losses, max |bare - mics_hf|: {loss_gap:.4f} (bf16 autocast vs bf16 gathered parameters)",
        f"fp32 CUDA parity: {parity:.2e} -> {'PASS' if parity <= 1e-5 else 'FAIL'}",
    ]
    if "fsdp2" in by:
        lines.append(f"peak memory, mics_hf / FSDP2 fully_shard (world 1, same model): {by['mics_hf']['peak_gib']:.1f} / "
                     f"{by['fsdp2']['peak_gib']:.1f} GiB = {by['mics_hf']['peak_gib'] / by['fsdp2']['peak_gib']:.3f}; "
                     f"step time mics_hf / FSDP2 {by['mics_hf']['median_step_s'] / by['fsdp2']['median_step_s']:.3f}")
    exposed = {k: round(v, 4) for k, v in results["mics_hf"].get("metrics", {}).items() if k.endswith("_seconds")}
    lines.append(f"mics_hf exposed communication over its last run (CUDA events; host wait seconds): {exposed}")
    print("\n".join(lines))
    if "fsdp2" in engines:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if args.record:
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            driver = "unknown"
        import transformers

        date = datetime.date.today().isoformat()
        header = [
            f"# Single-GPU engine overhead, {date}", "",
            f"- card: {gpu}, driver {driver}, measured bf16 matmul peak {peak:.0f} TFLOP/s",
            f"- python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
            f"- command: `python benchmarks/gpu_bench.py {' '.join(sys.argv[1:])}`",
            f"- {args.rounds} rounds x {args.steps} timed steps per engine (after {args.warmup} warm-up), engines alternating",
            "", "TFLOPS count 8N (or 6N) FLOPs per token, attention excluded; MFU divides the 8N figure by the "
            "matmul rate measured above.", "",
        ]
        out, n = ROOT / "benchmarks" / f"gpu_{date}.md", 2
        while out.exists() or out.with_suffix(".json").exists():  # never overwrite: a second run gets _2, _3, ...
            out, n = ROOT / "benchmarks" / f"gpu_{date}_{n}.md", n + 1
        out.write_text("\n".join(header + lines) + "\n")
        out.with_suffix(".json").write_text(json.dumps({"rows": rows, "ratio": ratio, "peak_tflops": peak,
                                                        "parity": parity, "config": cfg, "gpu": gpu, "driver": driver}, indent=1))
        print(f"recorded {out}")


if __name__ == "__main__":
    main()
