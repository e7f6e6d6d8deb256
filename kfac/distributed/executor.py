"""Executes a :class:`~kfac.planner.Plan`: who reduces, decomposes, preconditions and broadcasts what.

One code path for every world size: a single process is the trivial plan (rank 0 owns everything, no traffic).
Per step, in order (all collectives are issued in the same order on every rank of their group):

1. factor statistics (factor-update steps): summed over ranks, by all-reduce (``comm-opt``, ``mem-opt``,
   ``hybrid``) or by a reduce to each factor's owner (``dp-kfac``; ``factor_reduction="local"`` skips even that
   and uses the owner's local batch). Convention: gradients are averaged over ranks (DDP), so the local output
   gradients of a per-rank mean loss are ``world_size`` times those of the global mean loss, and
   ``G = sum_ranks g^T g / (world_size^2 N_total)``, which makes distributed factors equal single-process ones on
   the same global batch. Reductions are bucketed and launched during the backward pass
   (:mod:`kfac.distributed.reduction`).
2. decompositions (refresh steps): each factor's owner decomposes it and broadcasts the result to the layer's
   other grad workers (everyone for ``comm-opt``, the grad-worker column for ``hybrid``; with one grad worker
   per layer, only the decomposition of a factor owned apart from the layer's grad worker travels, point to
   point).
3. preconditioning: each layer's grad workers precondition it; every other rank receives the result from the
   grad worker of its receiver row (``mem-opt``, ``dp-kfac``: one worker, broadcast to all).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from .comm import Communicator
from ..kronecker.methods import DecompositionError
from ..planner import LayerSpec, Plan, make_plan
from .reduction import FactorReduction, PendingStats, Reduced, factor_shape, unwire, wire
from ..kronecker.store import FactorEntry

__all__ = ["Executor"]


class Executor:
    """Binds a plan to a communicator and this rank's factor store entries."""

    def __init__(self, *, comm: Communicator, entries: Sequence[FactorEntry], devices: Mapping[str, torch.device],
                 factor_dtype: torch.dtype, strategy: str | None, grad_worker_fraction: float | None,
                 factor_reduction: str, plan_kwargs: Mapping, stats: Callable[[str], PendingStats],
                 bucket_cap_bytes: int = 25 * 2**20) -> None:
        self.comm = comm
        self.factor_dtype = factor_dtype
        self.devices = dict(devices)
        self.rank, self.world_size = comm.rank, comm.world_size
        self.strategy_request, self.grad_worker_fraction = strategy, grad_worker_fraction
        self.factor_reduction = factor_reduction
        self.plan_kwargs = dict(plan_kwargs)
        self._stats, self.bucket_cap_bytes = stats, bucket_cap_bytes
        self.reduction: FactorReduction | None = None
        self.factor_wire_dtype: torch.dtype | None = None  # None: the communicator's comm_dtype
        self.replan(entries)

    # -- plan ----------------------------------------------------------------------------------------------
    def replan(self, entries: Sequence[FactorEntry]) -> None:
        """(Re)compute the plan for ``entries``, check every rank agrees, and record ownership in the store."""
        if self.reduction is not None:
            self.reduction.drain()
        specs = [LayerSpec(e.name, e.a_dim, e.g_dim, e.a_diagonal) for e in entries]
        plan = make_plan(specs, self.world_size, self.strategy_request, grad_worker_fraction=self.grad_worker_fraction,
                         **self.plan_kwargs)
        if self.factor_reduction == "local" and plan.factor_communication != "reduce":
            raise ValueError("factor_reduction='local' only applies to strategy='dp-kfac'")
        self.comm.check_identical({"layers": [s.to_dict() for s in specs], "plan": plan.digest(),
                                   "factor_reduction": self.factor_reduction}, what="the K-FAC layer plan")
        self.plan: Plan = plan
        self.entries = {e.name: e for e in entries}
        for e in entries:
            e.owner = plan.layer(e.name).grad_workers[0]
        self._columns = self._groups(plan.grad_worker_columns())
        self._rows = self._groups(plan.grad_receiver_rows())
        self.reduction = FactorReduction(comm=self.comm, plan=plan, entries=entries, devices=self.devices,
                                         dtype=self.factor_dtype, local=self.factor_reduction == "local",
                                         stats=self._stats, bucket_cap_bytes=self.bucket_cap_bytes,
                                         wire_dtype=self.factor_wire_dtype)

    def _groups(self, partition: tuple[tuple[int, ...], ...]) -> dict[int, tuple[tuple[int, ...], object]]:
        """rank -> (members, process group) of the partition block containing it (world group when it is all);
        only this rank's own block gets a process group (created by its members)."""
        out = {}
        for block in partition:
            mine = self.rank in block and 1 < len(block) < self.world_size
            group = self.comm.new_group(block) if mine else None
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
    @property
    def narrow_factor_wire(self) -> bool:
        """Whether factor statistics travel in a dtype that can overflow where ``factor_dtype`` does not (float16);
        such a run must agree on overflows and then :meth:`widen_factor_wire`."""
        wire = self.factor_wire_dtype or self.comm.comm_dtype
        return (self.comm.enabled and wire is not None and self.factor_reduction != "local"
                and torch.finfo(wire).max < torch.finfo(self.factor_dtype).max / 2 ** 16)

    def widen_factor_wire(self) -> None:
        """Send factor statistics in ``factor_dtype`` from now on (call on every rank together)."""
        self.factor_wire_dtype = self.factor_dtype
        assert self.reduction is not None  # set by replan(), which __init__ runs
        self.reduction.wire_dtype = self.factor_dtype

    def mark_final(self, name: str) -> None:
        """Layer ``name`` has its final statistics of this step (may launch its bucket's reduction)."""
        assert self.reduction is not None  # set by replan(), which __init__ runs
        self.reduction.mark_final(name)

    def launch_statistics(self) -> None:
        """Launch the factor reductions the backward pass did not (call before any other collective of a step)."""
        assert self.reduction is not None  # set by replan(), which __init__ runs
        self.reduction.launch_remaining()

    def reduce_statistics(self) -> dict[str, Reduced]:
        """``(A_batch, G_batch, seen)`` per layer (see :class:`kfac.distributed.reduction.FactorReduction`)."""
        assert self.reduction is not None  # set by replan(), which __init__ runs
        return self.reduction.collect()

    def discard_statistics(self) -> None:
        assert self.reduction is not None  # set by replan(), which __init__ runs
        self.reduction.drain()

    # -- 2. decompositions ---------------------------------------------------------------------------------
    def refresh(self, refresh_factor: Callable[[FactorEntry, str], None],
                fields: Callable[[FactorEntry, str], tuple[tuple[str, tuple[int, ...], bool], ...]],
                on_failure: Callable[[FactorEntry, str, DecompositionError], None]) -> None:
        """Owners decompose their factors; results go to the layer's other grad workers (with a status flag so
        a failed decomposition falls back to the plain gradient on every grad worker): broadcast within the
        grad-worker column, or point-to-point to the single grad worker of a layer whose ``A`` and ``G`` are
        owned apart."""
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
                    # the memory layout the other ranks receive (eigh returns column-major eigenvectors): the
                    # same products then run the same kernels everywhere, so every rank's update is bitwise equal
                    for field, _, _ in fields(e, f):
                        t = getattr(e, field)
                        if t is not None and not t.is_contiguous():
                            setattr(e, field, t.contiguous())
                except DecompositionError as exc:
                    on_failure(e, f, exc)
                    ok[(n, f)] = False
        members, group = self._columns[self.rank]
        if len(members) == 1:
            self._send_decompositions(ok, fields)
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

    def _send_decompositions(self, ok: Mapping[tuple[str, str], bool],
                             fields: Callable[[FactorEntry, str], tuple[tuple[str, tuple[int, ...], bool], ...]],
                             ) -> None:
        """One grad worker per layer: each decomposition whose owner is not the grad worker goes point to point
        (one bucket per pair of ranks)."""
        outgoing: dict[int, list] = {}
        incoming: dict[int, list] = {}
        for n, e in self.entries.items():
            for f in ("A", "G"):
                owner = self.plan.owner(n, f)
                for r in self.plan.decomposition_receivers(n, f):
                    if self.rank == owner:
                        outgoing.setdefault(r, []).extend(
                            (n, ok.get((n, f), False), getattr(e, field), shape, sym)
                            for field, shape, sym in fields(e, f))
                    elif self.rank == r:
                        incoming.setdefault(owner, []).extend(
                            (n, field, shape, sym) for field, shape, sym in fields(e, f))
        if not (outgoing or incoming):
            return
        sends = {dst: self._flagged(items, mine=True) for dst, items in outgoing.items()}
        like = {src: self._flagged([(n, False, None, shape, sym) for n, _, shape, sym in items], mine=False)
                for src, items in incoming.items()}
        got = self.comm.send_recv(sends, like, category="decompositions",
                                  control={dst: len(items) for dst, items in outgoing.items()})
        for src, items in incoming.items():
            for (n, field, shape, sym), (good, t) in zip(items, _unflag(got[src], [(s, y) for _, _, s, y in items])):
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
                     for field, shape, sym in ((f, factor_shape(e, f), len(factor_shape(e, f)) == 2),
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
    def _flagged(self, items: Sequence[tuple[str, bool, Tensor | None, tuple[int, ...], bool]], *,
                 mine: bool) -> list[Tensor]:
        """``(flag, tensor)`` pairs as they travel (symmetric tensors packed); placeholders unless ``mine``."""
        out: list[Tensor] = []
        for n, flag, t, shape, sym in items:
            device = self.devices[n]
            out += [torch.tensor([1.0 if mine and flag else 0.0], dtype=self.factor_dtype, device=device),
                    wire(t if mine and flag else None, shape, sym, self.factor_dtype, device)]
        return out

    def _broadcast_flagged(self, items: Sequence[tuple[str, bool, Tensor | None, tuple[int, ...], bool]], *,
                           src: int, category: str, group: object | None = None, group_size: int | None = None,
                           ) -> list[tuple[bool, Tensor]]:
        """Broadcast ``src``'s ``(layer, flag, tensor, shape, symmetric)`` items (one bucket; symmetric tensors
        packed; flags counted as control bytes); every rank gets ``(flag, tensor)`` per item. Other ranks' tensors
        and flags are ignored (placeholders)."""
        if not items:
            return []
        like = self._flagged(items, mine=src == self.rank)
        out = self.comm.broadcast(like, src=src, category=category, group=group, group_size=group_size,
                                  control=len(items))
        return _unflag(out, [(shape, sym) for _, _, _, shape, sym in items])


def _unflag(out: Sequence[Tensor], layout: Sequence[tuple[tuple[int, ...], bool]]) -> list[tuple[bool, Tensor]]:
    return [(float(out[2 * k]) > 0.5, unwire(out[2 * k + 1], shape, sym)) for k, (shape, sym) in enumerate(layout)]
