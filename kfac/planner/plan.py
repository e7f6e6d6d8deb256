"""The sharding plan of distributed K-FAC: who decomposes, who preconditions, who holds what, what is sent.

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
max(1, round(f N))`` must divide ``N``; columns/rows as in :func:`kfac.planner.assign.grad_worker_columns`).
``dp-kfac`` is DP-KFAC's distributed preconditioning: each factor only lives on its owner.

Jobs and objective. A layer's work is the decomposition of ``A`` and of ``G`` (``D_A``, ``D_G`` seconds per
refresh) and preconditioning (``P`` seconds per step on every grad worker). The predicted time per step of rank
``r`` is ``load_r = sum_{factors r decomposes} D / inv_update_steps + sum_{layers r preconditions} P``; the
makespan is ``max_r load_r``. Factor statistics (``a^T a``) are computed by every rank on its own batch in every
strategy, so they are left out.

Splitting ``A`` and ``G`` (``split``): colocated, a layer is one job on one rank. Split, ``A`` and ``G`` are
separate jobs. With ``G > 1`` both stay inside the layer's grad-worker column (KAISA's constraint: no extra
traffic, the column receives both decompositions anyway). With ``G = 1`` the layer's single grad worker is the
owner of its *primary* factor -- the one with the cheaper decomposition (``G`` on ties), so ``P`` rides on the
smaller job -- and the other factor's decomposition is sent point-to-point to it once per refresh.
``split=None`` (default) plans both ways and keeps the split plan only if it is faster: a smaller makespan, where
for ``G = 1`` each rank's load also counts the time to send or receive those point-to-point decompositions at
``CostModel.bandwidth``, and must be at least 5% smaller (the grad worker then also holds the other factor's
decomposition: memory that DP-KFAC's sharding is meant to save and the makespan does not price).

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

from .assign import MemoryCapError, grad_receiver_rows, grad_worker_columns, kaisa_greedy, lpt, round_robin
from .cost import METHODS, CostModel, LayerSpec

__all__ = [
    "STRATEGIES", "ASSIGNERS", "CommBytes", "LayerAssignment", "Plan", "make_plan", "default_strategy",
    "grad_workers_per_layer",
]

STRATEGIES = ("comm-opt", "mem-opt", "hybrid", "dp-kfac")
"""Distribution strategies understood by :func:`make_plan`."""
ASSIGNERS = ("lpt", "round-robin", "kaisa-greedy")
"""Assignment algorithms: the planner's LPT and the two baselines (see :mod:`kfac.planner.assign`)."""
FACTORS = ("A", "G")
_FORMAT = "kfac.planner.Plan"
_VERSION = 1
_SPLIT_GAIN = 1e-9  # split must beat colocated by this relative margin (a deterministic, not a numerical, tie rule)
_SPLIT_GAIN_P2P = 0.05  # ... and by 5% when it ships decompositions point to point (G = 1): the grad worker then
# also holds the other factor's decomposition, memory the makespan does not price


def default_strategy(world_size: int) -> str:
    """The strategy :func:`make_plan` uses when none is given: ``comm-opt`` for ``N <= 8``, else ``dp-kfac``.

    * ``N = 1``: nothing is distributed; ``comm-opt`` degenerates to plain K-FAC (no traffic, no broadcast).
    * ``2 <= N <= 8`` (one node, NVLink-class links): ``comm-opt`` has the lowest per-step compute after a
      refresh (every rank preconditions locally, no gradient broadcast on the critical path) and its extra
      traffic -- all-reduced factors plus one broadcast per decomposition -- is cheap inside a node; memory
      (every rank holds everything) is still affordable at this scale (KAISA's finding for small ``N``).
    * ``N > 8``: ``dp-kfac``. Factor traffic halves (reduce instead of all-reduce), decompositions are never
      broadcast, and factor plus decomposition memory is sharded ``~1/N`` instead of replicated, while the extra
      cost -- one preconditioned-gradient broadcast per layer -- is about the size of the model's gradients. With
      ``comm-opt`` both the broadcast volume and the replicated memory grow with ``N`` and the model.

    Pass ``strategy=`` explicitly (e.g. ``"hybrid"``) when the interconnect or memory budget says otherwise.
    """
    _check_positive_int(world_size, "world_size")
    return "comm-opt" if world_size <= 8 else "dp-kfac"


def grad_workers_per_layer(strategy: str, world_size: int, grad_worker_fraction: Optional[float] = None) -> int:
    """``G``: ``N`` for comm-opt, 1 for mem-opt and dp-kfac, ``max(1, round(f N))`` for hybrid (must divide N)."""
    _check_positive_int(world_size, "world_size")
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
    """An immutable, deterministic K-FAC sharding plan (build it with :func:`make_plan`).

    ``rank_load`` is the predicted compute per step of each rank (seconds), ``rank_memory`` the bytes of factors
    and decompositions it holds, ``comm`` the bytes sent per step (all ranks together), ``lower_bound`` a bound
    no assignment in the planner's search space can beat: ``max(largest job, total work / N)`` where a job's cost
    includes the preconditioning that necessarily lands on the same rank (under comm-opt every rank
    preconditions every layer, so the bound is ``sum P + max(largest decomposition, total decomposition / N)``;
    under hybrid it also counts that a column's members all precondition the column's layers: see
    ``_lower_bound``).
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
            f"makespan {_ms(self.makespan)} ms/step | lower bound {_ms(self.lower_bound)} ms/step | "
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
            lines.append(f"{r:>6} {_ms(self.rank_load[r]):>13} {share:>18.3f} {jobs[r]:>8} {grads[r]:>15} "
                         f"{_mib(mem[r]):>11}")
        if n > max_ranks:
            lines.append(f"  ... {n - max_ranks} less loaded ranks not shown (least loaded: rank "
                         f"{min(range(n), key=lambda r: (self.rank_load[r], r))}, "
                         f"{_ms(min(self.rank_load))} ms/step)")
        return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f}"


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


# -- planning ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Costs:
    """Per-layer inputs of the assignment, in seconds, elements and bytes."""

    spec: LayerSpec
    dec: tuple[float, float]          # seconds per refresh of A, G
    pre: float                        # seconds per step on each grad worker
    fac_bytes: tuple[int, int]        # stored factor bytes
    dec_bytes: tuple[int, int]        # stored decomposition bytes
    packed: tuple[int, int]           # communicated factor elements
    dec_comm: tuple[int, int]         # communicated decomposition elements
    primary: int                      # 0 (A) or 1 (G): the grad worker's factor when split with G = 1


def _layer_costs(spec: LayerSpec, cm: CostModel, method: str) -> _Costs:
    dims = (spec.a_dim, spec.g_dim)
    diag = (spec.a_diagonal, False)
    dec = tuple(cm.decomposition_seconds(d, diagonal=g, method=method) for d, g in zip(dims, diag))
    return _Costs(
        spec=spec, dec=dec, pre=cm.precondition_seconds(spec, method=method),  # type: ignore[arg-type]
        fac_bytes=tuple(cm.factor_elements(d, diagonal=g) * cm.bytes_per_element for d, g in zip(dims, diag)),
        dec_bytes=tuple(cm.decomposition_elements(d, diagonal=g, method=method) * cm.bytes_per_element
                        for d, g in zip(dims, diag)),
        packed=tuple(cm.packed_elements(d, diagonal=g) for d, g in zip(dims, diag)),
        dec_comm=tuple(cm.decomposition_comm_elements(d, diagonal=g, method=method) for d, g in zip(dims, diag)),
        primary=0 if dec[0] < dec[1] else 1,
    )  # type: ignore[arg-type]


def make_plan(
    layers: Sequence[LayerSpec],
    world_size: int,
    strategy: Optional[str] = None,
    *,
    cost_model: Optional[CostModel] = None,
    grad_worker_fraction: Optional[float] = None,
    factor_update_steps: int = 1,
    inv_update_steps: int = 1,
    split: Optional[bool] = None,
    memory_cap: Optional[int] = None,
    assigner: str = "lpt",
    method: str = "eigen",
) -> Plan:
    """Plan distributed K-FAC for ``layers`` on ``world_size`` ranks.

    Args:
        layers: the tracked layers (unique names).
        world_size: number of ranks ``N``.
        strategy: one of :data:`STRATEGIES`; ``None`` picks :func:`default_strategy`.
        cost_model: defaults to the deterministic :meth:`CostModel.default` (never timing-dependent); pass
            :func:`calibrate`'s result -- broadcast from rank 0 -- to plan for the measured device.
        grad_worker_fraction: ``f`` of ``"hybrid"`` (default 0.5; ``G = max(1, round(f N))`` must divide ``N``).
        factor_update_steps, inv_update_steps: update intervals used to amortise decompositions and traffic.
        split: allow ``A`` and ``G`` of a layer on different ranks: ``None`` (default) plans both ways and keeps
            the split plan only if it is strictly faster -- its makespan, plus for ``G = 1`` strategies the time
            to send/receive the decompositions it ships point-to-point at ``cost_model.bandwidth``; ``True``/``False``
            force it. The baselines follow their sources when ``None``: KAISA colocates, DP-KFAC splits iff
            ``N > len(layers)``.
        memory_cap: per-rank bytes of factors plus decompositions; LPT places a job that would exceed it on the
            least-loaded rank that fits. :class:`~kfac.planner.assign.MemoryCapError` (a ``ValueError``) if the
            cap cannot be met, also when a baseline's assignment exceeds it.
        assigner: ``"lpt"`` (default), ``"round-robin"`` (DP-KFAC) or ``"kaisa-greedy"`` (KAISA).
        method: ``"eigen"`` or ``"inverse"`` (what the decompositions are).

    LPT plans are pure functions of these arguments and do not depend on the order of ``layers`` (jobs are
    ordered by decreasing cost, then name; ranks by load, then index), so every rank computes the same plan.
    """
    specs = tuple(layers)
    if not specs:
        raise ValueError("make_plan needs at least one layer")
    for s in specs:
        if not isinstance(s, LayerSpec):
            raise TypeError(f"layers must be LayerSpec instances, got {type(s).__name__}")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"layer names must be unique; repeated: {dup}")
    n = _check_positive_int(world_size, "world_size")
    strategy = default_strategy(n) if strategy is None else strategy
    g = grad_workers_per_layer(strategy, n, grad_worker_fraction)
    fu = _check_positive_int(factor_update_steps, "factor_update_steps")
    iu = _check_positive_int(inv_update_steps, "inv_update_steps")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if assigner not in ASSIGNERS:
        raise ValueError(f"assigner must be one of {ASSIGNERS}, got {assigner!r}")
    if split is not None and not isinstance(split, bool):
        raise TypeError(f"split must be None, True or False, got {split!r}")
    if memory_cap is not None:
        _check_positive_int(memory_cap, "memory_cap")
    cm = CostModel.default() if cost_model is None else cost_model
    if not isinstance(cm, CostModel):
        raise TypeError(f"cost_model must be a CostModel, got {type(cm).__name__}")

    costs = [_layer_costs(s, cm, method) for s in specs]
    order = sorted(range(len(specs)), key=lambda i: names[i])  # canonical order for every sum
    ctx = _Context(strategy=strategy, n=n, g=g, fu=fu, iu=iu, method=method, assigner=assigner,
                   memory_cap=memory_cap, cm=cm, costs=costs, order=order)
    bound = _lower_bound(ctx, split_allowed=split is not False)

    if split is not None:
        modes = [split]
    elif assigner == "lpt":
        modes = [False, True]
    elif assigner == "round-robin":
        modes = [n > len(specs)]
    else:
        modes = [False]
    plans: list[Plan] = []
    errors: list[MemoryCapError] = []
    for mode in modes:
        try:
            plans.append(_evaluate(ctx, _assign(ctx, mode), mode, bound))
        except MemoryCapError as exc:
            errors.append(exc)
    if not plans:
        raise MemoryCapError(f"{strategy} plan for {len(specs)} layers on {n} ranks cannot meet "
                             f"memory_cap={memory_cap} bytes: {errors[-1]}") from errors[-1]
    best = plans[0]
    for other in plans[1:]:
        gain = _SPLIT_GAIN if other.grad_workers_per_layer > 1 or not other.split else _SPLIT_GAIN_P2P
        if _split_time(other) < best.makespan * (1 - gain):
            best = other
    return best


def _split_time(plan: Plan) -> float:
    """``max_r (load_r + moved_r / bandwidth)``: the makespan plus, for ``G = 1``, the time each rank spends
    sending or receiving the decompositions a split ships point-to-point (the sender can only start once its
    decomposition is done, the receiver needs it before preconditioning). With ``G > 1`` a split adds no traffic."""
    if plan.grad_workers_per_layer > 1:
        return plan.makespan
    moved = [0.0] * plan.world_size
    s = plan.cost_model.comm_bytes_per_element
    for la in plan.layers:
        if not la.colocated:
            worker = la.grad_workers[0]
            other = "A" if la.g_owner == worker else "G"
            dim, diag = (la.a_dim, la.a_diagonal) if other == "A" else (la.g_dim, False)
            nbytes = s * CostModel.decomposition_comm_elements(dim, diagonal=diag, method=plan.method)
            moved[worker] += nbytes
            moved[la.owner(other)] += nbytes
    bw = plan.cost_model.bandwidth
    return max(load + m / plan.inv_update_steps / bw for load, m in zip(plan.rank_load, moved))


@dataclass(frozen=True)
class _Context:
    strategy: str
    n: int
    g: int
    fu: int
    iu: int
    method: str
    assigner: str
    memory_cap: Optional[int]
    cm: CostModel
    costs: list[_Costs]
    order: list[int]

    @property
    def reduce_only(self) -> bool:
        return self.strategy == "dp-kfac"


def _g1_jobs(ctx: _Context, split: bool) -> tuple[list[float], list[tuple[str, str]], list[int], list[tuple[int, int]]]:
    """Jobs of a ``G = 1`` plan: (cost per step, tie-break name, memory bytes, (layer index, slot)), slot 2=both."""
    costs, names, memory, where = [], [], [], []
    for i in ctx.order:
        c = ctx.costs[i]
        own_fac = ctx.reduce_only
        if not split:
            costs.append((c.dec[0] + c.dec[1]) / ctx.iu + c.pre)
            names.append((c.spec.name, ""))
            memory.append(sum(c.dec_bytes) + (sum(c.fac_bytes) if own_fac else 0))
            where.append((i, 2))
            continue
        for slot in (0, 1):
            primary = slot == c.primary
            costs.append(c.dec[slot] / ctx.iu + (c.pre if primary else 0.0))
            names.append((c.spec.name, FACTORS[slot]))
            memory.append(c.dec_bytes[slot] + (c.dec_bytes[1 - slot] if primary else 0)
                          + (c.fac_bytes[slot] if own_fac else 0))
            where.append((i, slot))
    return costs, names, memory, where


def _shared_factor_bytes(ctx: _Context) -> int:
    """Bytes of factors every rank holds (all of them under all-reduce, none under dp-kfac)."""
    return 0 if ctx.reduce_only else sum(sum(ctx.costs[i].fac_bytes) for i in ctx.order)


def _assign(ctx: _Context, split: bool) -> list[tuple[int, int, tuple[int, ...]]]:
    """``(a_owner, g_owner, grad_workers)`` per layer (input order)."""
    n, g = ctx.n, ctx.g
    columns = grad_worker_columns(n, g)
    p = len(columns)
    out: list[Optional[tuple[int, int, tuple[int, ...]]]] = [None] * len(ctx.costs)

    def workers(i: int, a: int, b: int) -> tuple[int, ...]:
        if g == 1:
            return ((a, b)[ctx.costs[i].primary],)
        return columns[a % p]

    if ctx.assigner == "round-robin":
        pairs = round_robin(len(ctx.costs), n, split=split, stride=1 if g == 1 else p)
        return [(a, b, workers(i, a, b)) for i, (a, b) in enumerate(pairs)]
    if ctx.assigner == "kaisa-greedy":
        work = [(float(c.spec.a_dim**3), float(c.spec.g_dim**3)) for c in ctx.costs]
        pairs = kaisa_greedy(work, columns, n, colocate=not split)
        return [(a, b, workers(i, a, b)) for i, (a, b) in enumerate(pairs)]

    if g == 1:
        costs, names, memory, where = _g1_jobs(ctx, split)
        ranks = lpt(costs, n, names=names, memory=memory, memory_cap=ctx.memory_cap,
                    base_memory=[_shared_factor_bytes(ctx)] * n)
        owners: dict[int, list[int]] = {}
        for (i, slot), r in zip(where, ranks):
            owners.setdefault(i, [r, r])
            if slot != 2:
                owners[i][slot] = r
        for i, (a, b) in owners.items():
            out[i] = (a, b, workers(i, a, b))
        return out  # type: ignore[return-value]

    # G > 1: layers onto grad-worker columns (LPT on the mean member load), then jobs onto members (LPT).
    col_cost = [ctx.costs[i].pre + sum(ctx.costs[i].dec) / (ctx.iu * g) for i in ctx.order]
    col_names = [ctx.costs[i].spec.name for i in ctx.order]
    col_mem = [sum(ctx.costs[i].dec_bytes) for i in ctx.order]
    cols = lpt(col_cost, p, names=col_names, memory=col_mem, memory_cap=ctx.memory_cap,
               base_memory=[_shared_factor_bytes(ctx)] * p)
    for c, members in enumerate(columns):
        layer_ids = [i for i, col in zip(ctx.order, cols) if col == c]
        jobs, jnames, where = [], [], []
        for i in layer_ids:
            lc = ctx.costs[i]
            if split:
                for slot in (0, 1):
                    jobs.append(lc.dec[slot] / ctx.iu)
                    jnames.append((lc.spec.name, FACTORS[slot]))
                    where.append((i, slot))
            else:
                jobs.append(sum(lc.dec) / ctx.iu)
                jnames.append((lc.spec.name, ""))
                where.append((i, 2))
        slots = lpt(jobs, len(members), names=jnames)
        owners = {}
        for (i, slot), m in zip(where, slots):
            owners.setdefault(i, [members[m], members[m]])
            if slot != 2:
                owners[i][slot] = members[m]
        for i, (a, b) in owners.items():
            out[i] = (a, b, members)
    return out  # type: ignore[return-value]


def _lower_bound(ctx: _Context, *, split_allowed: bool) -> float:
    """``max(largest job, total work / N)`` of the planner's model (see :class:`Plan`)."""
    n, g, iu = ctx.n, ctx.g, ctx.iu
    if g == 1:
        costs = _g1_jobs(ctx, split_allowed)[0]
        total = 0.0
        for c in costs:
            total += c
        return max(max(costs), total / n)
    dec_jobs: list[float] = []
    units: list[float] = []
    pre_total = 0.0
    work = 0.0
    for i in ctx.order:
        c = ctx.costs[i]
        jobs = [c.dec[0] / iu, c.dec[1] / iu] if split_allowed else [(c.dec[0] + c.dec[1]) / iu]
        dec_jobs += jobs
        units.append(c.pre + max(jobs))
        pre_total += c.pre
        work += g * c.pre + (c.dec[0] + c.dec[1]) / iu
    if g == n:
        dec_total = 0.0
        for x in dec_jobs:
            dec_total += x
        return pre_total + max(max(dec_jobs), dec_total / n)
    # hybrid: every member of a column preconditions all of the column's layers. Take the k layers whose largest
    # job is >= x (P-sum A): the columns holding them ("hot") have a member with load >= x + P_column, and
    # max P_column >= A / k when k < #columns, else >= min(sum P / #columns, A / (#columns - 1)).
    cols = n // g
    bound = max(max(units), work / n)
    hot_k, hot_pre = 0, 0.0
    for x, i in sorted(((units[j] - ctx.costs[i].pre, i) for j, i in enumerate(ctx.order)),
                       key=lambda t: (-t[0], ctx.costs[t[1]].spec.name)):
        hot_k += 1
        hot_pre += ctx.costs[i].pre
        column_pre = hot_pre / hot_k if hot_k < cols else min(pre_total / cols, hot_pre / (cols - 1))
        bound = max(bound, x + column_pre)
    return bound


def _evaluate(ctx: _Context, assignment: list[tuple[int, int, tuple[int, ...]]], split: bool, bound: float) -> Plan:
    n, g, fu, iu, s = ctx.n, ctx.g, ctx.fu, ctx.iu, ctx.cm.comm_bytes_per_element
    load = [0.0] * n
    memory = [_shared_factor_bytes(ctx)] * n
    layer_out: dict[int, LayerAssignment] = {}
    total = CommBytes()
    factor_mult = (n - 1) if ctx.reduce_only else 2 * (n - 1)
    for i in ctx.order:
        c = ctx.costs[i]
        a_owner, g_owner, gw = assignment[i]
        owners = (a_owner, g_owner)
        for slot in (0, 1):
            load[owners[slot]] += c.dec[slot] / iu
        for w in gw:
            load[w] += c.pre
        for slot in (0, 1):
            holders = set(gw) | {owners[slot]}
            for r in sorted(holders):
                memory[r] += c.dec_bytes[slot]
            if ctx.reduce_only:
                memory[owners[slot]] += c.fac_bytes[slot]
        comm = CommBytes(
            factor_reduction=factor_mult * s * (c.packed[0] + c.packed[1]) / fu,
            decomposition_broadcast=sum(len(set(gw) - {owners[slot]}) * s * c.dec_comm[slot] for slot in (0, 1)) / iu,
            gradient_broadcast=float((n - len(gw)) * s * c.spec.grad_elements),
        )
        total = total + comm
        layer_out[i] = LayerAssignment(
            name=c.spec.name, a_dim=c.spec.a_dim, g_dim=c.spec.g_dim, a_diagonal=c.spec.a_diagonal,
            a_owner=a_owner, g_owner=g_owner, grad_workers=tuple(sorted(gw)), a_seconds=c.dec[0],
            g_seconds=c.dec[1], precondition_seconds=c.pre, comm=comm)
    plan = Plan(
        strategy=ctx.strategy, world_size=n, grad_workers_per_layer=g, factor_update_steps=fu,
        inv_update_steps=iu, method=ctx.method, assigner=ctx.assigner, split=split, memory_cap=ctx.memory_cap,
        cost_model=ctx.cm, layers=tuple(layer_out[i] for i in range(len(ctx.costs))), rank_load=tuple(load),
        rank_memory=tuple(memory), comm=total, lower_bound=bound)
    if ctx.memory_cap is not None and max(memory) > ctx.memory_cap:
        worst = max(range(n), key=lambda r: (memory[r], -r))
        raise MemoryCapError(f"{ctx.assigner} assignment puts {memory[worst]} bytes on rank {worst}, above "
                             f"memory_cap={ctx.memory_cap} bytes")
    return plan
