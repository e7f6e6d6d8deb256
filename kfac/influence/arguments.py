"""The settings of an influence analysis, declared once: defaults, conversion and validation."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["METHODS", "SOLVERS", "InfluenceArguments", "dtype_name"]

METHODS = ("ekfac", "kfac", "mfac", "identity")
SOLVERS = ("direct", "ggn", "hessian")


@dataclass
class InfluenceArguments:
    """Settings of an :class:`~kfac.influence.InfluenceAnalyzer` (saved with the fitted factors).

    ``method``, ``fisher``, ``damping``: see :mod:`kfac.influence.analyzer`. ``tracked_modules``: module names
    (default: every supported layer; embeddings are never tracked). ``num_grads``: M-FAC's number of gradients.
    ``factor_dtype``, ``score_dtype``: names of floating point dtypes (a ``torch.dtype`` is converted to its name).
    ``query_rank``: keep preconditioned query gradients at this rank (``None``: full). ``seed``: of the labels
    sampled for ``fisher="mc"``. ``lambda_labels``: the labels of EK-FAC's ``Lambda`` pass -- ``"data"`` (the
    data's own; the better LDS in our benchmark) or ``"sampled"`` (with ``fisher="mc"``: the labels sampled for
    ``A`` and ``G``, kronfluence's convention). ``solver``: ``"direct"`` (``(C + damping I)^-1``), or ``"ggn"`` / ``"hessian"``: conjugate gradients on the damped
exact Gauss-Newton matrix / Hessian, preconditioned by the direct map (at most ``solver_iterations`` passes over
the fitted data, stopping at relative residual ``solver_tolerance``; see :mod:`kfac.influence.solver`). Converted and validated on construction (also by ``dataclasses.replace``).
    """

    method: str = "ekfac"
    fisher: str = "mc"
    damping: float | None = None
    tracked_modules: list[str] | None = None
    num_grads: int = 256
    factor_dtype: str = "float32"
    score_dtype: str = "float32"
    query_rank: int | None = None
    seed: int = 0
    lambda_labels: str = "data"
    solver: str = "direct"
    solver_iterations: int = 20
    solver_tolerance: float = 1e-3

    def __post_init__(self) -> None:
        self.factor_dtype = dtype_name(self.factor_dtype)
        self.score_dtype = dtype_name(self.score_dtype)
        if self.tracked_modules is not None:
            self.tracked_modules = list(self.tracked_modules)
        self.validate()

    @classmethod
    def with_options(cls, arguments: InfluenceArguments | None, options: Mapping[str, Any]) -> InfluenceArguments:
        """A new, validated copy of ``arguments`` (``None``: the defaults) with ``options`` overriding its fields.

        Raises ``TypeError`` naming any option that is not a field."""
        if arguments is not None and not isinstance(arguments, cls):
            raise TypeError(f"arguments must be an {cls.__name__} or None, got {type(arguments).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in options if k not in names]
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(map(repr, unknown))}: options are {cls.__name__} "
                            f"fields ({', '.join(names)})")
        return cls(**options) if arguments is None else dataclasses.replace(arguments, **options)

    def validate(self) -> None:
        """Raise ``ValueError`` for a setting out of range."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.fisher not in ("mc", "empirical"):
            raise ValueError(f"fisher must be 'mc' or 'empirical', got {self.fisher!r}")
        if self.lambda_labels not in ("data", "sampled"):
            raise ValueError(f"lambda_labels must be 'data' or 'sampled', got {self.lambda_labels!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if not isinstance(self.solver_iterations, int) or self.solver_iterations < 0:
            raise ValueError(f"solver_iterations must be a non-negative integer, got {self.solver_iterations!r}")
        if not (isinstance(self.solver_tolerance, (int, float)) and 0 <= self.solver_tolerance < 1):
            raise ValueError(f"solver_tolerance must be in [0, 1), got {self.solver_tolerance!r}")
        if self.damping is not None and not (isinstance(self.damping, (int, float)) and self.damping > 0
                                             and math.isfinite(self.damping)):
            raise ValueError(f"damping must be None or a finite positive number, got {self.damping!r}")
        if self.query_rank is not None and (not isinstance(self.query_rank, int) or self.query_rank < 1):
            raise ValueError(f"query_rank must be None or a positive integer, got {self.query_rank!r}")
        if not isinstance(self.num_grads, int) or self.num_grads < 1:
            raise ValueError(f"num_grads must be a positive integer, got {self.num_grads!r}")
        for name in ("factor_dtype", "score_dtype"):
            dtype = getattr(torch, getattr(self, name), None)
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise ValueError(f"{name} must name a floating point torch dtype, got {getattr(self, name)!r}")


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.float64`` -> ``"float64"``; anything else as ``str``."""
    return str(dtype).replace("torch.", "") if isinstance(dtype, torch.dtype) else str(dtype)
