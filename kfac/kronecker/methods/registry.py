"""The one table of K-FAC curvature methods by name (what ``method=`` accepts)."""

from __future__ import annotations

from .base import CurvatureMethod
from .eigen import EigenKFAC
from .ekfac import EigenCorrectedKFAC
from .inverse import InverseKFAC
from .warm import WarmRefresher, WarmStart

__all__ = ["METHODS", "make_method"]

METHODS: dict[str, type[CurvatureMethod]] = {"eigen": EigenKFAC, "inverse": InverseKFAC, "ekfac": EigenCorrectedKFAC}


def make_method(name: str, *, relative_damping: bool = False, warm_start: WarmStart | bool = False,
                truncate: float | None = None) -> CurvatureMethod:
    """A fresh instance of the method called ``name`` (``ValueError`` listing the names otherwise);
    ``relative_damping``: the damping is in units of each layer's mean eigenvalue (eigen and EK-FAC);
    ``warm_start``: refresh eigenbases from the previous ones (``True``: :class:`WarmStart` defaults; eigen and
    EK-FAC); ``truncate``: ``ε`` of the truncated eigenbasis (eigen only; see :mod:`kfac.kronecker.methods.eigen`)."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}")
    method = METHODS[name]()
    if relative_damping:
        if method.bakes_damping:
            raise ValueError(f"relative_damping needs method='eigen' or 'ekfac' (method={name!r} bakes an absolute "
                             "damping into its inverses)")
        method.relative_damping = True
    if warm_start is not False:
        config = WarmStart() if warm_start is True else warm_start
        if not isinstance(config, WarmStart):
            raise TypeError(f"warm_start must be a bool or a WarmStart, got {warm_start!r}")
        if not isinstance(method, EigenKFAC):
            raise ValueError(f"warm_start needs method='eigen' or 'ekfac' (method={name!r} computes inverses)")
        method.warm = WarmRefresher(config)
    if truncate is not None:
        if isinstance(truncate, bool) or not isinstance(truncate, (int, float)) or not 0 < truncate <= 1:
            raise ValueError(f"truncate must be None or in (0, 1], got {truncate!r}")
        if type(method) is not EigenKFAC:
            raise ValueError(f"truncate needs method='eigen' (method={name!r}: its eigenvalues are not dG dA^T)")
        method.truncate = float(truncate)
    return method
