"""Distributed K-FAC's sharding plan (the data model): who decomposes, preconditions and holds what, what is sent.

:func:`kfac.planner.make_plan` (:mod:`kfac.planner.search`) builds a :class:`Plan`; this module only describes one
and imports nothing from the search.

Strategies (identical math; ``N`` ranks, ``G`` grad workers per layer):

============  ===  =====================  ==============================================  ==========================
strategy      G    factors                decompositions                                  preconditioned gradient
============  ===  =====================  ==============================================  ==========================
``comm-opt``  N    all-reduced (all hold)  owner broadcasts to all ranks                   computed by every rank
``mem-opt``   1    all-reduced (all hold)  stay on the owner                               owner broadcasts to all
``hybrid``    fN   all-reduced (all hold)  owner broadcasts within its grad-worker column  each column member sends
                                                                                          to its receiver row
``dp-kfac``   1    reduced to the owner    stay on the owner                               owner broadcasts to all
============  ===  =====================  ==============================================  ==========================

``comm-opt``/``mem-opt``/``hybrid`` are KAISA with ``grad_worker_fraction`` 1, ``1/N`` and ``f`` (``G =
max(1, round(f N))`` must divide ``N``; columns/rows as in :func:`grad_worker_columns`).
``dp-kfac`` is DP-KFAC's distributed preconditioning: each factor only lives on its owner.

KAISA's grad-worker grid (``partition_grad_workers`` / ``partition_grad_receivers``) is :func:`grad_worker_columns`
and :func:`grad_receiver_rows`: with ``G`` grad workers per layer and ``P = N / G``, ranks form a ``G x P`` grid,
row-major; the columns ``{c, c+P, ..., c+(G-1)P}`` are the grad-worker groups and the rows
``{kP, ..., kP+P-1}`` the gradient-receiver groups (each row holds exactly one member of every column).

Communication (bytes per step, summed over all ranks; ``s = comm_bytes_per_element``; ``fu``/``iu`` the factor and
decomposition update intervals; packed factor ``d(d+1)/2``, diagonal ``d``):

* factor reduction: all-reduce ``2 (N-1) s packed / fu`` per factor (ring volume); dp-kfac's reduce
  ``(N-1) s packed / fu``;
* decomposition broadcast: ``|grad_workers - {owner}| s dec / iu`` per factor (``dec`` from :class:`CostModel`);
* gradient broadcast: ``(N - G) s g a`` per layer per step.

These are K-FAC's traffic on top of the data-parallel gradient all-reduce, which every strategy keeps.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from .cost import CostModel, LayerSpec

__all__ = [
    "STRATEGIES", "FACTORS", "CommBytes", "LayerAssignment", "Plan", "grad_workers_per_layer",
    "grad_worker_columns", "grad_receiver_rows", "check_positive_int",
]

STRATEGIES = ("comm-opt", "mem-opt", "hybrid", "dp-kfac")
"""Distribution strategies understood by :func:`kfac.planner.make_plan`."""
FACTORS = ("A", "G")
"""The two Kronecker factors of a layer; slot 0 is ``A``, slot 1 is ``G`` wherever a pair is indexed."""
_FORMAT = "kfac.planner.Plan"
_VERSION = 1


def check_positive_int(value: Any, name: str) -> int:
    """``value`` if it is an ``int >= 1`` (not a ``bool``), else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def grad_workers_per_layer(strategy: str, world_size: int, grad_worker_fraction: Optional[float] = None) -> int:
    """``G``: ``N`` for comm-opt, 1 for mem-opt and dp-kfac, ``max(1, round(f N))`` for hybrid (must divide N)."""
    check_positive_int(world_size, "world_size")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy != "hybrid":
        if grad_worker_fraction is not None:
            raise ValueError(f"grad_worker_fraction only applies to strategy='hybrid' (got strategy={strategy!r})")
        return world_size if strategy == "comm-opt" else 1
    f = 0.5 if grad_worker_fraction is None else grad_worker_fraction
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
        raise ValueError(f"grad_worker_fraction must be in (0, 1], got {grad_worker_fraction!r}")
    g = max(1, round(f * world_size))
    if world_size % g:
        raise ValueError(f"grad_worker_fraction={f} gives {g} grad workers per layer, which does not divide "
                         f"world_size={world_size} (KAISA needs equal-sized grad-worker groups)")
    return g


def grad_worker_columns(world_size: int, grad_workers: int) -> tuple[tuple[int, ...], ...]:
    """KAISA's grad-worker groups: ``P = N / G`` columns ``(c, c+P, ..., c+(G-1)P)``."""
    _check_grid(world_size, grad_workers)
    p = world_size // grad_workers
    return tuple(tuple(range(c, world_size, p)) for c in range(p))


def grad_receiver_rows(world_size: int, grad_workers: int) -> tuple[tuple[int, ...], ...]:
    """KAISA's gradient-receiver groups: ``G`` rows ``(kP, ..., kP+P-1)``."""
    _check_grid(world_size, grad_workers)
    p = world_size // grad_workers
    return tuple(tuple(range(k * p, k * p + p)) for k in range(grad_workers))


def _check_grid(world_size: int, grad_workers: int) -> None:
    if world_size < 1 or grad_workers < 1 or world_size % grad_workers:
        raise ValueError(f"grad workers per layer ({grad_workers}) must divide the world size ({world_size})")


@dataclass(frozen=True)
class CommBytes:
    """Bytes communicated per step, summed over all ranks, split by purpose (see the module docstring)."""

    factor_reduction: float = 0.0
    decomposition_broadcast: float = 0.0
    gradient_broadcast: float = 0.0

    @property
    def total(self) -> float:
        return self.factor_reduction + self.decomposition_broadcast + self.gradient_broadcast

    def __add__(self, other: "CommBytes") -> "CommBytes":
        return CommBytes(self.factor_reduction + other.factor_reduction,
                         self.decomposition_broadcast + other.decomposition_broadcast,
                         self.gradient_broadcast + other.gradient_broadcast)

    def to_dict(self) -> dict[str, float]:
        return {"factor_reduction": self.factor_reduction, "decomposition_broadcast": self.decomposition_broadcast,
                "gradient_broadcast": self.gradient_broadcast}


@dataclass(frozen=True)
class LayerAssignment:
    """Where one layer's work happens.

    ``a_owner``/``g_owner`` decompose ``A``/``G`` (and, under dp-kfac, are the only ranks that hold that factor:
    it is *reduced* to them). ``grad_workers`` precondition the layer and hold both decompositions; the owner of
    each factor sends its decomposition to every grad worker other than itself. Ranks outside ``grad_workers``
    receive the preconditioned gradient (see :meth:`Plan.grad_source`). Seconds are per refresh
    (``a_seconds``, ``g_seconds``) and per step (``precondition_seconds``, on each grad worker); ``comm`` is this
    layer's share of the plan's bytes per step.
    """

    name: str
    a_dim: int
    g_dim: int
    a_diagonal: bool
    a_owner: int
    g_owner: int
    grad_workers: tuple[int, ...]
    a_seconds: float
    g_seconds: float
    precondition_seconds: float
    comm: CommBytes

    @property
    def colocated(self) -> bool:
        return self.a_owner == self.g_owner

    @property
    def spec(self) -> LayerSpec:
        return LayerSpec(self.name, self.a_dim, self.g_dim, self.a_diagonal)

    def owner(self, factor: str) -> int:
        """Rank that decomposes factor ``"A"`` or ``"G"``."""
        if factor not in FACTORS:
            raise ValueError(f"factor must be 'A' or 'G', got {factor!r}")
        return self.a_owner if factor == "A" else self.g_owner

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "a_dim": self.a_dim, "g_dim": self.g_dim, "a_diagonal": self.a_diagonal,
                "a_owner": self.a_owner, "g_owner": self.g_owner, "grad_workers": list(self.grad_workers),
                "a_seconds": self.a_seconds, "g_seconds": self.g_seconds,
                "precondition_seconds": self.precondition_seconds, "comm": self.comm.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerAssignment":
        return cls(name=d["name"], a_dim=d["a_dim"], g_dim=d["g_dim"], a_diagonal=d["a_diagonal"],
                   a_owner=d["a_owner"], g_owner=d["g_owner"], grad_workers=tuple(d["grad_workers"]),
                   a_seconds=d["a_seconds"], g_seconds=d["g_seconds"],
                   precondition_seconds=d["precondition_seconds"], comm=CommBytes(**d["comm"]))


@dataclass(frozen=True)
class Plan:
    """An immutable, deterministic K-FAC sharding plan (build it with :func:`kfac.planner.make_plan`).

    ``rank_load`` is the predicted compute per step of each rank (seconds), ``rank_memory`` the bytes of factors
    and decompositions it holds, ``comm`` the bytes sent per step (all ranks together), ``lower_bound`` a bound
    no assignment in the planner's search space can beat: ``max(largest job, total work / N)`` where a job's cost
    includes the preconditioning that necessarily lands on the same rank (under comm-opt every rank
    preconditions every layer, so the bound is ``sum P + max(largest decomposition, total decomposition / N)``;
    under hybrid it also counts that a column's members all precondition the column's layers: see
    :mod:`kfac.planner.search`).
    The bound covers split plans unless ``split=False`` was asked for, so it is the same for all assigners.
    ``layers`` keep the input order; :meth:`digest` does not depend on it.
    """

    strategy: str
    world_size: int
    grad_workers_per_layer: int
    factor_update_steps: int
    inv_update_steps: int
    method: str
    assigner: str
    split: bool
    memory_cap: Optional[int]
    cost_model: CostModel
    layers: tuple[LayerAssignment, ...]
    rank_load: tuple[float, ...]
    rank_memory: tuple[int, ...]
    comm: CommBytes
    lower_bound: float
    _index: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {layer.name: i for i, layer in enumerate(self.layers)})

    def __repr__(self) -> str:
        return (f"Plan(strategy={self.strategy!r}, world_size={self.world_size}, assigner={self.assigner!r}, "
                f"split={self.split}, layers={len(self.layers)}, makespan={self.makespan:.6g}s, "
                f"imbalance={self.imbalance:.4f}, max_memory={max(self.rank_memory)}B, "
                f"bytes_per_step={self.comm.total:.6g})")

    # -- headline numbers ----------------------------------------------------------------------------------
    @property
    def makespan(self) -> float:
        """Predicted seconds per step of the most loaded rank."""
        return max(self.rank_load)

    @property
    def imbalance(self) -> float:
        """``makespan / lower_bound`` (1.0 is optimal)."""
        return self.makespan / self.lower_bound if self.lower_bound > 0 else 1.0

    @property
    def grad_worker_fraction(self) -> float:
        return self.grad_workers_per_layer / self.world_size

    @property
    def factor_communication(self) -> str:
        """``"reduce"`` (dp-kfac: each factor reduced to its owner) or ``"allreduce"``."""
        return "reduce" if self.strategy == "dp-kfac" else "allreduce"

    @property
    def idle_ranks(self) -> tuple[int, ...]:
        return tuple(r for r, load in enumerate(self.rank_load) if load == 0)

    # -- per-rank / per-layer queries for the distributed preconditioner -----------------------------------
    def layer(self, name: str) -> LayerAssignment:
        try:
            return self.layers[self._index[name]]
        except KeyError:
            raise KeyError(f"layer {name!r} is not in the plan") from None

    def owner(self, name: str, factor: str) -> int:
        """Rank that decomposes ``factor`` (``"A"``/``"G"``) of layer ``name``."""
        return self.layer(name).owner(factor)

    def decompositions_of(self, rank: int) -> tuple[tuple[str, str], ...]:
        """``(layer, factor)`` pairs ``rank`` decomposes, in plan layer order."""
        self._check_rank(rank)
        return tuple((la.name, f) for la in self.layers for f in FACTORS if la.owner(f) == rank)

    def decomposition_receivers(self, name: str, factor: str) -> tuple[int, ...]:
        """Ranks the owner of ``factor`` sends its decomposition to after each refresh: the layer's grad workers
        other than the owner (all ranks under comm-opt, the column under hybrid, the other factor's owner for a
        split ``G = 1`` layer, nobody for a colocated ``G = 1`` layer)."""
        la = self.layer(name)
        owner = la.owner(factor)
        return tuple(w for w in la.grad_workers if w != owner)

    def is_grad_worker(self, name: str, rank: int) -> bool:
        return rank in self.layer(name).grad_workers

    def holds_factor(self, name: str, factor: str, rank: int) -> bool:
        """Whether ``rank`` keeps the running factor (everyone under all-reduce, only the owner under dp-kfac)."""
        self._check_rank(rank)
        return self.factor_communication == "allreduce" or self.owner(name, factor) == rank

    def grad_source(self, name: str, rank: int) -> int:
        """The grad worker whose preconditioned gradient ``rank`` uses (``rank`` itself if it is one).

        KAISA's grid: the grad worker of layer ``name`` in ``rank``'s receiver row (``w // P == rank // P``).
        """
        self._check_rank(rank)
        la = self.layer(name)
        if rank in la.grad_workers:
            return rank
        p = self.world_size // len(la.grad_workers)
        return next(w for w in la.grad_workers if w // p == rank // p)

    def shard_worker(self, name: str, members: Sequence[int]) -> int:
        """The position in a shard group (``members``: ranks of one FSDP2 shard group, in shard order) of the rank
        that preconditions layer ``name``'s whole gradient for the group: its grad worker there, or where every
        member is one (``comm-opt``) the member at its ``A`` owner's position (the planner's balanced assignment).
        A ``ValueError`` where the group has several grad workers but not all, or none."""
        inside = [i for i, r in enumerate(members) if self.is_grad_worker(name, r)]
        if len(inside) == len(members):
            return self.owner(name, "A") % len(members)
        if len(inside) == 1:
            return inside[0]
        raise ValueError(f"kfac: the {self.strategy!r} plan gives layer {name!r} {len(inside)} grad workers in the "
                         f"shard group {tuple(members)}; sharded models need one or all: use strategy='comm-opt', "
                         "'mem-opt' or 'dp-kfac' on a 1-d mesh, or 'hybrid' with one grad worker per shard group "
                         "(grad_worker_fraction = 1 / shard group size) on an HSDP mesh")

    def grad_receivers(self, name: str, rank: int) -> tuple[int, ...]:
        """Ranks that receive layer ``name``'s preconditioned gradient from ``rank`` (empty for non-workers)."""
        self._check_rank(rank)
        la = self.layer(name)
        if rank not in la.grad_workers:
            return ()
        p = self.world_size // len(la.grad_workers)
        row = rank // p
        return tuple(r for r in range(row * p, row * p + p) if r != rank)

    def grad_receiver_rows(self) -> tuple[tuple[int, ...], ...]:
        """The gradient broadcast groups (KAISA's receiver rows); one group of all ranks when ``G = 1``."""
        return grad_receiver_rows(self.world_size, self.grad_workers_per_layer)

    def grad_worker_columns(self) -> tuple[tuple[int, ...], ...]:
        """The decomposition broadcast groups (KAISA's grad-worker columns); singletons when ``G = 1``."""
        return grad_worker_columns(self.world_size, self.grad_workers_per_layer)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside world_size={self.world_size}")

    # -- serialisation and identity ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (floats round-trip exactly through :mod:`json`)."""
        return {
            "format": _FORMAT, "version": _VERSION, "strategy": self.strategy, "world_size": self.world_size,
            "grad_workers_per_layer": self.grad_workers_per_layer, "factor_update_steps": self.factor_update_steps,
            "inv_update_steps": self.inv_update_steps, "method": self.method, "assigner": self.assigner,
            "split": self.split, "memory_cap": self.memory_cap, "cost_model": self.cost_model.to_dict(),
            "layers": [la.to_dict() for la in self.layers], "rank_load": list(self.rank_load),
            "rank_memory": list(self.rank_memory), "comm": self.comm.to_dict(), "lower_bound": self.lower_bound,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Plan":
        if d.get("format") != _FORMAT or d.get("version") != _VERSION:
            raise ValueError(f"not a {_FORMAT} v{_VERSION} dict (format={d.get('format')!r}, "
                             f"version={d.get('version')!r})")
        return cls(
            strategy=d["strategy"], world_size=d["world_size"], grad_workers_per_layer=d["grad_workers_per_layer"],
            factor_update_steps=d["factor_update_steps"], inv_update_steps=d["inv_update_steps"],
            method=d["method"], assigner=d["assigner"], split=d["split"], memory_cap=d["memory_cap"],
            cost_model=CostModel.from_dict(d["cost_model"]),
            layers=tuple(LayerAssignment.from_dict(x) for x in d["layers"]),
            rank_load=tuple(d["rank_load"]), rank_memory=tuple(d["rank_memory"]), comm=CommBytes(**d["comm"]),
            lower_bound=d["lower_bound"])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    def digest(self) -> str:
        """sha256 hex of the canonical JSON (sorted keys, compact, layers sorted by name).

        Equal digests on all ranks (all-gather them at start-up) mean equal plans. The digest is independent of the
        order of the input layers (assignments of ``lpt`` are too; ``round-robin``/``kaisa-greedy`` follow the
        input order by definition).
        """
        d = self.to_dict()
        d["layers"] = sorted(d["layers"], key=lambda x: x["name"])
        text = json.dumps(d, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True)
        return hashlib.sha256(text.encode("ascii")).hexdigest()

    # -- report --------------------------------------------------------------------------------------------
    def summary(self, max_ranks: int = 16) -> str:
        """A text report: headline numbers, bytes per step, and a per-rank table (the most loaded ``max_ranks``)."""
        n = self.world_size
        mem = self.rank_memory
        lines = [
            f"K-FAC plan: strategy={self.strategy} world_size={n} grad_workers/layer={self.grad_workers_per_layer} "
            f"assigner={self.assigner} split={'yes' if self.split else 'no'} method={self.method} "
            f"layers={len(self.layers)}",
            f"factor_update_steps={self.factor_update_steps} inv_update_steps={self.inv_update_steps} "
            f"cost model={self.cost_model.source} factors={self.factor_communication}"
            + (f" memory_cap={_mib(self.memory_cap)} MiB" if self.memory_cap is not None else ""),
            f"makespan {format_ms(self.makespan)} ms/step | lower bound {format_ms(self.lower_bound)} ms/step | "
            f"imbalance {self.imbalance:.3f} | idle ranks {len(self.idle_ranks)}",
            f"memory/rank MiB: max {_mib(max(mem))} min {_mib(min(mem))} mean {_mib(sum(mem) / n)}",
            f"bytes/step MiB (all ranks): factor reduction {_mib(self.comm.factor_reduction)} | decomposition "
            f"broadcast {_mib(self.comm.decomposition_broadcast)} | gradient broadcast "
            f"{_mib(self.comm.gradient_broadcast)} | total {_mib(self.comm.total)}",
        ]
        jobs = [0] * n
        grads = [0] * n
        for la in self.layers:
            for f in FACTORS:
                jobs[la.owner(f)] += 1
            for w in la.grad_workers:
                grads[w] += 1
        ranks = sorted(range(n), key=lambda r: (-self.rank_load[r], r))[:max_ranks] if n > max_ranks else range(n)
        lines.append(f"{'rank':>6} {'load ms/step':>13} {'share of makespan':>18} {'decomps':>8} "
                     f"{'precond layers':>15} {'memory MiB':>11}")
        for r in ranks:
            share = self.rank_load[r] / self.makespan if self.makespan > 0 else 0.0
            lines.append(f"{r:>6} {format_ms(self.rank_load[r]):>13} {share:>18.3f} {jobs[r]:>8} {grads[r]:>15} "
                         f"{_mib(mem[r]):>11}")
        if n > max_ranks:
            lines.append(f"  ... {n - max_ranks} less loaded ranks not shown (least loaded: rank "
                         f"{min(range(n), key=lambda r: (self.rank_load[r], r))}, "
                         f"{format_ms(min(self.rank_load))} ms/step)")
        return "\n".join(lines)


def format_ms(seconds: float) -> str:
    """Milliseconds to 3 decimals; a load too small for that (a rank holding only diagonal factors) in scientific
    notation, so that only an idle rank (zero load) prints as ``0.000``."""
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms == 0 or abs(ms) >= 0.0005 else f"{ms:.2e}"



def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f}"
