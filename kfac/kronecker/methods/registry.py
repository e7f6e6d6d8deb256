"""The one table of K-FAC curvature methods by name (what ``method=`` accepts)."""

from __future__ import annotations

from .base import CurvatureMethod
from .eigen import EigenKFAC
from .ekfac import EigenCorrectedKFAC
from .inverse import InverseKFAC

__all__ = ["METHODS", "make_method"]

METHODS: dict[str, type[CurvatureMethod]] = {"eigen": EigenKFAC, "inverse": InverseKFAC, "ekfac": EigenCorrectedKFAC}


def make_method(name: str) -> CurvatureMethod:
    """A fresh instance of the method called ``name`` (``ValueError`` listing the names otherwise)."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]()
