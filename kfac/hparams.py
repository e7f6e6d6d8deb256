"""Hyperparameters that are either constants or schedules ``step -> value``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Callable, Union

import torch
from torch import Tensor

Hyper = Union[float, int, Callable[[int], float]]

__all__ = ["Hyper", "resolve", "check_positive", "check_step_count", "block_lrs", "kl_clip_scale"]


def resolve(value: Hyper | None, step: int, *, name: str) -> float | int | None:
    """Return ``value(step)`` for a schedule, ``value`` otherwise."""
    if value is None:
        return None
    out = value(step) if callable(value) else value
    if isinstance(out, bool) or not isinstance(out, (int, float)):
        raise TypeError(f"hyperparameter {name!r} must be a number (or a callable returning one), got {out!r}")
    return out


def check_positive(value: float | None, *, name: str, allow_none: bool = False) -> float | None:
    """``value`` as a float if it is a finite positive number (or ``None`` when allowed); ``ValueError`` otherwise."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return float(value)


def check_step_count(value: int, *, name: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def block_lrs(names: Iterable[str], default: float | None, lr: float | Mapping[str, float] | None,
              ) -> dict[str, float]:
    """Learning rate of each block for ``kl_clip``: ``lr`` (a float or ``{block: lr}``), else ``default``."""
    out = {}
    for name in names:
        value = lr.get(name, default) if isinstance(lr, Mapping) else (default if lr is None else lr)
        if value is None:
            raise ValueError(f"kl_clip needs a learning rate for {name!r}: pass lr= to the preconditioner or to "
                             "step()")
        out[name] = float(value)
    return out


def kl_clip_scale(updates: Iterable[tuple[Tensor, Tensor, float]], kl_clip: float) -> Tensor | None:
    """KAISA's trust region: ``nu = min(1, sqrt(kl_clip / |sum lr^2 <P(g), g>|))`` over ``(P(g), g, lr)`` triples,
    as a 0-dim tensor (no host sync); ``None`` when there are no updates."""
    dots: dict[tuple[float, torch.device, torch.dtype], list[Tensor]] = {}
    for v, g, lr in updates:  # one dot per layer, summed per learning rate (a handful of kernels, not 3/layer)
        dots.setdefault((lr, v.device, v.dtype), []).append(torch.vdot(v.reshape(-1), g.to(v.dtype).reshape(-1)))
    if not dots:
        return None
    device = next(iter(dots))[1]
    total = sum((torch.stack(ds).sum() * lr ** 2).to(device) for (lr, _, _), ds in dots.items())
    return torch.clamp(torch.sqrt(kl_clip / total.abs()), max=1.0)
