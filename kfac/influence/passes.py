"""Passes over the data: this rank's batches (empty ones dropped, sharded, with progress) and per-example rows."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed.fsdp import sharded_parameters
from ..kronecker.preconditioner import KFACPreconditioner
from .gradients import capture
from .task import Task

__all__ = ["DataPasses", "eval_mode", "is_empty"]


class DataPasses:
    """Batches and their per-example rows for one call of the analyzer.

    ``engine`` supplies the tracked layers, their adapters and parameters, and the communicator that shards
    batches (batch ``i`` on rank ``i % world_size``). On a model sharded with FSDP2, whose forward and backward
    passes are collectives, a rank with fewer batches than rank 0 runs (and discards) one more pass at the end, so
    that every rank runs the same number."""

    def __init__(self, model: nn.Module, task: Task, engine: KFACPreconditioner, *, seed: int, dtype: torch.dtype,
                 progress: bool) -> None:
        self.model, self.task, self.engine = model, task, engine
        self.seed, self.dtype, self.progress = seed, dtype, progress

    @property
    def layers(self) -> list[str]:
        return self.engine.layers

    @property
    def device(self) -> torch.device:
        """Where fitting sums live (and, distributed, travel): the model's device."""
        return next((p.device for p in self.model.parameters()), torch.device("cpu"))

    def batches(self, loader: Iterable[Any], what: str, *, shard: bool = True) -> Iterable[tuple[int, Any]]:
        """``(index, batch)`` of this rank's batches. Batches of no examples (see :func:`is_empty`) are dropped
        before numbering, so they change neither the sharding nor the sampled labels of the other batches."""
        comm = self.engine.communicator
        items: Iterator[tuple[int, Any]] = ((i, b) for i, b in enumerate(b for b in loader if not is_empty(b))
                                            if not shard or i % comm.world_size == comm.rank)
        if shard and comm.enabled and sharded_parameters(self.model.named_parameters()):
            items = self._lockstep(loader, comm.rank, comm.world_size)
        return _progress(items, f"influence: {what}", total=_len(loader), enabled=self.progress and comm.rank == 0)

    def _lockstep(self, loader: Iterable[Any], rank: int, world: int) -> Iterator[tuple[int, Any]]:
        """This rank's batches, then a discarded pass over the first batch if rank 0 had one more."""
        first, count = None, 0
        for i, b in enumerate(b for b in loader if not is_empty(b)):
            first = b if first is None else first
            count += 1
            if i % world == rank:
                yield i, b
        if first is not None and (count - 1) // world + 1 > (count - 1 - rank) // world + 1:
            self.rows(first, sampled=False)  # FSDP2's collectives, in step with the other ranks

    def rows(self, batch: Any, *, sampled: bool, measurement: bool = False, index: int = 0,
             ) -> dict[str, tuple[Tensor, Tensor]]:
        """Per-example rows of one batch (``loss.sum()`` backward through the tracked layers only). Sampled labels
        come from a generator seeded by ``(seed, batch index)``: the same on any rank that processes the batch."""
        with capture(self.engine.adapters, self.dtype) as cap:
            if measurement:
                values = self.task.measurement(self.model, batch)
            elif sampled:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
                values = self.task.sampled_loss(self.model, batch, generator=generator)
            else:
                values = self.task.loss(self.model, batch)
            if not isinstance(values, Tensor) or values.dim() != 1:
                what = "measurement" if measurement else "loss"
                shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
                raise ValueError(f"Task.{what}() must return one value per example (shape [B]), got {shape}")
            if cap.outputs:
                torch.autograd.grad(values.sum(), cap.outputs, allow_unused=True)
        rows = cap.rows
        missing = [n for n in self.layers if n not in rows]
        if missing:
            raise RuntimeError(f"influence: tracked layers {missing} received no gradient from the task's "
                               f"{'measurement' if measurement else 'loss'}")
        return rows


class eval_mode:  # a context manager used like a function
    """Eval mode for the duration (dropout off, batch norm frozen); the previous modes are restored."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        for m, mode in self.modes:
            m.training = mode


def is_empty(batch: Any) -> bool:
    """Whether ``batch`` visibly holds no examples: every tensor in it (through tuples, lists and mappings) with at
    least one dimension has a leading dimension of 0, and there is at least one. Other empty batches are still
    processed (and contribute nothing), but they count as a batch for sharding and label sampling."""
    sizes: list[int] = []
    stack = [batch]
    while stack:
        item = stack.pop()
        if isinstance(item, Tensor):
            if item.dim() > 0:
                sizes.append(item.shape[0])
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
    return bool(sizes) and not any(sizes)


def _len(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def _progress(items: Iterator[Any], desc: str, *, total: int | None, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are optional
        return items
    return tqdm(items, desc=desc, total=total, leave=False)
