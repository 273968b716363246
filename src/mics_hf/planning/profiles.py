"""Implementation profiles: how a ZeRO-3 implementation issues its collectives, read from its code, and a
step simulator that turns a profile into a predicted step time.

``costmodel.predict`` models a well-overlapped, per-unit schedule (what mics_hf and FSDP2 do): profile
``mics_hf``. The paper's ZeRO-3 numbers were measured on DeepSpeed v0.5.6, which issued its collectives very
differently; profile ``deepspeed-0.5.6`` describes that code, profile ``deepspeed-improved`` the same code after
DeepSpeed PR 1453 (merged 2022-01-20, first released in v0.6.0). Every field of a profile is traced to a line of
code or a public measurement in ``PROFILE_SOURCES``; none was chosen by looking at the paper's claims.

[Note: what DeepSpeed v0.5.6's ZeRO-3 does per sub-module]
Hooks sit on every ``nn.Module`` (``stage3.py``, ``_register_hooks_recursively``), so a "sub-module" is a
leaf such as one ``Linear``. Before its forward (``pre_sub_module_forward_function``), ``fetch_sub_module``
all-gathers the parameters not yet present, one collective per tensor over the whole data-parallel group
(``partition_parameters.py``, ``_allgather_params_coalesced``: one ``_all_gather_base`` per parameter), then
``_synchronize_communication`` waits for them and calls ``comm_stream.synchronize()`` and
``torch.cuda.synchronize()``: the host waits for every stream, so reductions launched earlier must finish too.
As written, ``prefetch_next_sub_modules`` would then gather the next parameters of the recorded trace (up to
``stage3_prefetch_bucket_size`` elements) only ``if not self.in_flight_handles``, one ``_allgather_param`` per
tensor, each beginning with ``torch.cuda.synchronize()``; and after a sub-module's forward ``release_sub_module``
would keep a tensor whose sub-module the trace reuses within ``stage3_max_reuse_distance`` elements
(``_keep_for_later``). Neither runs in v0.5.6: both look the sub-module up in the trace at a step counter that is
one behind ([Note: v0.5.6's step counter is one behind its trace]). What remains is still an overlap of one: the
host reaches the next sub-module's fetch while the current one computes, so that gather runs beside the compute
until the fetch's device-wide sync. Tensors under ``stage3_param_persistence_threshold`` are not released by
sub-modules (``persistent_parameters``). Gradients
(``reduce_independent_p_g_buckets_and_remove_grads``) fill a ``reduce_bucket_size`` bucket; when it overflows,
``reduce_ipg_grads`` waits on ``reduction_stream.synchronize()`` and reduce-scatters the bucket one tensor at a
time through ``torch.distributed.reduce_scatter`` with a list of N views (``_reduce_scatter_gradient``), which
ProcessGroupNCCL of that time flattens with one copy per rank (``flatten_for_scatter_gather``; N copy launches
on the host per call).

[Note: v0.5.6's step counter is one behind its trace]
``setup_zero_stage3_hooks`` registers the per-module hooks first (``_register_hooks_recursively``, which gives the
top module its ``_pre_forward_module_hook``) and the top module's ``_pre_forward_hook`` (``reset_step``) after
them. PyTorch runs forward pre-hooks in registration order, so at every forward the top module's hook records
itself and advances ``step_id`` to 1, then ``reset_step`` sets it back to 0: each later sub-module is visited at
a ``step_id`` one less than its index in the recorded trace. ``get_params_to_prefetch`` and
``get_reuse_distance_in_numel`` both begin with ``if sub_module.id != trace[step_id]`` ("Tracing failed"): the
first returns no parameters (nothing is ever prefetched), the second a distance of 1e12 (nothing is ever kept for
later). So in v0.5.6 every sub-module gathers its own parameters when it runs, blocking, in the forward, the
recomputed forward and the backward. PR 1453 (commit 4912e0a) deleted ``_pre_forward_hook``; its author had
diagnosed the off-by-one on a Hugging Face RoBERTa in DeepSpeed issue 1069 (2021-05-27).

[Note: persistent parameters are gathered again at every optimizer step]
Both versions release every gathered parameter after the backward, persistent ones included (v0.5.6
``_partition_all_parameters`` -> ``release_and_reset_parameter``; v0.6.0 ``release_and_reset_all``: neither checks
``ds_persist``), and ``_post_step`` gathers the persistent ones back through ``_allgather_params_coalesced``: one
``_all_gather_base`` per tensor over all ranks, then ``torch.cuda.synchronize()``. For a transformer that is about
ten latency-bound collectives per layer (biases, LayerNorm weights). v0.5.6 releases them at the end of every
``backward`` (so under gradient accumulation each later micro-step's forward gathers them again, inline in its
fetches; counted here at the same cost); v0.6.0 moved the release into ``step``, once per optimizer step.

[Note: which network a prediction uses]
The ``mics_hf`` profile keeps the default model's network (one ``INTER_NODE_EFFICIENCY``, 14 us per ring step),
so MiCS, HSDP and the per-unit ZeRO-3 predictions are unchanged. The DeepSpeed profiles use
``mics_hf.planning.network``: EFA bandwidth by ring size and NCCL 2.11's step latency, the stack those runs had.
benchmarks/costmodel_2026-12-06.md reports MiCS under that network too (section 3; the profiles' current
numbers are in costmodel_2026-12-06_2.md).
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass
from typing import Mapping

from .network import ring_time

__all__ = ["HOST_FETCH_S_056", "PROFILES", "PROFILE_SOURCES", "ImplementationProfile", "SimulatedStep", "Visit",
           "build_trace", "collective_functions", "get_profile", "simulate_step"]


@dataclass(frozen=True, kw_only=True)
class ImplementationProfile:
    """How one ZeRO-3 implementation issues its collectives (fields traced in ``PROFILE_SOURCES``).

    ``analytic`` profiles are computed by ``costmodel.predict``'s own per-unit model; the others by
    ``simulate_step``. Element counts are numel, as DeepSpeed's configuration counts them.
    """

    name: str
    summary: str
    analytic: bool = False
    gather_per_tensor: bool = True  # one all-gather per tensor (else one per sub-module's tensors)
    device_sync_per_fetch: bool = True  # torch.cuda.synchronize() when a sub-module's parameters arrive
    sync_before_each_prefetch: bool = True  # torch.cuda.synchronize() before each prefetched tensor's gather
    prefetch_only_when_idle: bool = True  # prefetch only when no gather is in flight
    prefetch_numel: int = 50_000_000
    max_live_numel: int = 1_000_000_000
    persistence_threshold: int = 100_000
    max_reuse_distance: int = 1_000_000_000
    reduce_bucket_numel: int = 500_000_000
    reduce_per_tensor: bool = True  # one reduce-scatter per tensor (else one per bucket)
    list_api_copies: bool = True  # N copy launches per reduce-scatter on the host
    wait_reductions_per_bucket: bool = True  # reduction_stream.synchronize() before each bucket
    step_id_off_by_one: bool = True  # v0.5.6: trace lookups fail, so no prefetch and no keep-for-later
    regather_persistent: bool = True  # persistent tensors released and gathered back, one collective per tensor
    release_persistent_each_backward: bool = True  # v0.5.6: at every micro-step; v0.6.0: at the optimizer step
    launch_s: float = 6.5e-6  # host seconds per copy launch
    host_fetch_s: float = 0.0  # host seconds per sub-module fetch not hidden behind the device
    wire_bytes: int = 2


# The one constant not read from code: the host time a v0.5.6 fetch costs (Python hooks, trace lookups, debug
# f-strings that format a parameter norm, two device-wide synchronisations). It is derived from the one
# measurement that isolates it, DeepSpeed PR 1188 (one p4d node, NVLink only, a 5.1B BERT): ZeRO-3 forward
# 270 ms against ZeRO-2's 60 ms. ``validation.calibrate_host_fetch`` re-derives it (tested); that
# measurement is therefore a calibration, not a validation, and is recorded as such.
HOST_FETCH_S_056 = 0.408e-3

_DS056 = ImplementationProfile(
    name="deepspeed-0.5.6",
    summary="DeepSpeed v0.5.6 ZeRO-3: per-tensor collectives over all ranks, one-deep prefetch behind "
            "torch.cuda.synchronize(), per-tensor list-API reduce-scatter",
    host_fetch_s=HOST_FETCH_S_056,
)
_IMPROVED = dataclasses.replace(
    _DS056, name="deepspeed-improved",
    summary="DeepSpeed after PR 1453 (v0.6.0): one coalesced all-gather per sub-module, a fetch queue "
            "prefetching ahead, event waits instead of device syncs, one _reduce_scatter_base per bucket",
    gather_per_tensor=False, device_sync_per_fetch=False, sync_before_each_prefetch=False,
    prefetch_only_when_idle=False, step_id_off_by_one=False, release_persistent_each_backward=False,
    reduce_per_tensor=False, list_api_copies=False, wait_reductions_per_bucket=False,
    host_fetch_s=0.0,
)
_MICS_HF = ImplementationProfile(
    name="mics_hf", analytic=True,
    summary="mics_hf / FSDP2: one collective per unit (transformer layer), prefetch of the next unit, "
            "fully overlapped on one communication stream (costmodel.predict's own model)",
)

PROFILES: Mapping[str, ImplementationProfile] = types.MappingProxyType(
    {p.name: p for p in (_MICS_HF, _DS056, _IMPROVED)})
"""The known profiles by name (read-only)."""

_V056 = "DeepSpeed v0.5.6"
_V060 = "DeepSpeed v0.6.0 (PR 1453, commit 4912e0a)"
PROFILE_SOURCES: Mapping[str, Mapping[str, str]] = types.MappingProxyType({
    "deepspeed-0.5.6": types.MappingProxyType({
        "gather_per_tensor": f"{_V056} partition_parameters.py _allgather_params_coalesced: one "
                             "dist._all_gather_base per parameter over ds_process_group (all ranks)",
        "device_sync_per_fetch": f"{_V056} stage3.py PartitionedParameterCoordinator._synchronize_communication: "
                                 "comm_stream.synchronize(); torch.cuda.synchronize()",
        "sync_before_each_prefetch": f"{_V056} partition_parameters.py _allgather_param: torch.cuda.synchronize() "
                                     "before launching each tensor's gather",
        "prefetch_only_when_idle": f"{_V056} stage3.py prefetch_next_sub_modules: `if not self.in_flight_handles`",
        "step_id_off_by_one": f"{_V056} stage3.py setup_zero_stage3_hooks: _register_hooks_recursively(self.module) "
                              "before self.module.register_forward_pre_hook(_pre_forward_hook); "
                              "PrefetchCoordinator.get_params_to_prefetch / get_reuse_distance_in_numel: "
                              "`if sub_module.id != self.sub_module_trace[self.step_id]` (see [Note: v0.5.6's step "
                              "counter is one behind its trace]); DeepSpeed issue 1069",
        "regather_persistent": f"{_V056} stage3.py backward -> _partition_all_parameters -> "
                               "release_and_reset_parameter (no ds_persist check); _post_step: "
                               "persistent_parameters[0].all_gather(...) -> partition_parameters.py "
                               "_allgather_params_coalesced (one _all_gather_base per tensor)",
        "release_persistent_each_backward": f"{_V056} stage3.py backward(): self._partition_all_parameters() after "
                                            "every loss.backward, so with gradient accumulation each later "
                                            "micro-step's forward gathers the persistent tensors again",
        "prefetch_numel": f"{_V056} zero/constants.py ZERO_OPTIMIZATION_PREFETCH_BUCKET_SIZE_DEFAULT = 50000000",
        "max_live_numel": f"{_V056} zero/constants.py ZERO_OPTIMIZATION_MAX_LIVE_PARAMETERS_DEFAULT = 1000000000",
        "persistence_threshold": f"{_V056} zero/constants.py ZERO_OPTIMIZATION_PARAM_PERSISTENCE_THRESHOLD_DEFAULT "
                                 "= 100000; stage3.py persistent_parameters",
        "max_reuse_distance": f"{_V056} zero/constants.py ZERO_OPTIMIZATION_MAX_REUSE_DISTANCE_DEFAULT = "
                              "1000000000; stage3.py _keep_for_later, PrefetchCoordinator._distance_in_numel",
        "reduce_bucket_numel": f"{_V056} zero/constants.py ZERO_OPTIMIZATION_REDUCE_BUCKET_SIZE_DEFAULT = 500000000",
        "reduce_per_tensor": f"{_V056} partition_parameters.py _reduce_scatter_gradients: one "
                             "_reduce_scatter_gradient per parameter",
        "list_api_copies": "torch.distributed.reduce_scatter(output, input_list) in "
                           f"{_V056} _reduce_scatter_gradient; ProcessGroupNCCL::reduce_scatter (torch 1.x) "
                           "flatten_for_scatter_gather: one copy per rank",
        "wait_reductions_per_bucket": f"{_V056} stage3.py reduce_ipg_grads: `if self.overlap_comm: "
                                      "self.reduction_stream.synchronize()` (overlap_comm defaults to True "
                                      "for stage 3)",
        "launch_s": "6.5 us: minimum cuLaunchKernel host time in an nvprof trace, QuantumBFS/CuYao.jl#3 "
                    "(order of magnitude of a copy launch)",
        "host_fetch_s": "calibrated on DeepSpeed PR 1188 (p4d, 5.1B BERT, ZeRO-3 forward 270 ms vs ZeRO-2 60 ms); "
                        "see HOST_FETCH_S_056",
        "wire_bytes": "fp16 parameters and gradients: ZeRO-3 gained bf16 only in DeepSpeed PR 1453",
    }),
    "deepspeed-improved": types.MappingProxyType({
        "gather_per_tensor": f"{_V060} stage3.py PartitionedParameterCoordinator.__all_gather_params: one "
                             "all_gather_coalesced for a set of parameters",
        "device_sync_per_fetch": f"{_V060} stage3.py fetch_sub_module: waits on the in-flight handles / events, "
                                 "then torch.cuda.current_stream().wait_stream(allgather_stream)",
        "prefetch_only_when_idle": f"{_V060} stage3.py fetch_sub_module: a fetch queue; every fetch prefetches "
                                   "up to prefetch_bucket_sz more elements",
        "reduce_per_tensor": f"{_V060} stage3.py __reduce_and_partition_ipg_grads -> "
                             "comm/coalesced_collectives.py reduce_scatter_coalesced: one _reduce_scatter_base "
                             "per bucket",
        "step_id_off_by_one": f"{_V060} stage3.py setup_zero_stage3_hooks: _pre_forward_hook deleted; the step "
                              "counter is reset at the end of the forward in inference and at the optimizer step",
        "release_persistent_each_backward": f"{_V060} stage3.py step(): self._partition_all_parameters() once per "
                                            "optimizer step (moved out of backward())",
        "regather_persistent": f"{_V060} stage3.py release_and_reset_all (no ds_persist check); _post_step: "
                               "persistent_parameters[0].all_gather(...) -> _allgather_params_coalesced, one "
                               "_all_gather_base per tensor",
        "host_fetch_s": "0: the host waits on events, not on the device, so its work hides behind queued kernels",
        "other fields": "defaults unchanged from v0.5.6 (zero/constants.py at v0.6.0)",
    }),
})


def get_profile(name: str | ImplementationProfile) -> ImplementationProfile:
    """A profile by name; a clear error naming the valid ones otherwise."""
    if isinstance(name, ImplementationProfile):
        return name
    if name not in PROFILES:
        raise ValueError(f"unknown implementation profile {name!r}; use one of {list(PROFILES)}")
    return PROFILES[name]


# ---- the trace ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Visit:
    """One sub-module run: its parameter tensors (ids), compute seconds, and whether it produces gradients."""

    module: str
    tensors: tuple[int, ...]
    compute_s: float
    backward: bool


def _layer_modules(family: str, h: int, ffn: int) -> list[tuple[str, list[int], int]]:
    """(name, parameter numels, matmul numel) of a transformer layer's sub-modules in forward order (the Hugging
    Face classes of ``presets``: GPT2Block, RobertaPreLayerNormLayer)."""
    if family == "gpt":
        return [("ln_1", [h, h], 0), ("attn.c_attn", [3 * h * h, 3 * h], 3 * h * h),
                ("attn.c_proj", [h * h, h], h * h), ("ln_2", [h, h], 0),
                ("mlp.c_fc", [h * ffn, ffn], h * ffn), ("mlp.c_proj", [ffn * h, h], ffn * h)]
    return [("attention.LayerNorm", [h, h], 0)] + [
        (f"attention.self.{n}", [h * h, h], h * h) for n in ("query", "key", "value")] + [
        ("attention.output.dense", [h * h, h], h * h), ("intermediate.LayerNorm", [h, h], 0),
        ("intermediate.dense", [h * ffn, ffn], h * ffn), ("output.dense", [ffn * h, h], ffn * h)]


def build_trace(family: str, hidden: int, layers: int, ffn: int, vocab: int, seq: int, *, tokens: int,
                flops_per_s: float, checkpointing: bool = True) -> tuple[list[int], list[Visit]]:
    """(numel of every parameter tensor, the visits of one micro-step): forward; then per layer from the last,
    the recomputed forward (with per-layer activation checkpointing) and the backward; then the root.

    Forward compute is 2 x matmul numel x tokens; backward twice that (the 8N convention of ``costmodel``).
    Embedding lookups compute nothing; the (tied) output projection computes 2 x V x h x tokens.
    """
    h = hidden
    numels: list[int] = []

    def add(sizes: list[int]) -> tuple[int, ...]:
        numels.extend(sizes)
        return tuple(range(len(numels) - len(sizes), len(numels)))

    def f(n: int) -> float:
        return 2.0 * n * tokens / flops_per_s

    if family == "gpt":
        (wte,), (wpe,) = add([vocab * h]), add([seq * h])
        embed = [("wte", (wte,), 0), ("wpe", (wpe,), 0)]
        head = [("ln_f", add([h, h]), 0), ("lm_head", (wte,), vocab * h)]
    else:
        (word,) = add([vocab * h])
        embed = [("embeddings.word", (word,), 0), ("embeddings.position", add([(seq + 2) * h]), 0),
                 ("embeddings.token_type", add([h]), 0), ("embeddings.LayerNorm", add([h, h]), 0)]
        head = [("LayerNorm", add([h, h]), 0), ("lm_head.dense", add([h * h, h]), h * h),
                ("lm_head.layer_norm", add([h, h]), 0), ("lm_head.decoder", (word,) + add([vocab]), vocab * h)]
    blocks = [[(f"layer{i}.{name}", add(sizes), mm) for name, sizes, mm in _layer_modules(family, h, ffn)]
              for i in range(layers)]
    visits = [Visit(name, ids, f(mm), False) for name, ids, mm in embed]
    for block in blocks:
        visits += [Visit(name, ids, f(mm), False) for name, ids, mm in block]
    visits += [Visit(name, ids, f(mm), False) for name, ids, mm in head]
    visits += [Visit(name, ids, 2 * f(mm), True) for name, ids, mm in reversed(head)]
    for block in reversed(blocks):
        if checkpointing:
            visits += [Visit(name, ids, f(mm), False) for name, ids, mm in block]  # recomputed forward
        visits += [Visit(name, ids, 2 * f(mm), True) for name, ids, mm in reversed(block)]
    visits += [Visit(name, ids, 2 * f(mm), True) for name, ids, mm in reversed(embed)]
    return numels, visits


def _keep_after(visits: list[Visit], numels: list[int], max_reuse: int) -> list[bool]:
    """Per visit: does v0.5.6's ``_keep_for_later`` keep its tensors (next use of the same sub-module within
    ``max_reuse`` elements of the trace)? The distance sums every parameter of the visits in between."""
    sizes = [sum(numels[t] for t in v.tensors) for v in visits]
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    keep, next_at = [False] * len(visits), {}
    for i in range(len(visits) - 1, -1, -1):
        j = next_at.get(visits[i].module)
        keep[i] = j is not None and prefix[j] - prefix[i + 1] < max_reuse
        next_at[visits[i].module] = i
    return keep


# ---- the simulation -------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class SimulatedStep:
    """One simulated micro-step followed by the optimizer step's own collectives (``persistent_regather_s``,
    included in ``step_s``). Times in seconds; ``*_busy_s`` sum the durations of the micro-step's collectives."""

    step_s: float
    forward_s: float
    compute_s: float
    gather_busy_s: float
    forward_gather_busy_s: float
    reduce_busy_s: float
    num_gathers: int
    num_reduces: int
    host_s: float
    persistent_regather_s: float = 0.0  # once per optimizer step, included in step_s


def simulate_step(profile: ImplementationProfile, numels: list[int], visits: list[Visit], *,
                  gather_s, reduce_s, ranks: int) -> SimulatedStep:
    """Play one micro-step of ``visits`` under ``profile``.

    ``gather_s(numel)`` / ``reduce_s(numel)``: seconds of one all-gather / reduce-scatter of that many elements
    over the ``ranks`` ranks. Three clocks: the host, the compute stream and the network (gathers and
    reductions share each node's links, so they run one after another). Compute of a visit starts when the host
    has launched it, the previous compute is done and its tensors have arrived.
    """
    p = profile
    gathered = [n >= p.persistence_threshold for n in numels]
    # v0.5.6's trace lookups all fail ([Note: v0.5.6's step counter is one behind its trace]): nothing is kept
    # for later and nothing prefetched (the top module's own prefetch at step 0 is left out: one lookup per step)
    keep = [False] * len(visits) if p.step_id_off_by_one else _keep_after(visits, numels, p.max_reuse_distance)
    host = comp = net = 0.0
    ready: dict[int, float] = {}  # tensor -> time its gather completes (present or in flight)
    in_flight: set[int] = set()
    live = 0  # gathered elements present or in flight (stage3_max_live_parameters)
    busy_g = busy_r = host_total = 0.0
    n_g = n_r = 0
    bucket: list[tuple[int, float]] = []  # (tensor, time its gradient is ready)
    bucket_numel, last_reduce = 0, 0.0
    forward_end = forward_busy = 0.0

    def launch_gathers(tensors: list[int], start_at: float) -> float:
        nonlocal net, busy_g, n_g, live
        groups = [[t] for t in tensors] if p.gather_per_tensor else [tensors]
        for group in groups:
            duration = gather_s(sum(numels[t] for t in group))
            begin = max(start_at, net)
            net = begin + duration
            busy_g += duration
            n_g += 1
            for t in group:
                ready[t] = net
                live += numels[t]
        return net

    def flush(now: float) -> float:
        """Reduce-scatter the bucket; returns the host time after issuing it."""
        nonlocal net, busy_r, n_r, bucket, bucket_numel, last_reduce, host_total
        if not bucket:
            return now
        if p.wait_reductions_per_bucket:
            now = max(now, last_reduce)
        groups = [[b] for b in bucket] if p.reduce_per_tensor else [bucket]
        for group in groups:
            if p.list_api_copies:
                now += ranks * p.launch_s
                host_total += ranks * p.launch_s
            duration = reduce_s(sum(numels[t] for t, _ in group))
            begin = max(now, net, max(r for _, r in group))
            net = begin + duration
            busy_r += duration
            n_r += 1
        last_reduce = net
        bucket, bucket_numel = [], 0
        return now

    for i, v in enumerate(visits):
        if i > 0 and v.backward and not visits[i - 1].backward and forward_end == 0.0:
            forward_end, forward_busy = max(comp, net), busy_g
        mine = [t for t in v.tensors if gathered[t]]
        missing = [t for t in mine if t not in ready]
        waiting = [t for t in mine if t in in_flight]
        if missing:
            launch_gathers(missing, host)
        if mine and (missing or waiting):
            arrival = max(ready[t] for t in mine)
            host = max(host, comp, net) if p.device_sync_per_fetch else max(host, arrival)
            in_flight.clear() if p.device_sync_per_fetch else in_flight.difference_update(mine)
        host += p.host_fetch_s
        host_total += p.host_fetch_s
        # prefetch the next tensors of the trace that are neither present nor in flight
        if (not p.step_id_off_by_one and (not in_flight or not p.prefetch_only_when_idle)
                and live < p.max_live_numel):
            chosen, numel, seen = [], 0, set(mine)
            for w in visits[i + 1:]:
                for t in w.tensors:
                    if gathered[t] and t not in ready and t not in seen:
                        seen.add(t)
                        chosen.append(t)
                        numel += numels[t]
                if numel >= p.prefetch_numel:
                    break
            if chosen:
                if p.sync_before_each_prefetch:
                    for t in chosen:
                        host = max(host, comp, net)
                        launch_gathers([t], host)
                else:
                    launch_gathers(chosen, host)
                in_flight.update(chosen)
        start = max(host, comp, max((ready[t] for t in mine), default=0.0))
        comp = start + v.compute_s
        if not keep[i]:
            for t in mine:
                if numels[t] >= p.persistence_threshold and t in ready and t not in in_flight:
                    del ready[t]
                    live -= numels[t]
        if v.backward:
            for t in v.tensors:
                if bucket and bucket_numel + numels[t] > p.reduce_bucket_numel:
                    host = flush(host)
                bucket.append((t, comp))
                bucket_numel += numels[t]
    host = flush(host)
    step = max(host, comp, net)
    # the optimizer step's gather of the persistent tensors, one blocking collective each
    regather = sum(gather_s(n) for n in numels if n < p.persistence_threshold) if p.regather_persistent else 0.0
    step += regather
    return SimulatedStep(step_s=step, forward_s=forward_end, compute_s=sum(v.compute_s for v in visits),
                         gather_busy_s=busy_g, forward_gather_busy_s=forward_busy, reduce_busy_s=busy_r,
                         num_gathers=n_g, num_reduces=n_r,
                         host_s=host_total, persistent_regather_s=regather)


def collective_functions(*, ranks: int, gpus_per_node: int, instance: str, nic_bytes_per_s: float,
                         nvlink_bytes_per_s: float, wire_bytes: int):
    """(gather_s, reduce_s) for ``simulate_step``: flat rings over ``ranks`` ranks on the EFA model."""
    def gather_s(numel: int) -> float:
        return ring_time(numel * wire_bytes, ranks, gpus_per_node, instance=instance,
                         nic_bytes_per_s=nic_bytes_per_s, nvlink_bytes_per_s=nvlink_bytes_per_s)

    def reduce_s(numel: int) -> float:
        return ring_time(numel * wire_bytes, ranks, gpus_per_node, instance=instance,
                         nic_bytes_per_s=nic_bytes_per_s, nvlink_bytes_per_s=nvlink_bytes_per_s,
                         kind="reduce_scatter")

    return gather_s, reduce_s
