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

    def __init__(self, *, comm: Communicator, entries: Sequence[FactorEntry], devices: Mapping[str, torch.device],
                 factor_dtype: torch.dtype, strategy: str | None, grad_worker_fraction: float | None,
                 factor_reduction: str, plan_kwargs: Mapping) -> None:
        if factor_reduction not in FACTOR_REDUCTIONS:
            raise ValueError(f"factor_reduction must be one of {FACTOR_REDUCTIONS}, got {factor_reduction!r}")
        self.comm = comm
        self.factor_dtype = factor_dtype
        self.devices = dict(devices)
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
        counts = torch.tensor([[pending[n].a_count, pending[n].g_count] for n in names], dtype=torch.float64)
        local = self.factor_reduction == "local"
        if self.comm.enabled and not local:  # counts first, exactly (never in a low-precision comm dtype)
            counts = self.comm.all_reduce_sum([counts.to(self._any_device())], category="factor_counts",
                                              exact=True)[0].cpu()
        seen = [bool(a_n > 0 and g_n > 0) for a_n, g_n in counts.tolist()]
        # each rank's sum divided by the *global* count: reductions yield the mean directly, and values stay at the
        # scale of a factor (no overflow in float16 on the wire)
        g_scale = float(self.world_size) ** 2
        means: dict[tuple[str, str], Tensor | None] = {}
        for i, n in enumerate(names):
            e, p = self.entries[n], pending[n]
            a_n, g_n = counts[i].tolist()
            means[(n, "A")] = _batch_mean(p.a_sum, a_n, e.a_diagonal) if seen[i] else None
            means[(n, "G")] = _batch_mean(p.g_sum, g_n * g_scale, False) if seen[i] else None
        if not self.comm.enabled:
            return {n: (means[(n, "A")], means[(n, "G")], seen[i]) for i, n in enumerate(names)}
        payload = {(n, f): _wire(means[(n, f)], _factor_shape(self.entries[n], f),
                                 len(_factor_shape(self.entries[n], f)) == 2, dtype, self.devices[n])
                   for n in names for f in ("A", "G")}
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
        def received(n: str, f: str, i: int) -> Tensor | None:
            if (n, f) not in reduced or not seen[i]:
                return None
            shape = _factor_shape(self.entries[n], f)
            return _unwire(reduced[(n, f)], shape, len(shape) == 2).to(dtype)

        return {n: (received(n, "A", i), received(n, "G", i), seen[i]) for i, n in enumerate(names)}

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
            slots = [(n, f, field, shape, sym) for n, e in self.entries.items() for f in ("A", "G")
                     if self.plan.owner(n, f) == src for field, shape, sym in fields(e, f)]
            sent = [(n, ok.get((n, f), False), getattr(self.entries[n], field), shape, sym)
                    for n, f, field, shape, sym in slots]
            received = self._broadcast_flagged(sent, src=src, category="decompositions", group=group,
                                               group_size=len(members))
            if src != self.rank:
                for (n, _, field, _, _), (good, t) in zip(slots, received):
                    setattr(self.entries[n], field, t if good else None)

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
            sent = [(n, *(out[n][::-1] if src == self.rank else (False, None)),
                     (self.entries[n].g_dim, self.entries[n].a_dim), False) for n in names]
            received = self._broadcast_flagged(sent, src=src, category="gradients", group=group,
                                               group_size=len(members))
            if src != self.rank:
                out.update((n, (t, ok)) for n, (ok, t) in zip(names, received))
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
            slots = [(n, field, shape, sym) for n, e in self.entries.items() for f in ("A", "G")
                     if self.plan.owner(n, f) == src
                     for field, shape, sym in ((f, _factor_shape(e, f), len(_factor_shape(e, f)) == 2),
                                               *fields(e, f))]
            sent = [(n, getattr(self.entries[n], field) is not None, getattr(self.entries[n], field), shape, sym)
                    for n, field, shape, sym in slots]
            received = self._broadcast_flagged(sent, src=src, category="state")
            for (n, field, _, _), (present, t) in zip(slots, received):
                tensors = state["entries"][n]["tensors"]
                if present:
                    tensors[field] = t
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
    def _broadcast_flagged(self, items: Sequence[tuple[str, bool, Tensor | None, tuple[int, ...], bool]], *,
                           src: int, category: str, group: object | None = None, group_size: int | None = None,
                           ) -> list[tuple[bool, Tensor]]:
        """Broadcast ``src``'s ``(layer, flag, tensor, shape, symmetric)`` items (one bucket; symmetric tensors
        packed; flags counted as control bytes); every rank gets ``(flag, tensor)`` per item. Other ranks' tensors
        and flags are ignored (placeholders)."""
        if not items:
            return []
        mine = src == self.rank
        like: list[Tensor] = []
        for n, flag, t, shape, sym in items:
            device = self.devices[n]
            like += [torch.tensor([1.0 if mine and flag else 0.0], dtype=self.factor_dtype, device=device),
                     _wire(t if mine and flag else None, shape, sym, self.factor_dtype, device)]
        out = self.comm.broadcast(like, src=src, category=category, group=group, group_size=group_size,
                                  control=len(items))
        return [(float(out[2 * k]) > 0.5, _unwire(out[2 * k + 1], shape, sym))
                for k, (_, _, _, shape, sym) in enumerate(items)]

    def _any_device(self) -> torch.device:
        return next(iter(self.devices.values()), torch.device("cpu"))


def _factor_shape(e: FactorEntry, factor: str) -> tuple[int, ...]:
    if factor == "A":
        return (e.a_dim,) if e.a_diagonal else (e.a_dim, e.a_dim)
    return (e.g_dim, e.g_dim)


def _batch_mean(total: Tensor | None, norm: float, diagonal: bool) -> Tensor | None:
    """``total / norm``, symmetrised (``(M + M^T) / 2``) unless ``diagonal``; one allocation. ``None`` (this rank
    did not see the layer) stays ``None`` and travels as zeros."""
    if total is None:
        return None
    if diagonal:
        return total / norm
    return torch.add(total, total.T).mul_(0.5 / norm)


def _wire(t: Tensor | None, shape: tuple[int, ...], symmetric: bool, dtype: torch.dtype,
          device: torch.device) -> Tensor:
    """What travels for a tensor of ``shape``: packed upper triangle when symmetric; zeros as a placeholder."""
    if t is None:
        n = shape[0] * (shape[0] + 1) // 2 if symmetric else int(torch.Size(shape).numel())
        return torch.zeros(n, dtype=dtype, device=device)
    return pack_symmetric(t) if symmetric else t


def _unwire(t: Tensor, shape: tuple[int, ...], symmetric: bool) -> Tensor:
    return unpack_symmetric(t, shape[0]) if symmetric else t.reshape(shape)
