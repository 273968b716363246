"""Conformance: the training patterns users write, each against a single-process float64 reference.

The contract (DESIGN.md, README "The contract"): for every pattern DDP (p = 1) or FSDP2 (p > 1) supports,
mics_hf computes the same gradients. The reference applies DDP's semantics by hand: it runs each rank's part
of the step on one unsharded copy of the model, one rank after the other, and divides the accumulated
gradients by the world size; what each synced backward adds is then counted exactly once, whatever the mix of
no_sync(), several backwards and rank-dependent control flow. Both sides run in float64, so they differ only
by summation order (~1e-16) and the 1e-10 bound separates any engine error from rounding.

Every case runs on 4 and 8 gloo ranks with 2 ranks per emulated node and p in {1, 2, 4}: p = 4 spans two
nodes (hierarchical collectives). Each case also checks, from comm_stats, that the reduce-scatter and replica
all-reduce bytes are exactly those of the trainable parameters: frozen parameters add none.
"""

from __future__ import annotations

import copy
import math
import warnings
from contextlib import nullcontext
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mics_hf
from distributed import DistPool, RankError
from mics_hf.engine.shard import get_state
from mics_hf.engine.unit import TAG_NUMEL
from parity import full_grads, rel_diff

D = 12  # feature width of the hand-written models; 12 rows split unevenly at p = 8 (padding)
BOUND = 1e-10


# ---- hand-written models: each block is one unit ----------------------------------------------------------
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(D, D)
        self.lin2 = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.lin2(torch.tanh(self.lin1(x)))


class LoRALinear(nn.Module):
    """A frozen base Linear with a trainable low-rank adapter beside it (the PEFT pattern, written by hand)."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(D, D)
        self.base.requires_grad_(False)
        self.a = nn.Parameter(torch.randn(2, D) * 0.1)
        self.b = nn.Parameter(torch.randn(D, 2) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.a.t() @ self.b.t()


class LoRABlock(Block):
    def __init__(self) -> None:
        super().__init__()
        self.lin1 = LoRALinear()
        self.lin2 = LoRALinear()


class BranchBlock(Block):
    """Uses `extra` only when the batch's first feature is positive: on some ranks, not others."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = super().forward(x)
        if x[:, 0].mean() > 0:
            h = h + self.extra(x)
        return h


class MoEBlock(nn.Module):
    """Two experts; a token goes to expert 0 if its first feature is positive. An expert that receives no
    token on a rank is not called there at all."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(D, D), nn.Linear(D, D)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = x[:, 0] > 0
        out = torch.zeros_like(x)
        for e, mask in enumerate((route, ~route)):
            if mask.any():
                out = out.index_put((mask.nonzero().squeeze(1),), self.experts[e](x[mask]))
        return x + out


class Net(nn.Module):
    """Input projection and head in the root unit, the blocks as units."""

    def __init__(self, block: Callable[[], nn.Module] = Block, n: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.blocks = nn.ModuleList([block() for _ in range(n)])
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h)
        return self.head(h)


class FirstUnitRaw(Net):
    """The first block sees the raw input (so its routing follows the data, not a projection of it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks[0](x)
        for blk in self.blocks[1:]:
            h = blk(h)
        return self.head(self.inp(h))


class Gated(nn.Module):
    """A unit whose only weights are used where `active`: elsewhere it runs, passes gradients through, and
    none of its parameters receives a gradient on that rank."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Linear(D, D)
        self.active = True

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.extra(h) if self.active else h * 1.0


class GatedNet(Net):
    def __init__(self) -> None:
        super().__init__()
        self.gates = nn.ModuleList([Gated() for _ in self.blocks])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for blk, gate in zip(self.blocks, self.gates):
            gate.active = bool(x[:, 0].mean() > 0)  # the rank's data decides
            h = gate(blk(h))
        return self.head(h)


class AuxUnit(Net):
    """An auxiliary block that runs on every rank but feeds the output only where the batch's first feature is
    positive: on the other ranks the whole unit ran forward and receives no gradient at all."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        extra = self.aux(x)[:, :3]
        return out + extra if x[:, 0].mean() > 0 else out


class Twice(Net):
    """Block 0 runs twice per forward (weights shared across depth)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks[0](self.blocks[0](self.inp(x)))
        for blk in self.blocks[1:]:
            h = blk(h)
        return self.head(h)


def sequential_net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(D, D), Block(), Block(), Block(), nn.Linear(D, 3))


def _tiny_hf(kind: str) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=24, n_layer=2, n_head=2, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(vocab_size=50, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=0,
                      pad_token_id=0)
    return LlamaForCausalLM(cfg)


def peft_lora(kind: str) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = ["c_attn", "c_fc"] if kind == "gpt2" else ["q_proj", "v_proj", "up_proj"]
    model = get_peft_model(_tiny_hf(kind), LoraConfig(r=2, lora_alpha=4, target_modules=targets, lora_dropout=0.0,
                                                       init_lora_weights=False, fan_in_fan_out=kind == "gpt2"))
    return model


# ---- the step patterns ------------------------------------------------------------------------------------
def _loss(model: nn.Module, batch: dict) -> torch.Tensor:
    if "ids" in batch:
        return model(input_ids=batch["ids"], labels=batch["ids"]).loss
    return F.mse_loss(model(batch["x"]), batch["y"])


def _sync_ctx(model: nn.Module, sharded: bool):
    return model.no_sync() if sharded else nullcontext()


def one_step(model, batches, sharded):
    _loss(model, batches[0]).backward()


def accum_no_sync(model, batches, sharded):
    with _sync_ctx(model, sharded):
        (_loss(model, batches[0]) / 2).backward()
    (_loss(model, batches[1]) / 2).backward()


def accum_synced(model, batches, sharded):
    """Two backwards before one step and no no_sync(): each synced backward adds its gradients once (DDP)."""
    (_loss(model, batches[0]) / 2).backward()
    (_loss(model, batches[1]) / 2).backward()


def three_backwards_mixed(model, batches, sharded):
    (_loss(model, batches[0]) / 3).backward()
    with _sync_ctx(model, sharded):
        (_loss(model, batches[1]) / 3).backward()
    (_loss(model, batches[0]) / 3).backward()


def two_losses_one_forward(model, batches, sharded):
    out = model(batches[0]["x"])
    F.mse_loss(out[:2], batches[0]["y"][:2]).backward(retain_graph=True)
    F.mse_loss(out[2:], batches[0]["y"][2:]).backward()


def discarded_forward(model, batches, sharded):
    _loss(model, batches[1])  # a forward with gradients enabled whose loss is dropped
    _loss(model, batches[0]).backward()


def eval_between(model, batches, sharded):
    with _sync_ctx(model, sharded):
        (_loss(model, batches[0]) / 2).backward()
    with torch.no_grad():
        _loss(model, batches[1])
    (_loss(model, batches[1]) / 2).backward()


def checkpointed(model, batches, sharded):
    """Activation checkpointing around each block, reentrant and not, with accumulation."""
    blocks = model.blocks
    calls = {}
    for i, blk in enumerate(blocks):
        original = blk.forward
        reentrant = i % 2 == 0
        calls[i] = original
        blk.forward = lambda x, _f=original, _r=reentrant: torch.utils.checkpoint.checkpoint(_f, x, use_reentrant=_r)
    try:
        accum_no_sync(model, batches, sharded)
    finally:
        for i, blk in enumerate(blocks):
            blk.forward = calls[i]


def _freeze_block0(model: nn.Module) -> None:
    model.blocks[0].requires_grad_(False)


def _freeze_after_shard(model: nn.Module) -> None:
    model.blocks[1].lin2.requires_grad_(False)


CASES: dict[str, dict] = {
    "accum_no_sync": dict(build=Net, step=accum_no_sync),
    "accum_without_no_sync": dict(build=Net, step=accum_synced),
    "three_backwards_mixed": dict(build=Net, step=three_backwards_mixed),
    "two_losses_one_forward": dict(build=Net, step=two_losses_one_forward),
    "lora_by_hand": dict(build=lambda: Net(LoRABlock), step=accum_synced),
    "frozen_unit": dict(build=Net, step=accum_no_sync, freeze=_freeze_block0),
    "frozen_after_sharding": dict(build=Net, step=one_step, freeze_after=_freeze_after_shard),
    "unused_on_one_rank": dict(build=lambda: FirstUnitRaw(BranchBlock), step=accum_no_sync),
    "moe_empty_expert": dict(build=lambda: FirstUnitRaw(MoEBlock), step=accum_synced),
    "unit_without_gradients_on_some_ranks": dict(build=GatedNet, step=accum_no_sync, units=(Block, Gated)),
    "discarded_forward": dict(build=Net, step=discarded_forward),
    "eval_between_micro_steps": dict(build=Net, step=eval_between),
    "unit_called_twice": dict(build=Twice, step=accum_no_sync),
    "sequential_model": dict(build=sequential_net, step=accum_synced),
    "activation_checkpointing": dict(build=Net, step=checkpointed),
}


def _data(world: int, *, hf: bool) -> list[list[dict]]:
    """Two micro-batches per rank. Rank 0's inputs have a positive first feature, the others' a negative one:
    BranchBlock's extra weights and MoEBlock's second expert get gradients on some ranks only."""
    g = torch.Generator().manual_seed(3)
    out = []
    for r in range(world):
        batches = []
        for _ in range(2):
            if hf:
                batches.append({"ids": torch.randint(0, 50, (2, 8), generator=g)})
                continue
            x = torch.randn(4, D, generator=g, dtype=torch.float64)
            x[:, 0] = x[:, 0].abs() + 0.1 if r == 0 else -x[:, 0].abs() - 0.1
            batches.append({"x": x, "y": torch.randn(4, 3, generator=g, dtype=torch.float64)})
        out.append(batches)
    return out


def _trainable_bytes(net: nn.Module, p: int, r: int) -> tuple[int, int]:
    """Reduce-scatter and replica all-reduce bytes one backward must book, from the model's trainable
    parameters alone: per unit with any, ring bytes of p blocks of ceil(d0/p) rows (+ the unit's tag)."""
    rs = ar = 0
    for _, unit in get_state(net).units:
        trainable = [sp for sp in unit.params if sp.sharded.requires_grad]
        if not trainable:
            continue
        seg = sum(math.ceil(sp.global_shape[0] / p) * math.prod(sp.global_shape[1:]) if len(sp.global_shape) else 1
                  for sp in trainable) + TAG_NUMEL
        rs += (p - 1) * seg * 8
        ar += 2 * (r - 1) * seg * 8 // r
    return rs, ar


def _run_case(rank: int, world: int, *, case: str, p: int, hf: str | None = None) -> dict:
    spec = CASES.get(case, {}) if hf is None else dict(step=accum_no_sync)
    torch.manual_seed(0)
    model = (peft_lora(hf) if hf else spec["build"]()).double()
    if "freeze" in spec:
        spec["freeze"](model)
    ref = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = mics_hf.shard_model(model, mics_hf.MiCSConfig(partition_size=p, devices_per_node=2, units=spec.get("units")))
    if "freeze_after" in spec:  # requires_grad changed on the sharded model, as users do for fine-tuning
        spec["freeze_after"](net)
        spec["freeze_after"](ref)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    data = _data(world, hf=hf is not None)
    stats = mics_hf.comm_stats(net)
    stats.reset()
    state = get_state(net)
    backwards_before, hop2_before = state.num_backwards, state.num_hop2
    spec["step"](net, data[rank], True)
    num_backwards, num_hop2 = state.num_backwards - backwards_before, state.num_hop2 - hop2_before
    grads = full_grads(net)
    rs_bytes, ar_bytes = stats.total_bytes("reduce_scatter"), stats.total_bytes("all_reduce")
    opt.step()
    params = mics_hf.full_state_dict(net, rank0_only=False)
    for r in range(world):  # DDP's semantics by hand: every rank's part of the step, then the average
        spec["step"](ref, data[r], False)
    for prm in ref.parameters():
        if prm.grad is not None:
            prm.grad /= world
    torch.optim.SGD([q for q in ref.parameters() if q.requires_grad], lr=0.1).step()
    zeros = torch.zeros(())
    grad_diff = max(rel_diff(grads[k], q.grad if q.grad is not None else zeros.expand_as(q))
                    for k, q in ref.named_parameters(remove_duplicate=False))
    ref_sd = ref.state_dict()
    param_diff = max(rel_diff(params[k], ref_sd[k]) for k in ref_sd)
    want_rs, want_ar = _trainable_bytes(net, p, world // p)
    return {
        "grad": grad_diff,
        "param": param_diff,
        "rs": rs_bytes, "want_rs": want_rs * num_backwards,
        "ar": ar_bytes, "want_ar": want_ar * num_hop2,
        "units": sorted(u.label for _, u in state.units),
    }


def _check(results: list[dict], case: str) -> None:
    for r, res in enumerate(results):
        assert res["grad"] <= BOUND, f"{case}: rank {r} gradient differs from DDP's by {res['grad']:.3g}"
        assert res["param"] <= BOUND, f"{case}: rank {r} parameters differ after a step by {res['param']:.3g}"
        if case != "unit_called_twice":  # its shared unit is reduced once per call: more bytes, still only trainable
            assert res["rs"] == res["want_rs"], f"{case}: rank {r} reduce-scatter bytes {res['rs']} != {res['want_rs']}"
            assert res["ar"] == res["want_ar"], f"{case}: rank {r} replica all-reduce bytes {res['ar']} != {res['want_ar']}"
        if case == "sequential_model":
            assert res["units"] == ["1", "2", "3", "<root>"], res["units"]  # the three Blocks, found in a Sequential


@pytest.mark.parametrize("world", [4, 8])
@pytest.mark.parametrize("p", [1, 2, 4])
def test_conformance_matrix(pools, world, p):
    pool = pools(world)
    failures = []
    for case in CASES:
        try:
            _check(pool.run(_run_case, case=case, p=p), case)
        except (AssertionError, RankError) as exc:
            failures.append(f"{case}: {exc}"[:2000])
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("p", [1, 2, 4])
def test_peft_lora(pools, kind, p):
    """PEFT's LoRA on tiny Hugging Face GPT-2 and Llama: only the adapters are reduced, and they match DDP."""
    for r, res in enumerate(pools(4).run(_run_case, case=f"peft-{kind}", p=p, hf=kind)):
        assert res["grad"] <= BOUND and res["param"] <= BOUND, (kind, p, r, res["grad"], res["param"])
        assert res["rs"] == res["want_rs"] and res["ar"] == res["want_ar"], (kind, p, r, res)


# ---- a unit that runs on some ranks only -------------------------------------------------------------------
class LayerDrop(Net):
    """Rank 1 skips block 1 (layer drop decided per rank): the ranks no longer run the same units."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for i, blk in enumerate(self.blocks):
            if not (i == 1 and torch.distributed.get_rank() == 1):
                h = blk(h)
        return self.head(h)


def _layer_drop_step(rank: int, world: int, *, p: int, model: str = "layer_drop") -> str:
    torch.manual_seed(0)
    build = {"layer_drop": LayerDrop, "aux": AuxUnit}[model]
    net = mics_hf.shard_model(build().double(), mics_hf.MiCSConfig(partition_size=p, devices_per_node=2))
    batch = _data(world, hf=False)[rank][0]
    _loss(net, batch).backward()
    return "finished"


@pytest.mark.parametrize("model, p", [("layer_drop", 1), ("layer_drop", 2), ("layer_drop", 4), ("aux", 4)])
def test_unit_skipped_on_one_rank_fails_on_every_rank_naming_the_unit(model, p):
    """Never mixed gradients: every rank raises within the group timeout, and the error names a unit.

    layer_drop: rank 1 skips a block. aux: a block whose output reaches the loss on rank 0 only, so at p = 4
    (hierarchical) only rank 0 runs its backward's gathers in that order (FSDP2 would hang there). Whether
    such a pattern happens to pair its collectives consistently depends on the prefetch order; the tags make
    the outcome either correct or this error, never mixed data."""
    with DistPool(4, timeout=120.0, pg_timeout=10.0) as pool:
        with pytest.raises(RankError) as info:
            pool.run(_layer_drop_step, p=p, model=model)
        pool.close(force=True)
    errors = info.value.errors
    assert sorted(errors) == [0, 1, 2, 3], f"ranks that did not fail: {sorted(set(range(4)) - set(errors))}"
    for rank, message in errors.items():
        assert "CollectiveError" in message and ("blocks." in message or "'aux'" in message), f"rank {rank}: {message[:600]}"


# ---- unit discovery ----------------------------------------------------------------------------------------
class Flat(nn.Module):
    """No repeated block: everything would sit in the root unit."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(D, 4 * D)
        self.b = nn.Linear(4 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _discovery(rank: int, world: int) -> dict:
    out = {}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        mics_hf.shard_model(Flat(), mics_hf.MiCSConfig(partition_size=2, devices_per_node=2))
    out["flat_warning"] = [str(w.message) for w in seen if "root unit" in str(w.message)]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        named = mics_hf.shard_model(Net(), mics_hf.MiCSConfig(partition_size=2, devices_per_node=2, units=("blocks.0", "head", Block)))
    out["named_units"] = sorted(u.label for _, u in get_state(named).units)
    out["named_warning"] = [str(w.message) for w in seen if "root unit" in str(w.message)]
    try:
        mics_hf.shard_model(Net(), mics_hf.MiCSConfig(partition_size=2, devices_per_node=2, units=("blocks.7", "Block")))
    except ValueError as exc:
        out["bad_name"] = str(exc)
    return out


def test_units_by_class_or_module_name_and_a_warning_for_a_heavy_root(pools):
    for res in pools(4).run(_discovery):
        assert len(res["flat_warning"]) == 1 and "units=" in res["flat_warning"][0], res["flat_warning"]
        assert res["named_units"] == ["<root>", "blocks.0", "blocks.1", "blocks.2", "head"], res["named_units"]
        assert res["named_warning"] == []
        assert "['blocks.7']" in res["bad_name"] and "module names" in res["bad_name"], res["bad_name"]


# ---- torch.nn.utils.clip_grad_norm_ on the shards -------------------------------------------------------------
# Its numbers against the reference are in test_parity.py (clip_with="torch"); here what it must refuse or leave
# alone: see [Note: torch's clip_grad_norm_ on MiCS shards] in mics_hf.engine.clipping.
def _torch_clip(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    net = mics_hf.shard_model(Net().double(), mics_hf.MiCSConfig(partition_size=2, devices_per_node=2))
    whole = mics_hf.shard_model(Net().double(), mics_hf.MiCSConfig(partition_size=1, devices_per_node=2))  # p = 1
    twin = mics_hf.shard_model(Net().double(), mics_hf.MiCSConfig(partition_size=2, devices_per_node=2))
    other = mics_hf.shard_model(Net().double(), mics_hf.MiCSConfig(partition_size=4, devices_per_node=2))
    for model in (net, whole, twin, other):
        _loss(model, _data(world, hf=False)[rank][0]).backward()
    out = {}
    for label, params in (("mixed", [*net.parameters(), nn.Parameter(torch.ones(3))]),
                          ("two_models", [*net.parameters(), *other.parameters()])):
        try:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        except ValueError as exc:
            out[label] = str(exc)
    # tensors that are no MiCS shards, and a p = 1 model's whole tensors, take torch's own path unchanged
    plain = nn.Parameter(torch.full((4,), 3.0))
    plain.grad = torch.full((4,), 3.0)
    out["plain"] = float(torch.nn.utils.clip_grad_norm_([plain], 1e9))
    whole_norm = float(torch.nn.utils.clip_grad_norm_(whole.parameters(), 1e9))
    out["whole"] = abs(whole_norm - float(mics_hf.clip_grad_norm_(whole, 1e9)))
    sharded_norm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), 1e9))
    out["sharded"] = abs(sharded_norm - float(mics_hf.clip_grad_norm_(net, 1e9)))
    # two models with the same layout share their partition group: one global norm over both
    both = float(torch.nn.utils.clip_grad_norm_([*net.parameters(), *twin.parameters()], 1e9))
    out["both"] = abs(both - math.hypot(sharded_norm, float(mics_hf.clip_grad_norm_(twin, 1e9))))
    # a non-finite element in one shard (and its replica, as hop 2 leaves it) makes every rank's global norm
    # non-finite: all raise together
    if rank % 2 == 0:  # position 0 of each partition group {0, 1}, {2, 3}
        next(q for q in net.parameters() if q.grad is not None and q.grad.numel()).grad.view(-1)[0] = math.nan
    try:
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0, error_if_nonfinite=True)
    except RuntimeError as exc:
        out["nonfinite"] = str(exc)
    return out


def test_torch_clip_grad_norm_refuses_a_mix_and_leaves_other_tensors_alone(pools):
    for res in pools(4).run(_torch_clip):
        assert "mixed with tensors that are not MiCS shards" in res["mixed"], res
        assert "mixed with shards split over a different partition group" in res["two_models"], res
        assert "mics_hf.clip_grad_norm_(model, max_norm)" in res["mixed"], res
        assert res["plain"] == pytest.approx(6.0)  # torch's own 2-norm of four 3s
        assert res["whole"] < 1e-12 and res["sharded"] < 1e-12 and res["both"] < 1e-12, res
        assert "global norm (order 2.0) is nan" in res["nonfinite"], res


# ---- an optimizer built before shard_model -------------------------------------------------------------------
def _stale_optimizer(rank: int, world: int, *, p: int) -> dict:
    torch.manual_seed(0)
    model = Net().double()
    early = torch.optim.SGD(model.parameters(), lr=0.1)  # DDP order: fine there, stale here
    net = mics_hf.shard_model(model, mics_hf.MiCSConfig(partition_size=p, devices_per_node=2))
    late = torch.optim.SGD(net.parameters(), lr=0.1)
    _loss(net, _data(world, hf=False)[rank][0]).backward()
    out = {}
    try:
        early.step()
    except RuntimeError as exc:
        out["early"] = str(exc)
    weights = mics_hf.full_state_dict(net, rank0_only=False)
    late.step()  # the optimizer built on the shards updates every weight
    after = mics_hf.full_state_dict(net, rank0_only=False)
    out["late_moved"] = all(not torch.equal(weights[k], after[k]) for k in weights)
    return out


@pytest.mark.parametrize("p", [1, 2])
def test_an_optimizer_built_before_sharding_fails_at_its_first_step(pools, p):
    for res in pools(2).run(_stale_optimizer, p=p):
        assert "holds parameter 'inp.weight' as it was before mics_hf.shard_model" in res["early"], res
        assert "Build the optimizer after shard_model" in res["early"], res
        assert res["late_moved"], res


# ---- copying a sharded model ----------------------------------------------------------------------------------
def _copies(rank: int, world: int) -> dict:
    import io
    import pickle

    net = mics_hf.shard_model(Net(), mics_hf.MiCSConfig(partition_size=2, devices_per_node=2))
    out = {}
    for label, attempt in (("deepcopy", lambda: copy.deepcopy(net)),  # was a segfault inside torch
                           ("ema", lambda: torch.optim.swa_utils.AveragedModel(net)),
                           ("torch.save", lambda: torch.save(net, io.BytesIO())),
                           ("pickle", lambda: pickle.dumps(net))):
        try:
            attempt()
        except TypeError as exc:
            out[label] = str(exc)
    return out


def test_a_sharded_model_refuses_to_be_copied_or_pickled_naming_the_way_out(pools):
    for res in pools(2).run(_copies):
        for label in ("deepcopy", "ema"):
            assert "cannot be deep-copied" in res[label] and "copy the model before shard_model" in res[label], res
        for label in ("torch.save", "pickle"):
            assert "cannot be pickled" in res[label] and "mics_hf.save_checkpoint" in res[label], res


# ---- a model loaded in bf16 ---------------------------------------------------------------------------------
def _bf16_loaded(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = Net().to(torch.bfloat16)
    ref = copy.deepcopy(model)
    net = mics_hf.shard_model(model, mics_hf.MiCSConfig(partition_size=2, devices_per_node=2))
    unit = get_state(net).units[0][1]
    data = _data(world, hf=False)
    bf16 = lambda b: {k: v.to(torch.bfloat16) for k, v in b.items()}  # noqa: E731
    accum_no_sync(net, [bf16(b) for b in data[rank]], True)
    for r in range(world):
        accum_no_sync(ref, [bf16(b) for b in data[r]], False)
    grads = full_grads(net)
    diff = max(rel_diff(grads[k], q.grad.float() / world) for k, q in ref.named_parameters())
    return {"compute": str(unit.params[0].unsharded.dtype), "master": str(unit.params[0].sharded.dtype), "diff": diff}


def test_a_model_loaded_in_bf16_computes_in_bf16_with_fp32_masters(pools):
    # Bound: bf16 has 8 bits of mantissa (relative step 2^-8 = 3.9e-3); the reference sums in bf16 rank by
    # rank, the engine reduces in fp32, so they differ by a few bf16 steps; measured 8.9e-3 (4 ranks, p = 2).
    for res in pools(4).run(_bf16_loaded):
        assert res["compute"] == "torch.bfloat16" and res["master"] == "torch.float32", res
        assert res["diff"] <= 5e-2, res


# ---- torch.compile of each unit ------------------------------------------------------------------------------
def _compiled(rank: int, world: int) -> dict:
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = Net().double()
    ref = copy.deepcopy(model)
    net = mics_hf.shard_model(model, mics_hf.MiCSConfig(partition_size=2, devices_per_node=2, compile={"backend": "aot_eager"}))
    data = _data(world, hf=False)
    for _ in range(2):  # the second step runs the compiled code again (no recompilation for new storage)
        accum_no_sync(net, data[rank], True)
        for r in range(world):
            accum_no_sync(ref, data[r], False)
    grads = full_grads(net)
    diff = max(rel_diff(grads[k], q.grad / world) for k, q in ref.named_parameters())
    return {"diff": diff, "frames": int(torch._dynamo.utils.counters["stats"]["unique_graphs"])}


def test_torch_compile_per_unit_keeps_parity(pools):
    for res in pools(4).run(_compiled):
        assert res["diff"] <= BOUND, res
        assert res["frames"] >= 1, f"dynamo compiled no unit: {res}"


def test_accelerate_dynamo_and_trainer_torch_compile_compile_each_unit(tmp_path):
    """Accelerate's dynamo backend and the Trainer's --torch_compile reach MiCS as per-unit compilation (a
    whole-model torch.compile would trace the hooks); a world of one, no process group needed."""
    import torch._dynamo
    from datasets import Dataset

    from mics_hf import MiCSAccelerator, MiCSTrainer, MiCSTrainingArguments
    from models import tiny_gpt2

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    accelerator = MiCSAccelerator(mics={"prefetch": True}, dynamo_backend="eager", cpu=True)
    assert accelerator.mics_config.compile == {"backend": "eager"}
    model = accelerator.prepare(tiny_gpt2())
    ids = torch.randint(0, 97, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1

    args = MiCSTrainingArguments(
        output_dir=str(tmp_path), mics="{}", torch_compile=True, torch_compile_backend="eager", use_cpu=True,
        report_to=[], max_steps=1, per_device_train_batch_size=2, save_strategy="no", logging_steps=1,
    )
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    trainer = MiCSTrainer(model=tiny_gpt2(), args=args, train_dataset=data)
    assert trainer.accelerator.mics_config.compile == {"backend": "eager"}
    torch._dynamo.utils.counters.clear()
    trainer.train()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1


def _stale_after_discarded_forward(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    ref = Net().double()
    # float64 masters computing in float32: a gathered copy is distinguishable from a shard by its dtype
    cfg = mics_hf.MiCSConfig(partition_size=2, devices_per_node=2, param_dtype=torch.float32)
    net = mics_hf.shard_model(copy.deepcopy(ref), cfg)
    shards = list(net.parameters())  # what an optimizer holds
    x = _data(world, hf=False)[rank][0]["x"]
    net(x)  # gradients enabled, loss dropped: the root unit stays gathered until something reshards it
    state = mics_hf.full_state_dict(net, rank0_only=False)  # must read the shards, not the gathered copies
    ref_state = ref.state_dict()
    state_diff = max(rel_diff(state[k], ref_state[k]) for k in ref_state)  # before the shards change below
    with torch.no_grad():
        for q in shards:  # what an optimizer step or a checkpoint load does to the shards
            q.add_(0.5)
        for q in ref.parameters():
            q.add_(0.5)
        out, want = net(x), ref(x)
    return {
        "state_dtypes": sorted({str(v.dtype) for v in state.values()}),
        "state": state_diff,
        "out": rel_diff(out, want),
    }


def test_a_discarded_forward_leaves_nothing_stale(pools):
    """After a forward whose loss is dropped, state dicts read the shards and the next forward sees new weights
    (float32 compute against the float64 reference: 1e-5; a stale root is off by the 0.5 added)."""
    for res in pools(4).run(_stale_after_discarded_forward):
        assert res["state_dtypes"] == ["torch.float64"] and res["state"] == 0.0, res
        assert res["out"] <= 1e-5, res
