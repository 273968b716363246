"""The parity recipe: the same seed, model and global batches through mics_hf and a single-process reference.

Each rank trains its sharded copy on its slice of every global batch and, beside it, a full reference model
on the whole global batch, and reports per-tensor relative differences (max |diff| / max |ref|) of the
parameters after the optimizer steps, of the first step's gradients, and of every step's loss.

`dtype=torch.float64` runs both sides in float64 (the engine keeps float64 masters for a float64 model): the
reference and the engine then differ only by summation order at ~1e-16, which three AdamW steps amplify to
~1e-12 at most, so a strict bound far below any engine error cannot be moved by a dependency's rounding change.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Callable

import torch
import torch.distributed as dist

import mics_hf
from mics_hf.engine.shard import get_state
from mics_hf.checkpoint.state_dict import gather_full_param
from models import global_batches, tiny_bert, tiny_gpt2

BUILDERS: dict[str, Callable[..., torch.nn.Module]] = {"gpt2": tiny_gpt2, "bert": tiny_bert}


def loss_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    # BERT: every position is a target (no random mask) so each rank's mean has the same token count and the
    # mean of the ranks' losses is exactly the global-batch loss.
    return model(input_ids=ids, labels=ids).loss


def rel_diff(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref|, with max |ref| floored at 1e-3.

    The floor matters for tensors whose exact gradient is zero, such as BERT's attention key biases (softmax
    ignores a constant added to every key): both sides then hold rounding noise of ~1e-10 and a pure ratio
    would compare noise with noise.
    """
    scale = max(ref.detach().abs().max().item(), 1e-3)
    return (a.detach().double() - ref.detach().double()).abs().max().item() / scale


def full_grads(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full fp32 gradients gathered from the shard gradients, under every name the unsharded model uses."""
    state = get_state(net)
    by_id = {}
    for _, g in state.units:
        for sp in g.params:
            grad = sp.sharded.grad if sp.sharded.grad is not None else torch.zeros_like(sp.sharded)
            by_id[id(sp.sharded)] = gather_full_param(sp, g.groups.partition.pg, state.topology.partition_size, grad)
    return {name: by_id[id(p)] for name, p in net.named_parameters(remove_duplicate=False)}


def full_optimizer_state(net: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer state of every parameter at full size (sharded tensors gathered, scalars as they are)."""
    state = get_state(net)
    out = {}
    for _, g in state.units:
        for sp in g.params:
            for key, value in opt.state[sp.sharded].items():
                if value.dim() > 0:
                    out[f"{sp.fqn}/{key}"] = gather_full_param(sp, g.groups.partition.pg, state.topology.partition_size, value)
                else:
                    out[f"{sp.fqn}/{key}"] = value.clone()
    return out


def run_parity(
    rank: int,
    world: int,
    *,
    model: str = "gpt2",
    partition_size: int | None,
    devices_per_node: int,
    hierarchical: str | bool = "auto",
    accum: int = 1,
    steps: int = 3,
    micro: int = 2,
    checkpointing: bool = False,
    param_dtype: torch.dtype | None = None,
    prefetch: bool = True,
    clip: float | None = None,
    norm_type: float = 2.0,
    clip_with: str = "mics",
    dtype: torch.dtype = torch.float32,
) -> dict:
    torch.use_deterministic_algorithms(True)
    ref = BUILDERS[model]().to(dtype)
    net = copy.deepcopy(ref)
    if checkpointing:
        for m in (ref, net):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
            m.train()
    cfg = mics_hf.MiCSConfig(
        partition_size=partition_size, devices_per_node=devices_per_node, hierarchical=hierarchical,
        param_dtype=param_dtype, prefetch=prefetch,
    )
    mics_hf.shard_model(net, cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, eps=1e-4, weight_decay=0.01)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, eps=1e-4, weight_decay=0.01)
    data = global_batches(steps=steps, accum=accum, world=world, micro=micro)
    loss_diffs: list[float] = []
    grad_diff = 0.0
    norm_diffs: list[float] = [0.0]
    for step in range(steps):
        mine = torch.zeros((), dtype=torch.float64)
        theirs = torch.zeros((), dtype=torch.float64)
        for m in range(accum):
            with net.no_sync() if m < accum - 1 else nullcontext():
                loss = loss_of(net, data[step, m, rank]) / accum
                loss.backward()
            mine += loss.detach().double()
            ref_loss = loss_of(ref, data[step, m].reshape(-1, data.shape[-1])) / accum
            ref_loss.backward()
            theirs += ref_loss.detach().double()
        if clip is not None:
            if clip_with == "torch":  # the PyTorch-docs call, on the sharded model's own parameters
                norm = torch.nn.utils.clip_grad_norm_(net.parameters(), clip, norm_type=norm_type)
            else:
                norm = mics_hf.clip_grad_norm_(net, clip, norm_type=norm_type)
            ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip, norm_type=norm_type)
            norm_diffs.append(abs(norm.item() - ref_norm.item()) / ref_norm.item())
        dist.all_reduce(mine, op=dist.ReduceOp.SUM)
        loss_diffs.append(abs(mine.item() / world - theirs.item()) / abs(theirs.item()))
        if step == 0:
            grads = full_grads(net)
            grad_diff = max(rel_diff(grads[k], p.grad) for k, p in ref.named_parameters(remove_duplicate=False))
        opt.step()
        ref_opt.step()
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
    full = mics_hf.full_state_dict(net, rank0_only=False)
    ref_sd = ref.state_dict()
    assert set(full) == set(ref_sd), f"state dict keys differ: {set(full) ^ set(ref_sd)}"
    return {
        "param_diff": max(rel_diff(full[k], ref_sd[k]) for k in ref_sd),
        "loss_diff": max(loss_diffs),
        "grad_diff": grad_diff,
        "hop2": mics_hf.engine.stats.num_hop2(net),
        "norm_diff": max(norm_diffs),
    }
