"""Executes a :class:`~kfac.planner.Plan`: who reduces, decomposes, preconditions and broadcasts what.

One code path for every world size: a single process is the trivial plan (rank 0 owns everything, no traffic).
Per step, in order (all collectives are issued in the same order on every rank of their group):

1. factor statistics (factor-update steps): summed over ranks, by all-reduce (``comm-opt``, ``mem-opt``,
   ``hybrid``) or by a reduce to each factor's owner (``dp-kfac``; ``factor_reduction="local"`` skips even that
   and uses the owner's local batch). Convention: gradients are averaged over ranks (DDP), so the local output
   gradients of a per-rank mean loss are ``world_size`` times those of the global mean loss, and
   ``G = sum_ranks g^T g / (world_size^2 N_total)``, which makes distributed factors equal single-process ones on
   the same global batch.
2. decompositions (refresh steps): each factor's owner decomposes it and broadcasts the result to the layer's
   other grad workers (everyone for ``comm-opt``, the grad-worker column for ``hybrid``, nobody otherwise).
3. preconditioning: each layer's grad workers precondition it; every other rank receives the result from the
   grad worker of its receiver row (``mem-opt``, ``dp-kfac``: one worker, broadcast to all).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .comm import Communicator, pack_symmetric, unpack_symmetric
from .methods import DecompositionError
from .planner import LayerSpec, Plan, make_plan
from .store import FactorEntry

__all__ = ["Executor", "PendingStats", "FACTOR_REDUCTIONS"]

FACTOR_REDUCTIONS = ("global", "local")


@dataclass
class PendingStats:
    """One layer's local statistics since the last step (sums of row outer products and row counts)."""

    a_sum: Tensor | None
    a_count: int
    g_sum: Tensor | None
    g_count: int


class Executor:
    """Binds a plan to a communicator and this rank's factor store entries."""

    def __init__(self, *, comm: Communicator, entries: Sequence[FactorEntry], strategy: str | None,
                 grad_worker_fraction: float | None, factor_reduction: str, plan_kwargs: Mapping) -> None:
        if factor_reduction not in FACTOR_REDUCTIONS:
            raise ValueError(f"factor_reduction must be one of {FACTOR_REDUCTIONS}, got {factor_reduction!r}")
        self.comm = comm
        self.rank, self.world_size = comm.rank, comm.world_size
        self.strategy_request, self.grad_worker_fraction = strategy, grad_worker_fraction
        self.factor_reduction = factor_reduction
        self.plan_kwargs = dict(plan_kwargs)
        self.replan(entries)

    # -- plan ----------------------------------------------------------------------------------------------
    def replan(self, entries: Sequence[FactorEntry]) -> None:
        """(Re)compute the plan for ``entries``, check every rank agrees, and record ownership in the store."""
        specs = [LayerSpec(e.name, e.a_dim, e.g_dim, e.a_diagonal) for e in entries]
        plan = make_plan(specs, self.world_size, self.strategy_request, grad_worker_fraction=self.grad_worker_fraction,
                         split=False, **self.plan_kwargs)
        if self.factor_reduction == "local" and plan.factor_communication != "reduce":
            raise ValueError("factor_reduction='local' only applies to strategy='dp-kfac'")
        self.comm.check_identical({"layers": [s.to_dict() for s in specs], "plan": plan.digest(),
                                   "factor_reduction": self.factor_reduction}, what="the K-FAC layer plan")
        self.plan: Plan = plan
        self.entries = {e.name: e for e in entries}
        for e in entries:
            e.owner = plan.owner(e.name, "A")
        self._columns = self._groups(plan.grad_worker_columns())
        self._rows = self._groups(plan.grad_receiver_rows())

    def _groups(self, partition: tuple[tuple[int, ...], ...]) -> dict[int, tuple[tuple[int, ...], object]]:
        """rank -> (members, process group) of the partition block containing it (world group when it is all)."""
        out = {}
        for block in partition:
            group = None if len(block) == self.world_size else self.comm.new_group(block)
            for r in block:
                out[r] = (block, group)
        return out

    @property
    def strategy(self) -> str:
        return self.plan.strategy

    def holds(self, name: str, factor: str) -> bool:
        """Whether this rank keeps the running factor."""
        return self.plan.holds_factor(name, factor, self.rank)

    def is_grad_worker(self, name: str) -> bool:
        return self.plan.is_grad_worker(name, self.rank)

    # -- 1. statistics -------------------------------------------------------------------------------------
    def reduce_statistics(self, pending: Mapping[str, PendingStats], dtype: torch.dtype,
                          ) -> dict[str, tuple[Tensor | None, Tensor | None, bool]]:
        """``(A_batch, G_batch, seen)`` per layer: the batch factors this rank holds (``None`` where not held or
        where no rank saw the layer this step) and whether any rank saw it."""
        names = list(self.entries)
        if not self.comm.enabled:
            out: dict[str, tuple[Tensor | None, Tensor | None, bool]] = {}
            for n in names:
                p, e = pending[n], self.entries[n]
                if not (p.a_count and p.g_count):
                    out[n] = (None, None, False)
                    continue
                a = p.a_sum / p.a_count if e.a_diagonal else torch.add(p.a_sum, p.a_sum.T, alpha=1.0).mul_(
                    0.5 / p.a_count)
                g = torch.add(p.g_sum, p.g_sum.T).mul_(0.5 / p.g_count)
                out[n] = (a, g, True)
            return out
        device = next((t.device for p in pending.values() for t in (p.a_sum, p.g_sum) if t is not None),
                      torch.device("cpu"))
        counts = torch.tensor([[pending[n].a_count, pending[n].g_count] for n in names], dtype=torch.float64,
                              device=device)
        local = self.factor_reduction == "local"
        if not local:  # counts first, exactly (never in a low-precision comm dtype)
            counts = self.comm.all_reduce_sum([counts], category="factor_counts", exact=True)[0]
        g_scale = float(self.world_size) ** 2
        payload: dict[tuple[str, str], Tensor] = {}
        for i, n in enumerate(names):
            e, p = self.entries[n], pending[n]
            a_n, g_n = float(counts[i, 0]), float(counts[i, 1])
            # each rank sends its sum already divided by the global count: the reduction yields the mean directly,
            # and values stay at the scale of a factor (no overflow in float16 on the wire)
            for f, total, dim, diag, norm in (("A", p.a_sum, e.a_dim, e.a_diagonal, a_n),
                                              ("G", p.g_sum, e.g_dim, False, g_n * g_scale)):
                if total is None or norm == 0:
                    total = torch.zeros(dim if diag else (dim, dim), dtype=dtype, device=device)
                else:
                    total = total / norm
                payload[(n, f)] = total if diag else pack_symmetric(total)
        reduced: dict[tuple[str, str], Tensor] = {}
        keys = list(payload)
        if local:
            reduced = {k: v for k, v in payload.items() if self.holds(*k)}
        elif self.plan.factor_communication == "allreduce":
            reduced = dict(zip(keys, self.comm.all_reduce_sum([payload[k] for k in keys], category="factors")))
        else:
            for dst in range(self.world_size):
                mine = [k for k in keys if self.plan.owner(*k) == dst]
                if not mine:
                    continue
                out = self.comm.reduce_sum([payload[k] for k in mine], dst=dst, category="factors")
                if out is not None:
                    reduced.update(zip(mine, out))
        result: dict[str, tuple[Tensor | None, Tensor | None, bool]] = {}
        for i, n in enumerate(names):
            e = self.entries[n]
            seen = float(counts[i, 0]) > 0 and float(counts[i, 1]) > 0
            a = g = None
            if (n, "A") in reduced and seen:
                a = reduced[(n, "A")] if e.a_diagonal else unpack_symmetric(reduced[(n, "A")], e.a_dim)
                a = a.to(dtype)
            if (n, "G") in reduced and seen:
                g = unpack_symmetric(reduced[(n, "G")], e.g_dim).to(dtype)
            result[n] = (a, g, seen)
        return result

    # -- 2. decompositions ---------------------------------------------------------------------------------
    def refresh(self, refresh_factor: Callable[[FactorEntry, str], None],
                fields: Callable[[FactorEntry, str], tuple[tuple[str, tuple[int, ...], bool], ...]],
                on_failure: Callable[[FactorEntry, str, DecompositionError], None]) -> None:
        """Owners decompose their factors; results go to the layer's other grad workers (with a status flag so
        a failed decomposition falls back to the plain gradient on every grad worker)."""
        ok: dict[tuple[str, str], bool] = {}
        for n, e in self.entries.items():
            for f in ("A", "G"):
                if self.plan.owner(n, f) != self.rank:
                    continue
                if getattr(e, f) is None:
                    ok[(n, f)] = False
                    continue
                try:
                    refresh_factor(e, f)
                    ok[(n, f)] = True
                except DecompositionError as exc:
                    on_failure(e, f, exc)
                    ok[(n, f)] = False
        members, group = self._columns[self.rank]
        if len(members) == 1:
            return
        for src in members:
            keys = [(n, f) for n in self.entries for f in ("A", "G") if self.plan.owner(n, f) == src]
            if not keys:
                continue
            like: list[Tensor] = []
            for n, f in keys:
                e = self.entries[n]
                like.append(torch.tensor([1.0 if ok.get((n, f), False) else 0.0], dtype=self._dtype(e),
                                         device=self._device(e)))
                for field, shape, sym in fields(e, f):
                    t = getattr(e, field) if src == self.rank and ok.get((n, f)) else None
                    like.append(_wire(t, shape, sym, self._dtype(e), self._device(e)))
            out = self.comm.broadcast(like, src=src, category="decompositions", group=group, group_size=len(members),
                                      control=len(keys))
            if src == self.rank:
                continue
            it = iter(out)
            for n, f in keys:
                e = self.entries[n]
                good = float(next(it)) > 0.5
                for field, shape, sym in fields(e, f):
                    received = next(it)
                    setattr(e, field, _unwire(received, shape, sym) if good else None)

    # -- 3. preconditioned gradients -----------------------------------------------------------------------
    def exchange_gradients(self, local: Mapping[str, tuple[Tensor, bool]], grads: Mapping[str, Tensor | None],
                           ) -> dict[str, tuple[Tensor, bool]]:
        """Every rank ends with ``(preconditioned gradient, preconditioned?)`` of every layer; ``local`` holds the
        layers this rank is a grad worker of (``False`` marks a plain gradient after a failed decomposition)."""
        members, group = self._rows[self.rank]
        out = dict(local)
        if len(members) == 1:
            return out
        for src in members:
            names = [n for n in self.entries if grads.get(n) is not None and self.plan.grad_source(n, self.rank) == src]
            if not names:
                continue
            like: list[Tensor] = []
            for n in names:
                e = self.entries[n]
                if src == self.rank:
                    v, ok = out[n]
                    like += [v, torch.tensor([1.0 if ok else 0.0], dtype=v.dtype, device=v.device)]
                else:
                    like += [torch.zeros(e.g_dim, e.a_dim, dtype=self._factor_dtype, device=self._device(e)),
                             torch.zeros(1, dtype=self._factor_dtype, device=self._device(e))]
            received = self.comm.broadcast(like, src=src, category="gradients", group=group, group_size=len(members),
                                           control=len(names))
            if src != self.rank:
                for k, n in enumerate(names):
                    out[n] = (received[2 * k], float(received[2 * k + 1]) > 0.5)
        return out

    # -- state ---------------------------------------------------------------------------------------------
    def gather_store_state(self, store, fields: Callable[[FactorEntry, str], tuple[tuple[str, tuple[int, ...], bool], ...]],
                           ) -> dict:
        """The complete store state dict on every rank: each factor's owner broadcasts its running factor and
        decomposition (a collective; a plain ``store.state_dict()`` in a single process)."""
        state = store.state_dict()
        if not self.comm.enabled:
            return state
        for src in range(self.world_size):
            keys = [(n, f) for n in self.entries for f in ("A", "G") if self.plan.owner(n, f) == src]
            slots: list[tuple[str, str]] = []
            like: list[Tensor] = []
            for n, f in keys:
                e = self.entries[n]
                shape = (e.a_dim,) if (f == "A" and e.a_diagonal) else ((e.a_dim, e.a_dim) if f == "A" else
                                                                        (e.g_dim, e.g_dim))
                for field, fshape, sym in ((f, shape, len(shape) == 2), *fields(e, f)):
                    t = getattr(e, field) if src == self.rank else None
                    like += [torch.tensor([1.0 if t is not None else 0.0], dtype=self._factor_dtype,
                                          device=self._device(e)),
                             _wire(t, fshape, sym, self._factor_dtype, self._device(e))]
                    slots.append((n, field, fshape, sym))
            if not like:
                continue
            received = self.comm.broadcast(like, src=src, category="state", control=len(slots))
            for k, (n, field, fshape, sym) in enumerate(slots):
                tensors = state["entries"][n]["tensors"]
                if float(received[2 * k]) > 0.5:
                    tensors[field] = _unwire(received[2 * k + 1], fshape, sym)
                else:
                    tensors.pop(field, None)
        return state

    def prune(self, fields: Callable[[FactorEntry, str], tuple[tuple[str, tuple[int, ...], bool], ...]]) -> None:
        """After loading a complete state: keep only what this rank holds under the current plan."""
        for n, e in self.entries.items():
            e.owner = self.plan.owner(n, "A")
            for f in ("A", "G"):
                if not self.holds(n, f):
                    setattr(e, f, None)
                if not (self.plan.owner(n, f) == self.rank or self.is_grad_worker(n)):
                    for field, _, _ in fields(e, f):
                        setattr(e, field, None)

    # -- helpers -------------------------------------------------------------------------------------------
    def _dtype(self, e: FactorEntry) -> torch.dtype:
        return self._factor_dtype

    def _device(self, e: FactorEntry) -> torch.device:
        return self._devices[e.name]

    def bind(self, *, factor_dtype: torch.dtype, devices: Mapping[str, torch.device]) -> None:
        self._factor_dtype = factor_dtype
        self._devices = dict(devices)


def _wire(t: Tensor | None, shape: tuple[int, ...], symmetric: bool, dtype: torch.dtype,
          device: torch.device) -> Tensor:
    """What travels for a tensor of ``shape``: packed upper triangle when symmetric; zeros as a placeholder."""
    if t is None:
        n = shape[0] * (shape[0] + 1) // 2 if symmetric else int(torch.Size(shape).numel())
        return torch.zeros(n, dtype=dtype, device=device)
    return pack_symmetric(t) if symmetric else t


def _unwire(t: Tensor, shape: tuple[int, ...], symmetric: bool) -> Tensor:
    return unpack_symmetric(t, shape[0]) if symmetric else t.reshape(shape)
