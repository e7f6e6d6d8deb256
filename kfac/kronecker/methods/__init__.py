"""Curvature methods behind one interface (:class:`CurvatureMethod`): K-FAC (eigen, inverse) and EK-FAC over the
factor store's entries; M-FAC's sliding-window Fisher (:mod:`kfac.mfac.fisher`) works on gradients directly."""

from .base import CurvatureMethod, DecompositionError
from .ekfac import EigenCorrectedKFAC
from .eigen import EigenKFAC
from .inverse import InverseKFAC
from .registry import METHODS, make_method
from .warm import WARM_REFRESH_FRACTION, WarmStart

__all__ = ["CurvatureMethod", "DecompositionError", "EigenCorrectedKFAC", "EigenKFAC", "InverseKFAC", "METHODS",
           "WARM_REFRESH_FRACTION", "WarmStart", "make_method"]
