"""Hyperparameters that are either constants or schedules ``step -> value``."""

from __future__ import annotations

from typing import Callable, Union

Hyper = Union[float, int, Callable[[int], float]]

__all__ = ["Hyper", "resolve", "check_positive", "check_step_count"]


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
