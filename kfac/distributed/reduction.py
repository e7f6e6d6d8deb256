"""Bucketed reduction of one step's factor statistics, overlapped with the backward pass.

Layers are grouped into *buckets* in reverse registration order (the order the backward pass finishes them), each
bucket capped in bytes. A bucket is launched -- asynchronously -- as soon as every layer in it has its final
statistics for the step (the backward pass of the last accumulated micro-batch reached it) *and* every earlier
bucket has been launched; whatever is left is launched by :meth:`FactorReduction.launch_remaining` at the start of
``step()``. So every rank issues the same collectives in the same order, whichever rank's backward pass is ahead.

What travels (per layer, per factor): the rank's statistic sum ``S_r`` divided by a scale ``c`` that every rank
agrees on, with the row counts ``n_r`` all-reduced exactly beside it; the reduced factor is
``(sum_r S_r / c) * c / N`` with ``N = sum_r n_r``, i.e. exactly the mean over the global batch. ``c`` is the
previous factor update's global count (known to every rank; for float16 on the wire it keeps values at the scale
of a factor) -- when a layer has none yet (the first update), its bucket waits for this step's counts first and
is launched in ``step()``. The factors additionally carry the ``world_size^2`` of the gradient-averaging
convention, split between ``A`` and ``G`` as :attr:`FactorEntry.gradient_power` says (see
:mod:`kfac.distributed.executor`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .comm import Communicator, Pending, pack_symmetric, unpack_symmetric
from ..planner import Plan
from ..kronecker.store import FactorEntry

__all__ = ["FactorReduction", "PendingStats", "Reduced", "factor_shape", "wire", "unwire"]


@dataclass
class PendingStats:
    """One layer's local statistics since the last step (sums of row outer products and row counts)."""

    a_sum: Tensor | None
    a_count: int
    g_sum: Tensor | None
    g_count: int


Reduced = tuple[Tensor | None, Tensor | None, bool]
"""``(A_batch, G_batch, seen)``: the batch factors this rank holds (``None`` where not held or where no rank saw
the layer this step) and whether any rank saw the layer."""


@dataclass
class _Launch:
    names: list[str]
    counts: Pending                        # exact global row counts, shape (len(names), 2)
    scale: Tensor                          # the agreed scale c per (layer, factor), shape (len(names), 2)
    data: list[tuple[list[tuple[str, str]], Pending]]


class FactorReduction:
    """Reduces per-layer statistics under ``plan``: all-reduce, reduce to each factor's owner, or (``local``)
    nothing at all (each owner keeps its own batch's statistics)."""

    def __init__(self, *, comm: Communicator, plan: Plan, entries: Sequence[FactorEntry],
                 devices: Mapping[str, torch.device], dtype: torch.dtype, local: bool,
                 stats: Callable[[str], PendingStats], bucket_cap_bytes: int,
                 wire_dtype: torch.dtype | None = None) -> None:
        self.comm, self.plan, self.dtype, self.local = comm, plan, dtype, local
        self.wire_dtype = wire_dtype  # overrides the communicator's comm_dtype for factor statistics
        self.entries = {e.name: e for e in entries}
        self.devices = dict(devices)
        self._stats = stats
        self.buckets = _buckets([self.entries[n] for n in reversed(list(self.entries))], dtype, bucket_cap_bytes)
        self._bucket_of = {n: i for i, b in enumerate(self.buckets) for n in b}
        self._previous: dict[str, tuple[float, float]] = {}  # last global (a, g) counts, identical on all ranks
        self.launched_early = 0  # buckets launched during a backward pass (for tests and profiling)
        self._reset()

    @property
    def overlaps(self) -> bool:
        """Whether buckets can be launched during the backward pass (anything to communicate at all)."""
        return self.comm.enabled and not self.local

    def _reset(self) -> None:
        self._final: set[str] = set()
        self._launches: list[_Launch] = []

    def forget_counts(self) -> None:
        """Drop the agreed scales (after a replan or a load: the next update starts from exact counts)."""
        self._previous.clear()

    # -- launching -----------------------------------------------------------------------------------------
    def mark_final(self, name: str) -> None:
        """Layer ``name`` has its final statistics for this step; launch every bucket that is now complete."""
        if not self.overlaps:
            return
        self._final.add(name)
        while len(self._launches) < len(self.buckets):
            bucket = self.buckets[len(self._launches)]
            if not all(n in self._final and n in self._previous for n in bucket):
                return
            self._launch(bucket)
            self.launched_early += 1

    def launch_remaining(self) -> None:
        """Launch the buckets not launched during the backward pass (in bucket order)."""
        for bucket in self.buckets[len(self._launches):]:
            self._launch(bucket)

    def _launch(self, names: list[str]) -> None:
        stats = [self._stats(n) for n in names]
        counts = torch.tensor([[s.a_count, s.g_count] for s in stats], dtype=torch.float64)
        device = self.devices[names[0]]
        world = float(self.comm.world_size)
        if not self.overlaps:  # counts are what they are: no one else contributes
            global_counts = counts
            counts_pending: Pending = Pending((), lambda: [global_counts])
        elif all(n in self._previous for n in names):
            counts_pending = self.comm.all_reduce_sum([counts.to(device)], category="factor_counts", exact=True,
                                                      async_op=True)
            global_counts = None
        else:  # first update of some layer: the exact counts are the scale (wait for them now)
            global_counts = self.comm.all_reduce_sum([counts.to(device)], category="factor_counts",
                                                     exact=True)[0].cpu()
            counts_pending = Pending((), lambda: [global_counts])
        if global_counts is not None:
            scale = global_counts.clone()
        else:
            scale = torch.tensor([self._previous[n] for n in names], dtype=torch.float64)
        for i, n in enumerate(names):  # a local-batch mean loss: its gradient statistics carry world²
            power_a, power_g = self.entries[n].gradient_power
            scale[i, 0] *= world ** power_a
            scale[i, 1] *= world ** power_g
        means: dict[tuple[str, str], Tensor | None] = {}  # without overlaps: nothing travels
        payload: dict[tuple[str, str], Tensor] = {}  # with overlaps: what travels
        for i, (n, s) in enumerate(zip(names, stats)):
            e = self.entries[n]
            used = s.a_count > 0 and s.g_count > 0
            for j, (f, total) in enumerate((("A", s.a_sum), ("G", s.g_sum))):
                shape = factor_shape(e, f)
                mean = _scaled(total if used else None, float(scale[i, j]), f == "A" and e.a_diagonal)
                if self.overlaps:
                    payload[(n, f)] = wire(mean, shape, len(shape) == 2, self.dtype, self.devices[n])
                else:
                    means[(n, f)] = mean
        keys = list(payload if self.overlaps else means)
        data: list[tuple[list[tuple[str, str]], Pending]] = []
        if not self.overlaps:  # nothing travels: this rank's means are the result (for the factors it holds)
            mine = [k for k in keys if self.plan.holds_factor(*k, self.comm.rank)]
            data.append((mine, Pending((), lambda: [means[k] for k in mine])))
        elif self.plan.factor_communication == "allreduce":
            data.append((keys, self.comm.all_reduce_sum([payload[k] for k in keys], category="factors",
                                                         async_op=True, wire_dtype=self.wire_dtype)))
        else:
            for dst in sorted({self.plan.owner(*k) for k in keys}):
                mine = [k for k in keys if self.plan.owner(*k) == dst]
                data.append((mine if dst == self.comm.rank else [],
                             self.comm.reduce_sum([payload[k] for k in mine], dst=dst, category="factors",
                                                  async_op=True, wire_dtype=self.wire_dtype)))
        self._launches.append(_Launch(names, counts_pending, scale, data))

    # -- results -------------------------------------------------------------------------------------------
    def collect(self) -> dict[str, Reduced]:
        """Launch what is left, wait for everything, and return each layer's reduced batch factors."""
        self.launch_remaining()
        out: dict[str, Reduced] = {}
        for launch in self._launches:
            counts = launch.counts.wait()[0].cpu()
            received: dict[tuple[str, str], Tensor] = {}
            for keys, pending in launch.data:
                result = pending.wait()
                if keys and result is not None:
                    received.update(zip(keys, result))
            for i, n in enumerate(launch.names):
                a_n, g_n = counts[i].tolist()
                seen = a_n > 0 and g_n > 0
                if seen:
                    self._previous[n] = (a_n, g_n)
                else:
                    self._previous.pop(n, None)
                factors = []
                world = float(self.comm.world_size)
                power_a, power_g = self.entries[n].gradient_power  # how world² splits (see _launch)
                norms = [a_n * world ** power_a, g_n * world ** power_g]
                if self.entries[n].gradient_sum:  # curvature units: the gradient side is a sum over rows
                    side = 0 if power_a > power_g else 1
                    norms[side] = world ** (power_a, power_g)[side]
                for j, (f, norm) in enumerate(zip(("A", "G"), norms)):
                    t = received.get((n, f)) if seen else None
                    if t is not None and self.overlaps:
                        shape = factor_shape(self.entries[n], f)
                        t = unwire(t, shape, len(shape) == 2).to(self.dtype)
                    if t is not None:
                        ratio = float(launch.scale[i, j]) / norm
                        if ratio != 1.0:
                            t = t * ratio
                    factors.append(t)
                out[n] = (factors[0], factors[1], seen)
        self._reset()
        return out

    def drain(self) -> None:
        """Abandon this step's statistics: finish whatever is in flight (launching the rest first, so every rank
        issues the same collectives) and drop the results."""
        if self._launches:
            self.launch_remaining()
            for launch in self._launches:
                launch.counts.wait()
                for _, pending in launch.data:
                    pending.wait()
        self._reset()


def _buckets(entries: Sequence[FactorEntry], dtype: torch.dtype, cap: int) -> list[list[str]]:
    """Consecutive layers (in the given order) grouped so that each bucket's payload is at most ``cap`` bytes
    (a larger layer gets a bucket of its own)."""
    out: list[list[str]] = []
    size = 0
    for e in entries:
        n = sum(_wire_numel(factor_shape(e, f)) for f in ("A", "G")) * dtype.itemsize
        if not out or size + n > cap:
            out.append([])
            size = 0
        out[-1].append(e.name)
        size += n
    return out


def factor_shape(e: FactorEntry, factor: str) -> tuple[int, ...]:
    """The shape of factor ``"A"`` or ``"G"`` of ``e`` (see :meth:`kfac.kronecker.store.FactorEntry.shape_of`)."""
    shape = e.shape_of(factor)
    assert shape is not None  # A and G always have one
    return shape


def _wire_numel(shape: tuple[int, ...]) -> int:
    return shape[0] * (shape[0] + 1) // 2 if len(shape) == 2 else shape[0]


def _scaled(total: Tensor | None, norm: float, diagonal: bool) -> Tensor | None:
    """``total / norm``, symmetrised (``(M + M^T) / 2``) unless ``diagonal``; one allocation. ``None`` (this rank
    did not see the layer) stays ``None`` and travels as zeros."""
    if total is None:
        return None
    if diagonal:
        return total / norm
    return torch.add(total, total.T).mul_(0.5 / norm)


def wire(t: Tensor | None, shape: tuple[int, ...], symmetric: bool, dtype: torch.dtype,
         device: torch.device) -> Tensor:
    """What travels for a tensor of ``shape``: packed upper triangle when symmetric; zeros as a placeholder."""
    if t is None:
        return torch.zeros(_wire_numel(shape) if symmetric else int(torch.Size(shape).numel()), dtype=dtype,
                           device=device)
    return pack_symmetric(t) if symmetric else t


def unwire(t: Tensor, shape: tuple[int, ...], symmetric: bool) -> Tensor:
    return unpack_symmetric(t, shape[0]) if symmetric else t.reshape(shape)
