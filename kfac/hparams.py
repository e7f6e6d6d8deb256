"""Hyperparameters that are either constants or schedules ``step -> value``."""

from __future__ import annotations

import hashlib

from collections.abc import Iterable, Mapping
from typing import Callable, Literal, Union, overload

import torch

Hyper = Union[float, int, Callable[[int], float]]

__all__ = ["Hyper", "resolve", "check_positive", "check_step_count", "block_lrs", "comparable",
           "schedule_token"]


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


@overload
def check_positive(value: float | None, *, name: str, allow_none: Literal[False] = False) -> float: ...


@overload
def check_positive(value: float | None, *, name: str, allow_none: bool) -> float | None: ...


def check_positive(value: float | None, *, name: str, allow_none: bool = False) -> float | None:
    """``value`` as a float if it is a finite positive number (or ``None`` when allowed); ``ValueError`` otherwise."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return float(value)


def check_step_count(value: object, *, name: str) -> int:
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


