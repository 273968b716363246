"""One rank of an emulated training run: the reduced model, slept compute, and one of three sharding strategies.

Run by ``emulate_sweep`` inside a node's namespace as ``python -m mics_hf.emulation.step --strategy ...``; it
speaks the phase protocol of ``mics_hf.emulation.cluster`` (one phase, "steps": warm-up steps, then the timed ones).

Strategies (fp32 parameters and gradient reduction, see the scaling rule; AdamW; ``grad_accum`` micro-steps):
- ``mics``: ``shard_model`` with partition size p; hierarchical collectives when p spans nodes; hop 2 once per
  optimizer step (``no_sync`` on the other micro-steps).
- ``zero3``: the same engine with p = world and flat collectives: ZeRO-3's communication schedule (every
  micro-step all-gathers and reduce-scatters across the whole world).
- ``hsdp``: PyTorch FSDP2 ``fully_shard`` on a 2-D (replicate, shard=p) mesh, one unit per layer plus the root,
  explicit one-ahead prefetch forward and backward with asynchronous all-gathers (FSDP2 overlaps through CUDA
  streams; on CPU only ``async_op`` all-gathers can overlap, so they are switched on), and
  ``set_requires_all_reduce(False)`` on all but the last micro-step: it reduce-scatters every micro-step and
  all-reduces once, MiCS's two hops without hierarchical collectives. Its reduce-scatter runs synchronously on
  CPU (FSDP2 puts it on a CUDA stream on GPUs), which the results state.

Compute is slept (see [Note: emulation scaling rule] in ``emulate_scale``): a forward hook on every layer and on
the LM head wraps the output in an autograd function that sleeps the layer's forward time, and in backward
sleeps its backward time before the layer's own gradients are produced (so the reduce-scatter cannot start
early). The hooks are registered before sharding, so they run before the engines' own post-forward hooks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from ..engine.teardown import close_process_group
from ..planning.presets import build_config, model_class, unit_class_name
from .cluster import PhaseWorker
from .scale import EmulationScale

STRATEGIES = ("mics", "zero3", "hsdp")


class _SleptCompute(torch.autograd.Function):
    """Identity whose forward sleeps `forward_s` and whose backward sleeps `backward_s` (GIL released)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, forward_s: float, backward_s: float) -> torch.Tensor:
        time.sleep(forward_s)
        ctx.backward_s = backward_s
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        time.sleep(ctx.backward_s)
        return grad, None, None


def _sleep_hook(forward_s: float, backward_s: float):
    def hook(module: nn.Module, args, output):
        if isinstance(output, torch.Tensor):
            return _SleptCompute.apply(output, forward_s, backward_s)
        first, *rest = output
        return (_SleptCompute.apply(first, forward_s, backward_s), *rest)
    return hook


def build_model(scale: EmulationScale) -> tuple[nn.Module, list[nn.Module]]:
    """The reduced model with slept compute on its layers and head; returns (model, layers in order)."""
    preset = scale.preset
    torch.manual_seed(0)
    config = build_config(preset)
    # Dropout costs real CPU time and changes nothing that is measured (the compute is slept).
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(config, name):
            setattr(config, name, 0.0)
    model = model_class(preset)(config)
    sleeps = scale.sleep_seconds()
    unit = unit_class_name(preset)
    layers = [m for m in model.modules() if type(m).__name__ == unit]
    if len(layers) != preset.layers:
        raise RuntimeError(f"found {len(layers)} {unit} modules, expected {preset.layers}")
    for layer in layers:
        layer.register_forward_hook(_sleep_hook(sleeps["layer_forward"], sleeps["layer_backward"]))
    head = model.get_output_embeddings()
    head.register_forward_hook(_sleep_hook(sleeps["root_forward"], sleeps["root_backward"]))
    return model, layers


def _shard(model: nn.Module, layers: list[nn.Module], strategy: str, p: int, k: int) -> nn.Module:
    world = dist.get_world_size()
    if strategy in ("mics", "zero3"):
        from ..config import MiCSConfig
        from ..engine.shard import shard_model

        config = MiCSConfig(
            partition_size=world if strategy == "zero3" else p, devices_per_node=k,
            hierarchical=False if strategy == "zero3" else "auto", units=(type(layers[0]),),
        )
        return shard_model(model, config)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world // p, p), mesh_dim_names=("replicate", "shard"))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for i, layer in enumerate(layers):
        if i + 1 < len(layers):
            layer.set_modules_to_forward_prefetch([layers[i + 1]])
        if i > 0:
            layer.set_modules_to_backward_prefetch([layers[i - 1]])
    model._set_unshard_async_op(True)
    return model


def _micro_step_context(model: nn.Module, strategy: str, last: bool):
    if strategy == "hsdp":
        model.set_requires_all_reduce(last)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if last else model.no_sync()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mics_hf.emulation.step")
    parser.add_argument("--strategy", choices=STRATEGIES, required=True)
    parser.add_argument("--partition-size", type=int, required=True)
    parser.add_argument("--scale", required=True, help="EmulationScale fields as JSON")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    scale = EmulationScale(**json.loads(args.scale))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, layers = build_model(scale)
        model = _shard(model, layers, args.strategy, args.partition_size, scale.ranks_per_node)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        generator = torch.Generator().manual_seed(1234 + rank)
        vocab = scale.preset.vocab
        ids = torch.randint(3, vocab, (1, scale.run_tokens), generator=generator)
        losses: list[float] = []

        def step() -> None:
            total = torch.zeros(())
            for i in range(scale.grad_accum):
                last = i == scale.grad_accum - 1
                with _micro_step_context(model, args.strategy, last):
                    loss = model(input_ids=ids, labels=ids).loss / scale.grad_accum
                    loss.backward()
                total += loss.detach().float()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(total))

        def timed() -> str:
            times = []
            before = _engine_counters(model, args.strategy)
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step()
                dist.barrier()  # a step ends when the slowest rank's does
                times.append(time.perf_counter() - t0)
            after = _engine_counters(model, args.strategy)
            per_step = {kind: {key: (value - before[kind].get(key, 0)) / args.steps for key, value in after[kind].items()}
                        for kind in after}
            return json.dumps({"step_seconds": times, "loss": losses[-1], "booked_bytes_per_step": per_step["bytes"],
                               "wait_seconds_per_step": per_step["wait_seconds"]})

        def warmup() -> None:
            for _ in range(args.warmup):
                step()

        PhaseWorker().run("steps", timed, warmup=warmup, barrier=dist.barrier)
        close_process_group()  # leave together, then close (see mics_hf.engine.teardown)
    finally:
        close_process_group(wait_for_peers=False)  # an error path: a peer may be gone


def _engine_counters(model: nn.Module, strategy: str) -> dict[str, dict]:
    """The engine's running totals: bytes this rank booked per op/link (ring model) and seconds the compute
    thread waited per op. MiCS engine only: FSDP2 keeps no such count."""
    if strategy == "hsdp":
        return {"bytes": {}, "wait_seconds": {}}
    from ..engine.stats import comm_stats

    stats = comm_stats(model)
    return {"bytes": {f"{op}/{link}": v for (op, link), v in stats.bytes.items()},
            "wait_seconds": dict(stats.wait_seconds)}


if __name__ == "__main__":
    main()
