"""Hyperparameters that are either constants or schedules ``step -> value``."""

from __future__ import annotations

import hashlib

from collections.abc import Iterable, Mapping, Sequence
from typing import Callable, Union

import torch
from torch import Tensor

Hyper = Union[float, int, Callable[[int], float]]

__all__ = ["Hyper", "resolve", "check_positive", "check_step_count", "block_lrs", "kl_clip_scale", "update_dots",
           "comparable", "schedule_token"]


def resolve(value: Hyper | None, step: int, *, name: str) -> float | int | None:
    """Return ``value(step)`` for a schedule, ``value`` otherwise."""
    if value is None:
        return None
    out = value(step) if callable(value) else value
    if isinstance(out, bool) or not isinstance(out, (int, float)):
        raise TypeError(f"hyperparameter {name!r} must be a number (or a callable returning one), got {out!r}")
    return out


def comparable(value: Hyper | None, step: int = 0) -> object:
    """A JSON-serialisable form of a hyperparameter for cross-rank comparison: constants as they are, a schedule
    as ``{"schedule at step": value}`` (its value at ``step``; schedules are compared step by step with
    :func:`schedule_token`)."""
    if callable(value):
        return {f"schedule at step {step}": value(step)}
    if isinstance(value, torch.dtype):
        return str(value)
    return value


def schedule_token(values: Iterable[object]) -> int:
    """A 62-bit digest of ``values`` (numbers), equal on two ranks iff (up to hash collisions) the values are;
    used to detect schedules that differ between ranks inside a step's existing all-reduce."""
    digest = hashlib.blake2b(repr(tuple(values)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


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


def update_dots(updates: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """``<P(g), g>`` per block for ``(P(g), g)`` pairs, as one vector (no host sync). A dot is non-finite iff
    ``P(g)`` or ``g`` has a non-finite entry (``inf * 0`` is NaN and a non-finite term survives any sum) or the
    sum overflows, so this vector doubles as the finiteness check of the preconditioned gradients."""
    device = updates[0][0].device
    dtype = torch.float64 if any(v.dtype == torch.float64 for v, _ in updates) else torch.float32
    return torch.stack([torch.vdot(v.reshape(-1), g.to(v.dtype).reshape(-1)).to(device=device, dtype=dtype)
                        for v, g in updates])


def kl_clip_scale(dots: Tensor, lrs: Sequence[float], kl_clip: float) -> Tensor:
    """KAISA's trust region: ``nu = min(1, sqrt(kl_clip / |sum_blocks lr^2 <P(g), g>|))`` over the finite entries of
    ``dots`` (see :func:`update_dots`), as a 0-dim tensor (no host sync)."""
    lr2 = torch.tensor([lr * lr for lr in lrs], dtype=dots.dtype).to(dots.device, non_blocking=True)
    total = torch.where(torch.isfinite(dots), dots * lr2, torch.zeros((), dtype=dots.dtype, device=dots.device))
    return torch.clamp(torch.sqrt(kl_clip / total.sum().abs()), max=1.0)
