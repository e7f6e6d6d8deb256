"""Curvature methods behind one interface (:class:`CurvatureMethod`)."""

from .base import CurvatureMethod, DecompositionError
from .kronecker import EigenKFAC, InverseKFAC, make_method

__all__ = ["CurvatureMethod", "DecompositionError", "EigenKFAC", "InverseKFAC", "make_method"]
