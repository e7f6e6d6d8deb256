"""Curvature methods behind one interface (:class:`CurvatureMethod`): K-FAC (eigen, inverse) and EK-FAC over the
factor store's entries; M-FAC's sliding-window Fisher (:mod:`kfac.mfac.fisher`) works on gradients directly."""

from .base import CurvatureMethod, DecompositionError
from .ekfac import EigenCorrectedKFAC
from .kronecker import EigenKFAC, InverseKFAC, make_method

__all__ = ["CurvatureMethod", "DecompositionError", "EigenCorrectedKFAC", "EigenKFAC", "InverseKFAC",
           "SlidingWindowFisher", "StaticFisher", "make_method"]
