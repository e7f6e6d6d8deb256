"""K-FAC's hyperparameters: constants or schedules ``step -> value``, resolved and validated per step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..hparams import Hyper, check_positive, check_step_count, comparable, resolve

__all__ = ["KFACHyperparameters", "SCHEDULED"]

SCHEDULED = ("factor_update_steps", "inv_update_steps", "correction_update_steps", "damping", "factor_decay",
             "correction_decay", "kl_clip", "lr")
"""The hyperparameters every rank must agree on at every step (see :meth:`kfac.KFACPreconditioner.step`)."""


@dataclass
class KFACHyperparameters:
    """Schedules of a K-FAC preconditioner (see :class:`kfac.KFACPreconditioner` for their meaning). The
    correction schedule and decay default to the factor ones."""

    factor_update_steps: Hyper = 1
    inv_update_steps: Hyper = 1
    damping: Hyper = 1e-3
    factor_decay: Hyper = 0.95
    kl_clip: Hyper | None = 1e-3
    lr: Hyper | None = 0.1
    correction_update_steps: Hyper | None = None
    correction_decay: Hyper | None = None

    def __post_init__(self) -> None:
        if self.correction_update_steps is None:
            self.correction_update_steps = self.factor_update_steps
        if self.correction_decay is None:
            self.correction_decay = self.factor_decay
        self.at(0)  # validate constants early

    def interval(self, name: str, step: int) -> int:
        """A step-count hyperparameter at ``step`` (a positive integer)."""
        return check_step_count(resolve(getattr(self, name), step, name=name), name=name)

    def at(self, step: int) -> dict[str, Any]:
        """Every hyperparameter at ``step``, validated (``ValueError`` naming the first invalid one)."""
        hp: dict[str, Any] = {
            "factor_update_steps": self.interval("factor_update_steps", step),
            "inv_update_steps": self.interval("inv_update_steps", step),
            "damping": resolve(self.damping, step, name="damping"),
            "factor_decay": resolve(self.factor_decay, step, name="factor_decay"),
            "correction_update_steps": self.interval("correction_update_steps", step),
            "correction_decay": resolve(self.correction_decay, step, name="correction_decay"),
            "kl_clip": resolve(self.kl_clip, step, name="kl_clip"),
            "lr": resolve(self.lr, step, name="lr"),
        }
        check_positive(hp["damping"], name="damping")
        check_positive(hp["kl_clip"], name="kl_clip", allow_none=True)
        for key in ("factor_decay", "correction_decay"):
            if not 0 <= hp[key] < 1:
                raise ValueError(f"{key} must be in [0, 1), got {hp[key]!r}")
        return hp

    def values(self, step: int) -> tuple[object, ...]:
        """The :data:`SCHEDULED` values at ``step`` (unvalidated; compared across ranks)."""
        return tuple(resolve(getattr(self, n), step, name=n) for n in SCHEDULED)

    def comparable(self) -> dict[str, Any]:
        """JSON-comparable form (schedules by their step-0 value) for the construction-time cross-rank check."""
        return {n: comparable(getattr(self, n)) for n in SCHEDULED}

    def constant_interval(self, name: str) -> int:
        """The interval as the planner amortises it: the constant, or 1 for a schedule."""
        value = getattr(self, name)
        return value if isinstance(value, int) and not isinstance(value, bool) else 1
