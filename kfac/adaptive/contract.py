"""What adaptive K-FAC checks of its caller: the base optimizer's groups, the closure's behaviour, and the random
state that makes the closure's second call see what its first call saw."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .controller import Forward

__all__ = ["step_lr", "gradient_versions", "same_inputs", "RandomState", "check_equal_parts"]


def step_lr(groups: Sequence[Mapping[str, Any]]) -> float:
    """The multiplier of the chosen update: the base optimizer's ``lr`` (one value for every group; ``maximize``
    is rejected, K-FAC minimises)."""
    if any(g.get("maximize", False) for g in groups):
        raise ValueError("adaptive K-FAC minimises the closure's loss: maximize=True is not supported (return the "
                         "negated objective instead)")
    lrs = sorted({float(g["lr"]) for g in groups})
    if len(lrs) != 1:
        raise ValueError(f"adaptive K-FAC: every param group must have the same lr (the multiplier of the chosen "
                         f"update), got {lrs}")
    if not lrs[0] >= 0:
        raise ValueError(f"adaptive K-FAC: lr must be >= 0 (a multiplier of the chosen update), got {lrs[0]}")
    return lrs[0]


def gradient_versions(params: Iterable[Tensor]) -> list[tuple[int, int] | None]:
    """An identity of every parameter's ``.grad`` (object and in-place version): changes if ``backward`` ran."""
    return [None if p.grad is None else (id(p.grad), p.grad._version) for p in params]


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def same_inputs(first: Sequence[Forward], second: Sequence[Forward]) -> bool:
    """Whether two closure calls ran the same number of forward passes on equal input tensors."""
    if len(first) != len(second):
        return False
    for a, b in zip(first, second):
        ta, tb = _tensors((a.args, a.kwargs)), _tensors((b.args, b.kwargs))
        if len(ta) != len(tb) or not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(ta, tb)):
            return False
    return True


def check_equal_parts(parts: Sequence[Sequence[Forward]]) -> None:
    """Micro-batches must be equal (the batch's curvature is their mean): the same output shapes."""
    shapes = [tuple(tuple(z.shape) for f in forwards for z in f.outputs) for forwards in parts]
    if len(set(shapes)) > 1:
        raise ValueError(f"adaptive K-FAC with accumulation_steps={len(parts)} needs micro-batches of equal size "
                         f"(their curvature is averaged with equal weights); the closures' outputs had shapes {shapes}")


class RandomState:
    """The global random state (CPU and the given CUDA devices) at construction; :meth:`replay` runs a block from
    that state and leaves the caller's random state as it was."""

    def __init__(self, devices: Iterable[torch.device]) -> None:
        self.cuda = sorted({d.index if d.index is not None else torch.cuda.current_device()
                            for d in devices if d.type == "cuda"})
        self.cpu = torch.get_rng_state()
        self.states = [torch.cuda.get_rng_state(i) for i in self.cuda]

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=self.cuda):
            torch.set_rng_state(self.cpu)
            for i, state in zip(self.cuda, self.states):
                torch.cuda.set_rng_state(state, i)
            yield
