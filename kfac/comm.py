"""Communication: the only module that calls ``torch.distributed``.

A :class:`Communicator` wraps a process group with the few collectives distributed K-FAC needs, each applied to a
*bucket* (many tensors flattened into one buffer, so a step issues one collective per source/destination rank,
not one per layer). Symmetric matrices travel as packed upper triangles (``d(d+1)/2`` numbers instead of ``d^2``),
optionally in a lower-precision communication dtype. Every call adds its share of the bytes on the wire to
``bytes_sent`` (by category) with the bandwidth-optimal volumes the planner predicts, so that the sum over ranks
is the traffic of the step: a ring all-reduce moves ``2 (N - 1)`` payloads, a reduce ``N - 1``, a broadcast one
per receiver (each rank counts ``1/N`` of a collective's volume; a broadcast is counted by its source).

A communicator over a single process (or with ``torch.distributed`` not initialised) performs no communication.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Communicator", "pack_symmetric", "unpack_symmetric"]


def pack_symmetric(m: Tensor) -> Tensor:
    """The upper triangle (diagonal included) of a symmetric ``d x d`` matrix, row-major, as a vector."""
    d = m.shape[0]
    i, j = torch.triu_indices(d, d, device=m.device)
    return m[i, j]


def unpack_symmetric(v: Tensor, d: int) -> Tensor:
    """Inverse of :func:`pack_symmetric`."""
    i, j = torch.triu_indices(d, d, device=v.device)
    m = torch.empty(d, d, dtype=v.dtype, device=v.device)
    m[i, j] = v
    m[j, i] = v
    return m


class Communicator:
    """Bucketed collectives over ``group`` (the default process group when ``None``).

    Args:
        group: a ``torch.distributed`` process group, or ``None`` for the default one.
        comm_dtype: dtype for payloads on the wire (e.g. ``torch.bfloat16``); ``None`` keeps each tensor's dtype.
    """

    def __init__(self, *, group: Any | None = None, comm_dtype: torch.dtype | None = None) -> None:
        self.group = group
        self.comm_dtype = comm_dtype
        self.enabled = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.enabled else 0
        self.world_size = dist.get_world_size(group) if self.enabled else 1
        self.enabled = self.enabled and self.world_size > 1
        self.bytes_sent: Counter[str] = Counter()  # float byte counts (fractions of collectives)

    # -- buckets -------------------------------------------------------------------------------------------
    def _flatten(self, tensors: Sequence[Tensor], *, exact: bool = False) -> Tensor:
        dtype = tensors[0].dtype if exact or self.comm_dtype is None else self.comm_dtype
        return torch.cat([t.reshape(-1).to(dtype) for t in tensors])

    @staticmethod
    def _unflatten(buffer: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
        out, offset = [], 0
        for t in like:
            n = t.numel()
            out.append(buffer[offset:offset + n].view(t.shape).to(t.dtype))
            offset += n
        return out

    def _count(self, category: str, buffer: Tensor, factor: float = 1.0, control: int = 0) -> None:
        """Account ``factor`` copies of ``buffer``, of which ``control`` elements (status flags) go to "control"."""
        size = buffer.element_size()
        self.bytes_sent[category] += (buffer.numel() - control) * size * factor
        if control:
            self.bytes_sent["control"] += control * size * factor

    # -- collectives ---------------------------------------------------------------------------------------
    def all_reduce_sum(self, tensors: Sequence[Tensor], *, category: str, exact: bool = False) -> list[Tensor]:
        """Element-wise sums over ranks of ``tensors`` (new tensors; inputs are not modified). ``exact`` keeps
        the tensors' own dtype on the wire (for counts and other bookkeeping that ``comm_dtype`` must not round)."""
        if not self.enabled or not tensors:
            return list(tensors)
        buffer = self._flatten(tensors, exact=exact)
        self._count(category, buffer, 2 * (self.world_size - 1) / self.world_size)
        dist.all_reduce(buffer, group=self.group)
        return self._unflatten(buffer, tensors)

    def reduce_sum(self, tensors: Sequence[Tensor], *, dst: int, category: str) -> list[Tensor] | None:
        """Sums over ranks, delivered to rank ``dst`` only (other ranks get ``None``)."""
        if not self.enabled:
            return list(tensors)
        if not tensors:
            return [] if self.rank == dst else None
        buffer = self._flatten(tensors)
        self._count(category, buffer, (self.world_size - 1) / self.world_size)
        dist.reduce(buffer, dst=self._global(dst), group=self.group)
        return self._unflatten(buffer, tensors) if self.rank == dst else None

    def broadcast(self, tensors: Sequence[Tensor], *, src: int, category: str, group: Any | None = None,
                  group_size: int | None = None, control: int = 0) -> list[Tensor]:
        """``src``'s ``tensors`` on every rank of ``group`` (others pass correctly shaped placeholders);
        ``control`` of the elements are status flags (accounted separately)."""
        if not self.enabled or not tensors:
            return list(tensors)
        buffer = self._flatten(tensors)
        if self.rank == src:
            receivers = (group_size or self.world_size) - 1
            self._count(category, buffer, receivers, control)
        dist.broadcast(buffer, src=self._global(src), group=group if group is not None else self.group)
        return self._unflatten(buffer, tensors)

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (one tiny all-reduce)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return bool(t.item())

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def check_identical(self, value: Any, *, what: str) -> None:
        """Raise the same clear error on every rank if ``value`` (JSON-serialisable) differs between ranks."""
        digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
        digests = self.all_gather_object(digest)
        if len(set(digests)) > 1:
            groups: dict[str, list[int]] = {}
            for r, d in enumerate(digests):
                groups.setdefault(d, []).append(r)
            raise RuntimeError(f"kfac: {what} differs between ranks (ranks grouped by value: "
                               f"{sorted(groups.values())}); every rank must build the same model and options")

    def new_group(self, ranks: Sequence[int]) -> Any:
        """A subgroup (must be called by every rank, in the same order)."""
        return dist.new_group(ranks=[self._global(r) for r in ranks]) if self.enabled else None

    def _global(self, rank: int) -> int:
        if self.group is None:
            return rank
        return dist.get_global_rank(self.group, rank)

    def _device(self) -> torch.device:
        backend = dist.get_backend(self.group)
        if backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
