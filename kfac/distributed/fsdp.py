"""Sharded parameters (FSDP2's ``fully_shard``, HSDP): where each rank's gradient rows live, and the lossless
gather-precondition-scatter exchange of their gradients.

FSDP2 keeps every parameter as a ``DTensor`` split along dim 0 over the last mesh dimension (``Shard(0)``:
``torch.chunk``'s chunks, ``c = ceil(n / S)`` rows for each of the ``S`` ranks of a shard group, the last ones
shorter or empty), replicated over the first dimension of an HSDP mesh. Its gradients are averaged over every data
parallel rank, as DDP's are, so K-FAC's factors and conventions are unchanged. A sharded layer is preconditioned
whole by one rank of each shard group (its *worker*, chosen by the plan: see :meth:`ShardedGradients.bind`):

1. every rank sends its rows of the layer's gradients to the worker (one all-to-all for all layers),
2. the worker forms the ``(g_dim, a_dim)`` matrix, preconditions it and computes ``<P(g), g>``,
3. and sends every rank its rows of the result with that dot (one more all-to-all).

Nothing is approximated: the update equals the single-process one on the same global batch. No rank ever holds a
full parameter; a worker holds its own layers' full gradients while it preconditions them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import torch
from torch import Tensor, nn

from .comm import Communicator

__all__ = ["ShardSpec", "ShardedGradients", "Exchanged", "shard_spec", "sharded_parameters", "shard_group", "whole",
           "is_sharded", "local_shard", "fsdp_units", "shard_size"]


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


def sharded_parameters(named: Iterable[tuple[str, Tensor]]) -> list[str]:
    """Names of the parameters that are ``DTensor`` shards (FSDP2's ``fully_shard``, HSDP, tensor parallelism);
    none on a torch without ``DTensor``."""
    dtensor = _dtensor_type()
    return [] if dtensor is None else [name for name, p in named if isinstance(p, dtensor)]


def shard_group(params: Iterable[Tensor]) -> Any:
    """The process group of the shard dimension of the first ``DTensor`` among ``params`` (the last mesh
    dimension: the whole mesh for FSDP2, one shard group of an HSDP mesh), or ``None`` without one."""
    dtensor = _dtensor_type()
    p = next((p for p in params if dtensor is not None and isinstance(p, dtensor)), None)
    if p is None:
        return None
    mesh = p.device_mesh  # type: ignore[attr-defined]
    return mesh.get_group(mesh.ndim - 1)


def shard_size(params: Iterable[Tensor]) -> int:
    """The size of the shard dimension of the first ``DTensor`` among ``params`` (1 without one)."""
    p = next((p for p in params if is_sharded(p)), None)
    if p is None:
        return 1
    mesh = p.device_mesh  # type: ignore[attr-defined]
    return int(mesh.size(mesh.ndim - 1))


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a ``DTensor``."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def local_shard(t: Tensor) -> Tensor:
    """This rank's shard of a ``DTensor``, or ``t`` itself."""
    return _local(t) if is_sharded(t) else t


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that FSDP2's ``fully_shard`` was applied to (none on a torch without FSDP2)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def whole(t: Tensor) -> Tensor:
    """``t`` itself, or the whole tensor of a ``DTensor`` (a collective over its mesh: every rank calls it)."""
    dtensor = _dtensor_type()
    return t.full_tensor() if dtensor is not None and isinstance(t, dtensor) else t  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ShardSpec:
    """How one parameter is split: global ``shape``; ``rows[i]`` of dim 0 held by ``ranks[i]`` (global ranks of
    its shard group, in shard order), rank ``i`` holding rows ``[sum(rows[:i]), sum(rows[:i + 1]))``."""

    shape: tuple[int, ...]
    ranks: tuple[int, ...]
    rows: tuple[int, ...]

    @property
    def row_numel(self) -> int:
        return prod(self.shape[1:])

    def numel(self, position: int) -> int:
        """Elements held by the shard group's ``position``-th rank."""
        return self.rows[position] * self.row_numel

    def chunks(self, full: Tensor) -> list[Tensor]:
        """``full`` (shaped like the parameter) split into the shard group's pieces, flattened."""
        return [c.reshape(-1) for c in torch.split(full.reshape(self.shape), list(self.rows))]


def shard_spec(name: str, p: Tensor) -> ShardSpec | None:
    """The :class:`ShardSpec` of a ``DTensor`` parameter (``None`` for a plain tensor); a clear error for
    placements other than FSDP2's ``(Shard(0),)`` and HSDP's ``(Replicate(), Shard(0))``."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(p, dtensor):
        return None
    from torch.distributed.tensor import Replicate, Shard  # DTensor exists, so these do
    placements = tuple(p.placements)  # type: ignore[attr-defined]
    mesh = p.device_mesh  # type: ignore[attr-defined]
    if not (placements[-1] == Shard(0) and all(isinstance(q, Replicate) for q in placements[:-1])):
        raise ValueError(f"kfac: parameter {name!r} is a DTensor with placements {placements}; K-FAC supports "
                         "FSDP2's (Shard(0),) and HSDP's (Replicate(), Shard(0)) (tensor parallelism is not "
                         "supported): leave the module out with skip_layers")
    table = mesh.mesh.reshape(-1, mesh.mesh.shape[-1])  # one shard group per row
    ranks = tuple(int(r) for r in table[_own_row(table, mesh.get_rank())].tolist())
    n, s = p.shape[0], len(ranks)
    c = -(-n // s) if n else 0
    rows = tuple(max(0, min(c, n - i * c)) for i in range(s))
    local = _local(p)
    if local.shape[0] != rows[ranks.index(mesh.get_rank())]:
        raise ValueError(f"kfac: parameter {name!r} holds {local.shape[0]} rows on this rank, not the "
                         f"{rows[ranks.index(mesh.get_rank())]} of torch.chunk's layout")
    return ShardSpec(shape=tuple(p.shape), ranks=ranks, rows=rows)


def _local(t: Tensor) -> Tensor:
    """A ``DTensor``'s local shard (the tensor itself under ``no_grad``: writes reach the ``DTensor``)."""
    return t.to_local()  # type: ignore[attr-defined]


def _own_row(rows: Tensor, rank: int) -> int:
    """Index of the row of a 2-d rank table that contains ``rank``."""
    return int((rows == rank).any(dim=1).nonzero()[0, 0])


@dataclass
class Exchanged:
    """One sharded layer after the exchange, on every rank of its shard group: ``ok`` (preconditioned, else it
    keeps its plain gradient), ``<P(g), g>`` of the whole layer, this rank's rows of ``P(g)`` flattened (one
    buffer) and the ``(local .grad, view of that buffer)`` pairs to copy."""

    ok: bool
    dot: Tensor
    update: Tensor
    targets: list[tuple[Tensor, Tensor]]


class ShardedGradients:
    """The sharded layers of one preconditioner: ``params[name]`` in the adapter's :meth:`parameters` order, all
    sharded over the same shard group (clear errors otherwise), with gradients travelling in ``dtype``."""

    def __init__(self, *, comm: Communicator, params: Mapping[str, Sequence[Tensor]], dtype: torch.dtype) -> None:
        self.comm, self.dtype = comm, dtype
        self.params = {}
        self.specs: dict[str, list[ShardSpec]] = {}
        groups: set[tuple[int, ...]] = set()
        for name, ps in params.items():
            specs = [shard_spec(f"{name}[{i}]", p) for i, p in enumerate(ps)]
            if all(s is None for s in specs):
                continue
            if any(s is None for s in specs):
                raise ValueError(f"kfac: layer {name!r} mixes sharded (DTensor) and plain parameters")
            self.params[name] = list(ps)
            self.specs[name] = [s for s in specs if s is not None]
            groups.update(s.ranks for s in self.specs[name])
        if len(groups) > 1:
            raise ValueError(f"kfac: the sharded layers use different shard groups {sorted(groups)}; K-FAC needs one")
        self.members: tuple[int, ...] = groups.pop() if groups else ()
        self.workers: dict[str, int] = {}
        self.group: Any = None
        if self.members:
            missing = set(self.members) - set(comm.ranks)
            if missing:
                raise ValueError(f"kfac: the shard group {self.members} has ranks {sorted(missing)} outside K-FAC's "
                                 "process group")
            self.position = self.members.index(comm.ranks[comm.rank])
            local = [comm.ranks.index(g) for g in self.members]
            self.group = comm.group if len(local) == comm.world_size else comm.new_group(local)

    def __contains__(self, name: object) -> bool:
        return name in self.params

    def __bool__(self) -> bool:
        return bool(self.params)

    def bind(self, workers: Callable[[str, Sequence[int]], int]) -> None:
        """Choose each layer's worker: ``workers(name, members)`` returns the position in the shard group
        ``members`` (global ranks) of the rank that preconditions ``name`` there."""
        self.workers = {n: workers(n, self.members) for n in self.params}

    def local(self, name: str) -> Tensor | None:
        """This rank's rows of the layer's gradients, flattened into one tensor (``None`` without a gradient on the
        first parameter, the same on every rank: FSDP2 reduce-scatters every gradient)."""
        grads = [p.grad for p in self.params[name]]
        if grads[0] is None:
            return None
        parts = [torch.zeros(s.numel(self.position), dtype=self.dtype, device=p.device) if g is None
                 else _local(g).reshape(-1) for p, g, s in zip(self.params[name], grads, self.specs[name])]
        return torch.cat([t.to(self.dtype) for t in parts])

    def zeros(self, name: str) -> Tensor:
        """Zeros in the layout of :meth:`local` (for a layer without gradients on this step)."""
        return self._empty(name, self.position).zero_()

    def exchange(self, grads: Mapping[str, Tensor | None],
                 precondition: Callable[[str, list[Tensor]], tuple[Tensor, bool, Tensor]],
                 ) -> dict[str, Exchanged]:
        """Steps 1-3 of the module docstring for the layers whose local rows ``grads`` holds (from :meth:`local`);
        ``precondition(name, full_grads)`` runs on the worker with the full per-parameter gradients and returns the
        per-parameter results (one flat tensor, in parameter order), ``ok`` and ``<P(g), g>``."""
        whole = self.gather(grads)
        return self.scatter({n: precondition(n, full) for n, full in whole.items()}, grads)

    def gather(self, grads: Mapping[str, Tensor | None]) -> dict[str, list[Tensor]]:
        """Step 1: this rank's layers' whole per-parameter gradients, from every rank's rows in ``grads`` (a
        collective over the shard group)."""
        names = [n for n in self.params if grads.get(n) is not None]
        if not names:
            return {}
        size, me = len(self.members), self.position
        sends: list[list[Tensor]] = [[] for _ in range(size)]
        like: list[list[Tensor]] = [[] for _ in range(size)]
        mine = [n for n in names if self.workers[n] == me]
        for n in names:
            sends[self.workers[n]].append(grads[n])  # type: ignore[arg-type]  # filtered above
        for n in mine:
            for src in range(size):
                like[src].append(self._empty(n, src))
        got = self.comm.all_to_all(sends, like, category="gradients", group=self.group)
        out: dict[str, list[Tensor]] = {}
        taken = [0] * size
        for n in mine:
            pieces = []
            for src in range(size):
                pieces.append(got[src][taken[src]])
                taken[src] += 1
            out[n] = self._assemble(n, pieces)
        return out

    def scatter(self, done: Mapping[str, tuple[Tensor, bool, Tensor]], grads: Mapping[str, Tensor | None],
                ) -> dict[str, Exchanged]:
        """Step 3: every rank its rows of the results ``done`` of this rank's layers (``(flat per-parameter
        result, ok, <P(g), g>)``), for the layers whose rows ``grads`` holds (a collective over the shard group)."""
        names = [n for n in self.params if grads.get(n) is not None]
        if not names:
            return {}
        size = len(self.members)
        sends: list[list[Tensor]] = [[] for _ in range(size)]
        like: list[list[Tensor]] = [[] for _ in range(size)]
        for n in names:
            if n not in done:
                continue
            flat, ok, dot = done[n]
            header = torch.stack([torch.tensor(float(ok), dtype=self.dtype, device=flat.device),
                                  dot.to(self.dtype)])
            for dst, piece in enumerate(self._pieces(n, flat)):
                sends[dst].append(torch.cat([header, piece]))
        for n in names:
            like[self.workers[n]].append(torch.empty(2 + grads[n].numel(), dtype=self.dtype,  # type: ignore[union-attr]
                                                     device=grads[n].device))  # type: ignore[union-attr]
        back = self.comm.all_to_all(sends, like, category="gradients", group=self.group)
        taken = [0] * size
        out = {}
        for n in names:
            src = self.workers[n]
            buf = back[src][taken[src]]
            taken[src] += 1
            update = buf[2:]
            out[n] = Exchanged(ok=bool(buf[0] > 0.5), dot=buf[1], update=update, targets=self._targets(n, update))
        return out

    # -- layout helpers ------------------------------------------------------------------------------------
    def _empty(self, name: str, position: int) -> Tensor:
        device = self.params[name][0].device
        return torch.empty(sum(s.numel(position) for s in self.specs[name]), dtype=self.dtype, device=device)

    def _assemble(self, name: str, pieces: Sequence[Tensor]) -> list[Tensor]:
        """The full per-parameter gradients from every position's flat rows."""
        out = []
        offsets = [0] * len(pieces)
        for spec in self.specs[name]:
            chunks = []
            for pos, piece in enumerate(pieces):
                n = spec.numel(pos)
                chunks.append(piece[offsets[pos]:offsets[pos] + n].reshape(spec.rows[pos], *spec.shape[1:]))
                offsets[pos] += n
            out.append(torch.cat(chunks).reshape(spec.shape))
        return out

    def _pieces(self, name: str, flat: Tensor) -> list[Tensor]:
        """A flat per-parameter result cut into every position's rows (each flat, parameters in order)."""
        per_param, start = [], 0
        for spec in self.specs[name]:
            n = prod(spec.shape)
            per_param.append(spec.chunks(flat[start:start + n]))
            start += n
        return [torch.cat([chunks[pos] for chunks in per_param]) for pos in range(len(self.members))]

    def _targets(self, name: str, update: Tensor) -> list[tuple[Tensor, Tensor]]:
        out, start = [], 0
        for p, spec in zip(self.params[name], self.specs[name]):
            n = spec.numel(self.position)
            if p.grad is not None:
                local = _local(p.grad)
                out.append((local, update[start:start + n].view(local.shape)))
            start += n
        return out
