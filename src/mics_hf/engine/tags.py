"""Collective tags: every communication segment names its unit, so ranks that ran different units fail loudly.

[Note: collective tags] Each communication segment ends with TAG_NUMEL elements naming the unit. After an
all-gather every rank checks that all p chunks carry its own unit's tag, and after a reduce-scatter or a
replica all-reduce that the summed tags are p (or r) times its own (tag t and t^2: equal sums of both mean
every contribution was t). A rank that ran a different unit (a unit skipped on some ranks only, a
data-dependent branch) is therefore an error naming both units, never a silent mix of two units' data.
On CPU the check runs at once; on CUDA it is queued without a host sync and raised at the next forward.

Sums must be exact. In float32 and float64, t = 1 + index mod 500 keeps t^2 summed over 64 ranks an exact
integer. bf16 and fp16 hold integers exactly only up to 256 and 2048, so a low-precision reduce-scatter over p
ranks uses t = 1 + index mod m with p * m^2 under that limit (m = 5 at p = 8 in bf16): neighbouring units,
the usual mismatch, still differ; if m < 2 (bf16 beyond 64 ranks) the sum is not checked.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .collectives import CollectiveError

__all__ = ["TAG_NUMEL", "TagChecks", "sum_tag_modulus"]

TAG_NUMEL = 2  # elements appended to every communication segment
_TAG_MODULUS = 500  # summed tags t, t^2 stay exact integers in float32 for any group of up to 64 ranks
_EXACT_INTEGERS = {torch.bfloat16: 256, torch.float16: 2048}


def sum_tag_modulus(dtype: torch.dtype, ranks: int) -> int:
    """How many distinct tags a sum over `ranks` ranks in `dtype` can tell apart exactly (< 2: none)."""
    limit = _EXACT_INTEGERS.get(dtype)
    if limit is None:
        return _TAG_MODULUS
    return math.isqrt(limit // max(ranks, 1))


class TagChecks:
    """Raises when a collective's tags show that the ranks of a group ran different units.

    `describe(i)` names the unit with index i. On CPU a mismatch raises at once; on CUDA the comparison stays on
    the device and `raise_pending()` (called at the start of the next forward) reports it, so the check never
    stalls the host. The expected tensors are made once by the unit, so a passing check allocates nothing.
    """

    def __init__(self, describe: Callable[[int], str]) -> None:
        self.describe = describe
        self._pending: list[tuple] = []
        self._host: dict[int, torch.Tensor] = {}  # id(expected) -> its host copy, made once (a copy syncs)

    def gathered(self, unit, tags: torch.Tensor, expected: torch.Tensor) -> None:
        """tags: (p, TAG_NUMEL), one row per chunk; expected: (TAG_NUMEL,), this unit's tag."""
        self._check(unit, "all-gather", tags, expected, 0)

    def summed(self, unit, op: str, sums: torch.Tensor, expected: torch.Tensor, ranks: int) -> None:
        """sums: (TAG_NUMEL,); expected: the sums if all `ranks` ranks sent this unit's tag."""
        self._check(unit, op, sums, expected, ranks)

    def _check(self, unit, op: str, got: torch.Tensor, expected: torch.Tensor, ranks: int) -> None:
        if got.is_cuda:  # copy on the current (communication) stream; an event marks when it has landed
            host = torch.empty(got.shape, dtype=got.dtype, pin_memory=True)  # pinned: the copy does not block
            host.copy_(got.detach(), non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            expected_host = self._host.get(id(expected))
            if expected_host is None:  # the unit keeps `expected` for its life, so its id stays valid
                expected_host = self._host[id(expected)] = expected.cpu()
            self._pending.append((unit, op, host, expected_host, ranks, done))
            return
        self._verify(unit, op, got, expected, ranks)

    def raise_pending(self) -> None:
        pending, self._pending = self._pending, []
        for unit, op, got, expected, ranks, done in pending:
            done.synchronize()  # recorded in the previous step: long complete by the next forward
            self._verify(unit, op, got, expected, ranks)

    def _verify(self, unit, op: str, got: torch.Tensor, expected: torch.Tensor, ranks: int) -> None:
        if torch.equal(got, expected.expand_as(got)):  # the steady state: no allocation
            return
        got = got.detach().to(torch.float64)
        if ranks == 0:  # all-gather: one tag per chunk, each must be this unit's
            expected = expected.to(torch.float64)
            bad = [int(row[0].item() + 256 * row[1].item()) - 1 for row in got if not torch.equal(row, expected)]
            others = sorted({self.describe(i) for i in bad})
        else:  # sums of t and t^2 over the group equal ranks * (t, t^2) only if every rank sent t
            others = ["a different unit"]
        raise CollectiveError(
            f"{op} of unit {unit.label!r} was paired with {', '.join(others)} on another rank of its group: the "
            "ranks did not run the same units in the same order (a unit skipped on some ranks only, e.g. layer "
            "drop or a data-dependent branch around a whole unit, or a unit whose output reaches the loss on some "
            "ranks only, so that only they run its backward). Every rank must run every unit, forward and "
            "backward, the same number of times per step; keep the branch inside a unit (set units= so that it "
            "is), or make the unit's output reach the loss on every rank (e.g. add it times 0)"
        )
