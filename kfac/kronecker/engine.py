"""The curvature engine: the factor store, the plan executor and a curvature method, composed.

It turns reduced statistics into running factors (``F <- decay F + (1 - decay) F_batch``, ``F`` initialised to the
identity), decompositions into preconditioned gradients, and answers curvature queries (``ihvp``, ``diag``) and
state requests. It knows nothing of hooks or schedules: :class:`kfac.KFACPreconditioner` (training) and
:class:`kfac.influence.InfluenceAnalyzer` (fitting) drive it.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._tensor import finite_groups, foreach_mul_, kl_clip_scale, update_dots
from ..distributed.comm import Communicator
from ..distributed.config import DistributedConfig
from ..distributed.executor import Executor
from ..distributed.reduction import PendingStats, Reduced
from ..distributed.fsdp import ShardedGradients
from ..modules import ModuleAdapter
from ..planner import CostModel, sharded_strategy
from .methods import WARM_REFRESH_FRACTION, DecompositionError
from .store import FactorEntry, FactorStore

__all__ = ["CurvatureEngine", "Staged"]

logger = logging.getLogger("kfac")


@dataclass
class Staged:
    """Preconditioned gradients queued by one step (``names[i]``'s update is ``updates[i]``, to be written through
    ``adapters[i]``, or for a sharded layer into the ``(local .grad, view of updates[i])`` pairs of ``targets``),
    with their per-layer dots ``<P(g), g>`` (the finiteness check)."""

    names: list[str]
    adapters: list[ModuleAdapter]
    updates: list[Tensor]
    dots: Tensor | None
    targets: dict[str, list[tuple[Tensor, Tensor]]] = dataclasses.field(default_factory=dict)

    def non_finite(self, tracked: Sequence[str]) -> list[bool]:
        """Per tracked layer (a vector of the same length on every rank), whether its preconditioned gradient is
        non-finite (one host sync)."""
        finite = [] if self.dots is None else torch.isfinite(self.dots).tolist()
        bad = {name for name, ok in zip(self.names, finite) if not ok}
        return [name in bad for name in tracked]

    def pairs(self, bad: Collection[str], fall_back: Callable[[str], None]) -> list[tuple[Tensor, Tensor]]:
        """The ``(.grad, new value)`` pairs to copy; a layer in ``bad`` keeps its plain gradient (``fall_back``)."""
        out = []
        for name, adapter, v in zip(self.names, self.adapters, self.updates):
            if name in bad:
                fall_back(name)
            else:
                out += self.targets[name] if name in self.targets else adapter.grad_targets(v)
        return out


class CurvatureEngine:
    """Store + executor + method of one preconditioner (see the module docstring)."""

    def __init__(self, *, store: FactorStore, comm: Communicator, executor: Executor, method: Any,
                 factor_dtype: torch.dtype, shards: ShardedGradients | None = None) -> None:
        self.store, self.comm, self.executor, self.method = store, comm, executor, method
        self.factor_dtype = factor_dtype
        self.shards = shards if shards is not None else ShardedGradients(comm=comm, params={}, dtype=factor_dtype)
        self._bound: object = None  # the plan the shards' workers were chosen under
        self._bind_shards()

    @classmethod
    def create(cls, *, store: FactorStore, method: Any, factor_dtype: torch.dtype, config: DistributedConfig,
               options: Mapping[str, Any], devices: Mapping[str, torch.device], intervals: Mapping[str, int],
               stats: Callable[[str], PendingStats], params: Mapping[str, Sequence[Tensor]] | None = None,
               ) -> "CurvatureEngine":
        """The engine of ``store``'s layers under ``config``: the communicator (every rank must pass identical
        ``options`` and config, else a clear error naming the difference on every rank), the plan for the
        constant ``intervals`` (the cost model defaults to this run's element sizes) and its executor; ``params``
        (each layer's parameters) finds the FSDP2-sharded layers (:mod:`kfac.distributed.fsdp`)."""
        cost_model = config.cost_model
        if cost_model is None:  # default constants, with the element sizes this run actually stores and sends
            wire = config.comm_dtype or factor_dtype
            cost_model = dataclasses.replace(CostModel.default(), bytes_per_element=factor_dtype.itemsize,
                                             comm_bytes_per_element=wire.itemsize)
        warm = getattr(method, "warm", None)
        if warm is not None and cost_model.refresh_fraction == 1.0:  # refreshes keep or correct the last basis
            cost_model = dataclasses.replace(cost_model, refresh_fraction=WARM_REFRESH_FRACTION)
        plan_kwargs: dict[str, Any] = {"method": method.decomposition, "cost_model": cost_model,
                                       "memory_cap": config.memory_cap, "split": config.split_factors, **intervals}
        comm = Communicator(group=config.process_group, comm_dtype=config.comm_dtype, step_timeout=config.step_timeout)
        comm.check_identical({**options, **config.comparable()}, what="K-FAC options")
        shards = ShardedGradients(comm=comm, params=params or {}, dtype=factor_dtype)
        strategy, fraction = config.strategy, config.grad_worker_fraction
        if strategy is None and shards:  # sharded model: memory first (kfac.planner.sharded)
            strategy, fraction = sharded_strategy(comm.world_size, len(shards.members), corrects=method.corrects)
        executor = Executor(comm=comm, entries=[store[n] for n in store], devices=devices, factor_dtype=factor_dtype,
                            strategy=strategy, grad_worker_fraction=fraction,
                            factor_reduction=config.factor_reduction, plan_kwargs=plan_kwargs, stats=stats,
                            bucket_cap_bytes=config.bucket_cap_bytes)
        return cls(store=store, comm=comm, executor=executor, method=method, factor_dtype=factor_dtype, shards=shards)

    def _bind_shards(self) -> None:
        """Choose each sharded layer's worker in this rank's shard group under the current plan
        (:meth:`kfac.planner.Plan.shard_worker`)."""
        plan = self.executor.plan
        if not self.shards or self._bound is plan:
            return

        def worker(name: str, members: Sequence[int]) -> int:
            return plan.shard_worker(name, [self.comm.ranks.index(g) for g in members])

        self.shards.bind(worker)
        self._bound = plan

    # -- factors -------------------------------------------------------------------------------------------
    def reduce_factors(self, step: int) -> tuple[dict[str, Reduced], list[str]] | None:
        """This step's batch factors, reduced under the plan, without the layers whose batch factors are
        non-finite (returned second: they keep their factors); ``None`` (logged) when a narrow wire dtype
        overflowed on some rank -- this step's statistics are dropped and factors travel in ``factor_dtype``
        from then on."""
        batches = self.executor.reduce_statistics()
        # batch factors are Gram matrices: |M_ij| <= sqrt(M_ii M_jj), so they are finite iff their diagonals are
        # (O(d) to check instead of O(d^2))
        names = list(batches)
        finite = finite_groups([[t.diagonal() if t.dim() == 2 else t for t in batches[n][:2] if t is not None]
                                for n in names])
        if self.executor.narrow_factor_wire:  # float16 on the wire can overflow: decide together, then widen it
            if not self.comm.all_true(all(finite)):
                self.executor.widen_factor_wire()
                logger.warning("kfac: factor statistics overflowed %s on the wire at step %d; this step's statistics "
                               "are dropped and factors travel in %s from now on", self.comm.comm_dtype,
                               step, self.factor_dtype)
                return None
        bad = [n for n, ok in zip(names, finite) if not ok]
        return {n: batches[n] for n, ok in zip(names, finite) if ok}, bad

    def absorb(self, entries: Iterable[FactorEntry], batches: Mapping[str, Reduced], decay: float, *,
               init: str = "identity") -> None:
        """``F <- decay F + (1 - decay) F_batch`` for every factor this rank holds, from the identity
        (``init="identity"``, KAISA) or from zero with the bias correction of Adam / kfac-jax (``init="zero"``:
        ``F_k = sum_i w_i F_batch_i`` with weights ``∝ decay^(k-i)`` summing to 1, i.e. a lerp with weight
        ``(1 - decay) / (1 - decay^k)`` at the ``k``-th update, so the first update is the first batch's factor)."""
        for entry in entries:
            if entry.name not in batches:  # dropped (non-finite statistics)
                continue
            a_batch, g_batch, seen = batches[entry.name]
            weight = 1 - decay
            if init == "zero":  # decay 1: the plain running mean
                k = entry.num_updates + 1
                weight = 1 / k if decay >= 1 else (1 - decay) / (1 - decay ** k)
            if a_batch is not None:
                if entry.A is None:
                    entry.A = (torch.ones_like(a_batch) if entry.a_diagonal else
                               torch.eye(entry.a_dim, dtype=a_batch.dtype, device=a_batch.device))
                entry.A = torch.lerp(entry.A, a_batch, weight)  # (1 - w) A + w A_batch, a new tensor
            if g_batch is not None:
                if entry.G is None:
                    entry.G = torch.eye(entry.g_dim, dtype=g_batch.dtype, device=g_batch.device)
                entry.G = torch.lerp(entry.G, g_batch, weight)
            if seen:
                entry.num_updates += 1

    def refresh(self, damping: float, entries: Iterable[FactorEntry]) -> None:
        """Owners decompose their factors and share them under the plan; a failed decomposition leaves that layer
        on its plain gradient until the next refresh (warned). EK-FAC corrections restart from the new
        eigenvalues on the layers' grad workers."""
        def failed(entry: FactorEntry, factor: str, exc: DecompositionError) -> None:
            warnings.warn(f"kfac: {exc}; layer {entry.name!r} uses its plain gradient until the next refresh",
                          stacklevel=6)

        self.executor.refresh(lambda e, f: self.method.refresh_factor(e, f, damping=damping), self.method.fields,
                              failed)
        if self.method.corrects:
            for entry in entries:
                if self.executor.is_grad_worker(entry.name):
                    self.method.reset_corrections(entry)

    # -- preconditioning -----------------------------------------------------------------------------------
    def gradients(self, adapters: Mapping[str, ModuleAdapter]) -> dict[str, Tensor | None]:
        """Each layer's gradient as this rank holds it: its ``(g_dim, a_dim)`` matrix, or for a sharded layer this
        rank's rows of its parameters' gradients, flattened (``None`` without a gradient)."""
        return {n: self.shards.local(n) if n in self.shards else a.grad_matrix() for n, a in adapters.items()}

    def precondition(self, adapters: Mapping[str, ModuleAdapter], grads: Mapping[str, Tensor | None], *,
                     damping: float, kl_clip: float | None, lrs: Mapping[str, float] | None) -> Staged:
        """Queue the preconditioning of every tracked gradient (``grads`` from :meth:`gradients`; exchanged
        between ranks, scaled by ``kl_clip`` when ``lrs`` is given) and the per-layer dots that check it, leaving
        the gradients untouched."""
        local: dict[str, tuple[Tensor, bool]] = {}
        plain = {n: g for n, g in grads.items() if n not in self.shards}
        for name in adapters:  # the tracked layers (``grads`` may still hold one untracked this step)
            grad = plain.get(name)
            if grad is None or not self.executor.is_grad_worker(name):
                continue
            local[name] = self._precondition_one(name, grad, damping)
        results = self.executor.exchange_gradients(local, plain)
        self._bind_shards()
        sharded = self.shards.exchange({n: grads.get(n) for n in adapters if n in self.shards},
                                       lambda n, full: self._precondition_whole(adapters[n], n, full, damping))
        names = [n for n in adapters if (n in results and results[n][1]) or (n in sharded and sharded[n].ok)]
        updates = [sharded[n].update if n in sharded else results[n][0] for n in names]
        pairs = [(v, plain[n]) for n, v in zip(names, updates) if n not in sharded]
        own = iter(update_dots(pairs) if pairs else ())  # type: ignore[arg-type]
        dots = torch.stack([sharded[n].dot if n in sharded else next(own) for n in names]) if names else None
        if lrs is not None and dots is not None and kl_clip is not None:
            # each v is a fresh preconditioned tensor (or a received buffer), never the gradient
            foreach_mul_(updates, kl_clip_scale(dots, [lrs[n] for n in names], kl_clip))
        return Staged(names=names, adapters=[adapters[n] for n in names], updates=updates, dots=dots,
                      targets={n: sharded[n].targets for n in names if n in sharded})

    def _precondition_whole(self, adapter: ModuleAdapter, name: str, full: list[Tensor],
                            damping: float) -> tuple[Tensor, bool, Tensor]:
        """A sharded layer on its worker: from its full per-parameter gradients, ``P(g)`` per parameter flattened
        into one tensor, whether it was preconditioned (else ``g``), and ``<P(g), g>``."""
        grad = adapter.matrix_of(full)
        assert grad is not None  # the weight's gradient is there (ShardedGradients.local)
        v, ok = self._precondition_one(name, grad, damping)
        dot = update_dots([(v, grad)])[0]
        return torch.cat([t.reshape(-1) for t in adapter.split_matrix(v)]).to(self.factor_dtype), ok, dot

    def _precondition_one(self, name: str, grad: Tensor, damping: float) -> tuple[Tensor, bool]:
        """``(P(g), True)`` for a layer with decompositions, else ``(g, False)`` (in the factor dtype)."""
        entry = self.store[name]
        if self.method.ready(entry):
            return self.method.precondition(entry, grad, damping=damping), True
        return grad.to(self.factor_dtype), False

    # -- queries -------------------------------------------------------------------------------------------
    def ready_entry(self, name: str) -> FactorEntry:
        """The store entry of ``name``, which must hold its decompositions on this rank (clear error otherwise)."""
        entry = self.store[name]
        if not self.method.ready(entry):
            plan = self.executor.plan
            where = (f"; rank {self.comm.rank} of {self.comm.world_size} only holds the decompositions the "
                     f"{plan.strategy!r} plan assigns it (use strategy='comm-opt' to hold them all)"
                     if self.comm.world_size > 1 else "")
            raise RuntimeError(f"layer {name!r} has no decompositions: call update() and refresh() first{where}")
        return entry

    def ihvp(self, named: Mapping[str, Tensor], damping: float) -> dict[str, Tensor]:
        """``(C + damping I)^-1 g`` per layer (validated blocks)."""
        return {name: self.method.precondition(self.ready_entry(name), g, damping=damping).to(g.dtype)
                for name, g in named.items()}

    def diag(self, names: Iterable[str], damping: float) -> dict[str, Tensor]:
        """The diagonal of ``(C + damping I)^-1`` per layer, as ``(g_dim, a_dim)`` matrices."""
        return {name: self.method.diag(self.ready_entry(name), damping=damping) for name in names}

    # -- state ---------------------------------------------------------------------------------------------
    def holds_everything(self, names: Iterable[str]) -> bool:
        """Whether this rank holds every running factor and decomposition of ``names`` (a complete state)."""
        return all(self.executor.holds(n, f) and self.executor.is_grad_worker(n) for n in names for f in "AG")

    def consolidated_store_state(self) -> dict[str, Any]:
        """The complete store state on every rank (a collective: each factor's owner sends its state)."""
        return self.executor.gather_store_state(self.store, self.method.fields)

    def load_store_state(self, state: Mapping[str, Any], devices: Mapping[str, torch.device]) -> None:
        """Load a store state, keep what this rank holds under the plan, move it to the layers' devices."""
        self.store.load_state_dict(state)
        self.executor.prune(self.method.fields)
        for name, device in devices.items():
            self.store[name].to(device)

    def validate_store_state(self, state: Mapping[str, Any], entries: Iterable[FactorEntry]) -> None:
        """Raise if ``state`` does not fit ``entries`` (dims, fields, dtypes, finiteness); nothing is changed."""
        probe = FactorStore()
        for e in entries:
            probe.add(e.name, a_dim=e.a_dim, g_dim=e.g_dim, a_diagonal=e.a_diagonal)
        probe.load_state_dict(state)
