"""Per-step training metrics for the recipes: computed on every rank, written by rank 0.

Every step goes to a JSONL file (always), to a tqdm progress bar, and to the Accelerate trackers (W&B with
`--report_to wandb`). The throughput figures follow the paper's convention (8N FLOPs per token: 6N for
forward and backward plus 2N of recomputation under activation checkpointing) with 6N and Megatron's formula
beside it, so numbers can be compared with the paper and with other systems.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mics_hf.planning.flops import megatron_tflops_per_gpu, mfu, peak_tflops, tflops_per_gpu


def peak_memory_gib(device: torch.device) -> float:
    """CUDA allocator peak on GPUs; the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


class StepMetrics:
    """Turns one optimizer step's measurements into the logged dict (see module docstring)."""

    def __init__(self, *, n_params: int, num_gpus: int, batch_per_rank: int, seq: int, layers: int, hidden: int,
                 vocab: int, checkpointing: bool, device: torch.device, dtype: str) -> None:
        self.n_params = n_params
        self.num_gpus = num_gpus
        self.global_batch = batch_per_rank * num_gpus
        self.seq = seq
        self.shape = dict(layers=layers, hidden=hidden, vocab=vocab)
        self.checkpointing = checkpointing
        self.device = device
        self.peak = peak_tflops(device_name(device), dtype) if device.type == "cuda" else None

    def __call__(self, *, step: int, loss: float, lr: float, grad_norm: float, seconds: float,
                 exposed_comm_s: float, comm: dict[str, float]) -> dict[str, Any]:
        tokens = self.global_batch * self.seq
        t8 = tflops_per_gpu(self.n_params, tokens, seconds, self.num_gpus, factor=8)
        out: dict[str, Any] = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "step_time_s": seconds,
            "compute_time_s": max(seconds - exposed_comm_s, 0.0),
            "exposed_comm_time_s": exposed_comm_s,
            "samples_per_s": self.global_batch / seconds,
            "tokens_per_s": tokens / seconds,
            "tflops_per_gpu_8n": t8,
            "tflops_per_gpu_6n": tflops_per_gpu(self.n_params, tokens, seconds, self.num_gpus, factor=6),
            "tflops_per_gpu_megatron": megatron_tflops_per_gpu(
                batch=self.global_batch, seq=self.seq, seconds=seconds, num_gpus=self.num_gpus,
                checkpointing=self.checkpointing, **self.shape,
            ),
            "mfu_8n": mfu(t8, self.peak),
            "peak_memory_gib": peak_memory_gib(self.device),
        }
        out.update(comm)
        return out


class MetricsWriter:
    """Rank 0 writes JSONL lines and a progress bar; `accelerator.log` feeds the trackers (W&B)."""

    def __init__(self, accelerator: Any, path: Path, total_steps: int, start_step: int = 0) -> None:
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self.bar = None
        if self.main:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", buffering=1)
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def write(self, row: dict[str, Any]) -> None:
        self.accelerator.log({k: v for k, v in row.items() if v is not None and k != "step"}, step=row["step"])
        if not self.main:
            return
        self.rows.append(row)
        self.file.write(json.dumps(row) + "\n")
        assert self.bar is not None
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}", tflops=f"{row['tflops_per_gpu_8n']:.2f}")

    def close(self) -> None:
        if self.main:
            self.file.close()
            if self.bar is not None:
                self.bar.close()


def mean_over_ranks(value: torch.Tensor) -> float:
    if dist.is_available() and dist.is_initialized():
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


class Stopwatch:
    """Wall time of a step, measured after the device finished its work."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.t0 = 0.0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - self.t0


def summary_table(rows: list[dict[str, Any]], skip: int = 2) -> str:
    """The end-of-run table: medians over steps after the first `skip` (warm-up) steps."""
    import statistics

    body = rows[skip:] or rows
    if not body:
        return "no steps were run"

    def med(key: str) -> float:
        values = [r[key] for r in body if r.get(key) is not None]
        return statistics.median(values) if values else float("nan")

    lines = [
        f"steps {rows[0]['step']}..{rows[-1]['step']}   loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}",
        f"step time {med('step_time_s') * 1e3:.0f} ms (exposed communication {med('exposed_comm_time_s') * 1e3:.0f} ms)   "
        f"{med('samples_per_s'):.1f} samples/s   {med('tokens_per_s'):.0f} tokens/s",
        f"TFLOPS per GPU: {med('tflops_per_gpu_8n'):.3f} (8N, the paper's)   {med('tflops_per_gpu_6n'):.3f} (6N)   "
        f"{med('tflops_per_gpu_megatron'):.3f} (Megatron)",
        "communication per step (this rank, MiB):",
    ]
    comm_keys = sorted({k for r in body for k in r if k.startswith("mics/comm/") and k.endswith("/bytes")})
    for key in comm_keys:
        lines.append(f"  {key.removeprefix('mics/comm/').removesuffix('/bytes'):32s} {med(key) / 2**20:10.2f}")
    return "\n".join(lines)
