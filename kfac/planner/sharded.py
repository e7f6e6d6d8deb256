"""The plan of a model sharded with FSDP2 (``fully_shard``) or HSDP: who preconditions each layer whole, what each
rank holds, and what moves per step next to FSDP's own traffic.

``W`` ranks form ``R = W / S`` replicas of ``S``-rank shard groups (rank ``r * S + s``; FSDP2 is ``R = 1``). Each
layer is preconditioned whole by one member of every shard group (:meth:`Plan.shard_worker`): the others send it
their rows of the layer's gradient and get their rows of the result back (:mod:`kfac.distributed.fsdp`), about
``2 (S - 1) / S`` of the layer's gradient per shard group and step, where FSDP's reduce-scatter of the same
gradients moves ``(S - 1)`` times the model's gradient per shard group: K-FAC's exchange is ``2 / S`` of it (bytes
summed over ranks, ring volumes, as :class:`CommBytes`). An HSDP mesh all-reduces the shards across replicas too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .cost import LayerSpec
from .plan import Plan, format_ms

__all__ = ["ShardedView", "sharded_strategy", "sharded_view"]


def sharded_strategy(world_size: int, shard_size: int, *, corrects: bool = False) -> tuple[str, float | None]:
    """The default ``(strategy, grad_worker_fraction)`` for a sharded model: each factor and decomposition on its
    owner only (``dp-kfac``) on an FSDP2 mesh, one grad worker per shard group (``hybrid``, ``1 / S``) on an HSDP
    mesh; ``comm-opt`` for EK-FAC, whose corrections need every rank to hold every eigenbasis."""
    if world_size % shard_size:
        raise ValueError(f"world size {world_size} is not a multiple of the shard group size {shard_size}")
    if corrects or world_size == 1:
        return "comm-opt", None
    return ("dp-kfac", None) if shard_size == world_size else ("hybrid", 1 / shard_size)


@dataclass(frozen=True)
class ShardedView:
    """Per rank: the layers it preconditions whole, the bytes of factors and decompositions it holds (the plan's),
    the transient bytes of those layers' whole gradients; per step (summed over ranks): K-FAC's gradient exchange,
    FSDP's reduce-scatter of the gradients and, on HSDP, their all-reduce across replicas."""

    plan: Plan
    shard_size: int
    owned: tuple[tuple[str, ...], ...]
    transient_bytes: tuple[int, ...]
    exchange_bytes: float
    reduce_scatter_bytes: float
    replica_all_reduce_bytes: float

    @property
    def replicas(self) -> int:
        return self.plan.world_size // self.shard_size

    def summary(self, max_ranks: int = 16) -> str:
        mib = 2.0 ** 20
        lines = [f"FSDP2 view: {self.replicas} x {self.shard_size} mesh (replicas x shard group), "
                 f"strategy {self.plan.strategy}",
                 f"  K-FAC gradient exchange  {self.exchange_bytes / mib:10.2f} MiB/step "
                 f"({self.exchange_bytes / self.reduce_scatter_bytes:.3f}x FSDP's reduce-scatter)"
                 if self.reduce_scatter_bytes else
                 f"  K-FAC gradient exchange  {self.exchange_bytes / mib:10.2f} MiB/step",
                 f"  FSDP reduce-scatter      {self.reduce_scatter_bytes / mib:10.2f} MiB/step",
                 f"  HSDP replica all-reduce  {self.replica_all_reduce_bytes / mib:10.2f} MiB/step",
                 f"  factor traffic           {self.plan.comm.factor_reduction / mib:10.2f} MiB/step",
                 f"  decomposition traffic    {self.plan.comm.decomposition_broadcast / mib:10.2f} MiB/step",
                 f"{'rank':>6} {'layers':>7} {'held MiB':>10} {'transient MiB':>14} {'load ms':>9}"]
        for r in range(min(self.plan.world_size, max_ranks)):
            lines.append(f"{r:>6} {len(self.owned[r]):>7} {self.plan.rank_memory[r] / mib:>10.2f} "
                         f"{self.transient_bytes[r] / mib:>14.2f} {format_ms(self.plan.rank_load[r]):>9}")
        if self.plan.world_size > max_ranks:
            lines.append(f"  ... {self.plan.world_size - max_ranks} more ranks")
        return "\n".join(lines)


def sharded_view(plan: Plan, specs: Sequence[LayerSpec], shard_size: int, *,
                 grad_bytes_per_element: int = 4) -> ShardedView:
    """The :class:`ShardedView` of ``plan`` for ``S = shard_size`` (gradients of ``grad_bytes_per_element`` bytes;
    K-FAC's exchange travels in the factor dtype, ``plan.cost_model.bytes_per_element``)."""
    world, s = plan.world_size, shard_size
    sharded_strategy(world, s)  # validates the mesh
    owned: list[list[str]] = [[] for _ in range(world)]
    transient = [0] * world
    wire = plan.cost_model.bytes_per_element
    numel = 0
    for spec in specs:
        size = spec.g_dim * spec.a_dim
        numel += size
        for replica in range(world // s):
            members = list(range(replica * s, replica * s + s))
            worker = members[plan.shard_worker(spec.name, members)]
            owned[worker].append(spec.name)
            transient[worker] += size * wire
    replicas = world // s
    exchange = replicas * 2 * (s - 1) / s * numel * wire + replicas * 2 * (s - 1) * len(specs) * wire  # + headers
    reduce_scatter = replicas * (s - 1) * numel * grad_bytes_per_element
    all_reduce = 2 * (replicas - 1) * numel * grad_bytes_per_element
    return ShardedView(plan=plan, shard_size=s, owned=tuple(tuple(o) for o in owned),
                       transient_bytes=tuple(transient), exchange_bytes=exchange, reduce_scatter_bytes=reduce_scatter,
                       replica_all_reduce_bytes=all_reduce)
