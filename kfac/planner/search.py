"""The planner's search: :func:`make_plan` turns layer shapes and a cost model into a :class:`~kfac.planner.Plan`.

It prices every layer (:class:`~kfac.planner.CostModel`), places jobs on ranks with an assigner of
:mod:`kfac.planner.assign` (LPT by default), tries colocated and split ``A``/``G`` and keeps the faster plan; the
strategies, the grad-worker grid and the traffic formulas are described in :mod:`kfac.planner.plan`.

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

Determinism: every sum runs over the layers in name order, so a plan's floats do not depend on the input order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, TypeVar

from .assign import MemoryCapError, kaisa_greedy, lpt, round_robin
from .cost import METHODS, CostModel, LayerSpec
from .plan import (
    FACTORS, CommBytes, LayerAssignment, Plan, check_positive_int, grad_worker_columns, grad_workers_per_layer,
)

__all__ = ["ASSIGNERS", "make_plan", "default_strategy"]

_T = TypeVar("_T")

ASSIGNERS = ("lpt", "round-robin", "kaisa-greedy")
"""Assignment algorithms: the planner's LPT and the two baselines (see :mod:`kfac.planner.assign`)."""
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
    check_positive_int(world_size, "world_size")
    return "comm-opt" if world_size <= 8 else "dp-kfac"


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
    """Price one layer under ``cm``; pairs are ``(A, G)``, a diagonal ``A`` is priced as a vector."""
    def pair(price: Callable[[int, bool], _T]) -> tuple[_T, _T]:
        """``(price(A), price(G))`` from ``(dim, diagonal)``."""
        return price(spec.a_dim, spec.a_diagonal), price(spec.g_dim, False)

    dec = pair(lambda d, g: cm.decomposition_seconds(d, diagonal=g, method=method))
    return _Costs(
        spec=spec, dec=dec, pre=cm.precondition_seconds(spec, method=method),
        fac_bytes=pair(lambda d, g: cm.factor_elements(d, diagonal=g) * cm.bytes_per_element),
        dec_bytes=pair(lambda d, g: cm.decomposition_elements(d, diagonal=g, method=method) * cm.bytes_per_element),
        packed=pair(lambda d, g: cm.packed_elements(d, diagonal=g)),
        dec_comm=pair(lambda d, g: cm.decomposition_comm_elements(d, diagonal=g, method=method)),
        primary=0 if dec[0] < dec[1] else 1,
    )


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
    n = check_positive_int(world_size, "world_size")
    strategy = default_strategy(n) if strategy is None else strategy
    g = grad_workers_per_layer(strategy, n, grad_worker_fraction)
    fu = check_positive_int(factor_update_steps, "factor_update_steps")
    iu = check_positive_int(inv_update_steps, "inv_update_steps")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if assigner not in ASSIGNERS:
        raise ValueError(f"assigner must be one of {ASSIGNERS}, got {assigner!r}")
    if split is not None and not isinstance(split, bool):
        raise TypeError(f"split must be None, True or False, got {split!r}")
    if memory_cap is not None:
        check_positive_int(memory_cap, "memory_cap")
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
    """Validated :func:`make_plan` arguments plus per-layer costs (input order) and ``order``: indices by name."""

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
        for cost in costs:
            total += cost
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
    """The :class:`Plan` of ``(a_owner, g_owner, grad_workers)`` per layer (input order); loads, memory and bytes are
    summed in name order. :class:`MemoryCapError` if a rank ends above ``memory_cap``."""
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
