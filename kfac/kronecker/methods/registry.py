"""The one table of K-FAC curvature methods by name (what ``method=`` accepts)."""

from __future__ import annotations

from .base import CurvatureMethod
from .eigen import EigenKFAC
from .ekfac import EigenCorrectedKFAC
from .inverse import InverseKFAC

__all__ = ["METHODS", "make_method"]

METHODS: dict[str, type[CurvatureMethod]] = {"eigen": EigenKFAC, "inverse": InverseKFAC, "ekfac": EigenCorrectedKFAC}


def make_method(name: str, *, relative_damping: bool = False) -> CurvatureMethod:
    """A fresh instance of the method called ``name`` (``ValueError`` listing the names otherwise);
    ``relative_damping``: the damping is in units of each layer's mean eigenvalue (eigen and EK-FAC)."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}")
    method = METHODS[name]()
    if relative_damping:
        if method.bakes_damping:
            raise ValueError(f"relative_damping needs method='eigen' or 'ekfac' (method={name!r} bakes an absolute "
                             "damping into its inverses)")
        method.relative_damping = True
    return method
