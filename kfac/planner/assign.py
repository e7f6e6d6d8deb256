"""Assignment algorithms (pure Python, deterministic): the planner's LPT and the two published baselines.

* :func:`lpt` -- longest processing time first onto the least-loaded rank, with an optional per-rank memory cap.
* :func:`round_robin` -- the DP-KFAC release (``schedule_module_ranks``): layers in model order, layer ``i`` on
  rank ``i mod N``; with split factors ``A`` on rank ``2i mod N`` and ``G`` on the next rank (DP-KFAC's
  ``distribute_layer_factors``, which its eigen variant enables when ``N > #layers``).
* :func:`kaisa_greedy` -- ``KAISAAssignment.greedy_assignment`` of gpauloski/kfac-pytorch (``kfac/assignment.py``).

These place jobs on ranks and know nothing of plans; :mod:`kfac.planner.search` builds a plan with them, and
KAISA's grad-worker grid (the groups :func:`kaisa_greedy` takes) is :func:`kfac.planner.plan.grad_worker_columns`.

No function here draws on dict/set iteration order or hashing: ties are broken by rank index, then by name.
"""

from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["MemoryCapError", "lpt", "makespan", "round_robin", "kaisa_greedy"]


class MemoryCapError(ValueError):
    """No rank can take a job without exceeding the per-rank memory cap."""


def lpt(
    costs: Sequence[float],
    num_ranks: int,
    *,
    names: Optional[Sequence[str | tuple[str, ...]]] = None,
    memory: Optional[Sequence[int]] = None,
    memory_cap: Optional[int] = None,
    base_load: Optional[Sequence[float]] = None,
    base_memory: Optional[Sequence[int]] = None,
) -> tuple[int, ...]:
    """Longest-processing-time-first: return the rank of every job.

    Jobs are taken in order of decreasing cost (ties: ``names``, else input position) and each goes to the
    least-loaded rank (ties: lowest rank index). Without a cap the makespan is at most ``(4/3 - 1/(3N)) OPT``
    (Graham 1969). With ``memory_cap``, a job that would push its rank's memory (``base_memory`` plus the
    ``memory`` of its jobs) above the cap goes to the least-loaded rank where it fits; :class:`MemoryCapError`
    if there is none.
    """
    n = len(costs)
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    keys: Sequence[object] = names if names is not None else range(n)
    if len(keys) != n or (memory is not None and len(memory) != n):
        raise ValueError("costs, names and memory must have the same length")
    load = [float(x) for x in base_load] if base_load is not None else [0.0] * num_ranks
    mem = [int(x) for x in base_memory] if base_memory is not None else [0] * num_ranks
    if len(load) != num_ranks or len(mem) != num_ranks:
        raise ValueError("base_load and base_memory need one entry per rank")
    if memory_cap is not None and max(mem) > memory_cap:
        worst = max(range(num_ranks), key=lambda r: (mem[r], -r))
        raise MemoryCapError(f"memory_cap={memory_cap} bytes is below the memory every rank needs before any job is "
                             f"placed ({mem[worst]} bytes on rank {worst})")
    out = [-1] * n
    for j in sorted(range(n), key=lambda j: (-costs[j], keys[j])):
        need = memory[j] if memory is not None else 0
        best = -1
        for r in range(num_ranks):
            if memory_cap is not None and mem[r] + need > memory_cap:
                continue
            if best < 0 or load[r] < load[best]:
                best = r
        if best < 0:
            assert memory_cap is not None  # without a cap every rank fits (num_ranks >= 1)
            raise MemoryCapError(
                f"job {keys[j]!r} needs {need} bytes but no rank has room under memory_cap={memory_cap} bytes "
                f"(most free: {memory_cap - min(mem)} bytes)")
        out[j] = best
        load[best] += costs[j]
        mem[best] += need
    return tuple(out)


def makespan(costs: Sequence[float], ranks: Sequence[int], num_ranks: int) -> float:
    """Largest per-rank sum of ``costs`` under the assignment ``ranks``."""
    load = [0.0] * num_ranks
    for c, r in zip(costs, ranks):
        load[r] += c
    return max(load)


def round_robin(
    num_layers: int, world_size: int, *, split: bool = False, stride: int = 1
) -> tuple[tuple[int, int], ...]:
    """DP-KFAC's round-robin: ``(a_rank, g_rank)`` per layer in input (model) order.

    Colocated: layer ``i`` -> rank ``i mod N``. Split: ``A`` -> ``2i mod N`` and ``G`` -> ``(2i + stride) mod N``
    (``stride`` 1 as in DP-KFAC; the planner passes ``N / G`` for hybrid plans so both factors stay in one
    grad-worker column).
    """
    out = []
    for i in range(num_layers):
        if split:
            a = (2 * i) % world_size
            out.append((a, (a + stride) % world_size))
        else:
            out.append((i % world_size, i % world_size))
    return tuple(out)


def kaisa_greedy(
    work: Sequence[tuple[float, float]],
    worker_groups: Sequence[Sequence[int]],
    world_size: int,
    *,
    colocate: bool = True,
) -> tuple[tuple[int, int], ...]:
    """KAISA's greedy assignment (``KAISAAssignment.greedy_assignment``): ``(a_rank, g_rank)`` per layer.

    ``work[i] = (cost_A, cost_G)``; KAISA uses the *size-based* cost ``d^3`` (``assignment_strategy="compute"``)
    and ignores preconditioning and update frequencies. Layers are sorted by ``cost_A + cost_G`` descending
    (a stable sort: ties keep input order), each goes to the worker group with the least summed load (first such
    group), then -- colocated, KAISA's default -- both factors to the least-loaded worker of that group (first such
    worker); not colocated, the factors in order of descending ``(cost, name)`` each to the least-loaded worker
    of that group. The one liberty taken: KAISA iterates its groups from a ``set`` of ``frozenset``; here groups
    are ordered by smallest rank and members ascending.
    """
    loads = [0.0] * world_size
    groups = sorted((sorted(g) for g in worker_groups), key=lambda g: g[0])
    summed = [a + g for a, g in work]
    out: list[list[int]] = [[-1, -1] for _ in work]
    for i in sorted(range(len(work)), key=lambda i: summed[i], reverse=True):
        group_loads = [sum(loads[r] for r in group) for group in groups]
        group = groups[group_loads.index(min(group_loads))]
        if colocate:
            member_loads = [loads[r] for r in group]
            worker = group[member_loads.index(min(member_loads))]
            loads[worker] += summed[i]
            out[i] = [worker, worker]
        else:
            factors = sorted(((0, work[i][0]), (1, work[i][1])), key=lambda x: (x[1], "AG"[x[0]]), reverse=True)
            for slot, cost in factors:
                member_loads = [loads[r] for r in group]
                worker = group[member_loads.index(min(member_loads))]
                loads[worker] += cost
                out[i][slot] = worker
    return tuple((a, g) for a, g in out)
