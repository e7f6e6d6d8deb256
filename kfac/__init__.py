"""kfac: distributed second-order optimization for PyTorch (K-FAC, EK-FAC, M-FAC and influence functions)."""

from .curvature import Preconditioner
from .kronecker.methods import (CurvatureMethod, DecompositionError, EigenCorrectedKFAC, EigenKFAC, InverseKFAC,
                                WarmStart)
from .mfac.mfac_preconditioner import MFACPreconditioner
from .optimizer import EKFAC, KFAC, MFAC, PreconditionedOptimizer
from .kronecker.preconditioner import KFACPreconditioner
from .kronecker.store import FactorEntry, FactorFileError, FactorStore
from .modules import ModuleAdapter, register_adapter

__version__ = "0.1.0"

__all__ = [
    "KFAC", "EKFAC", "MFAC", "PreconditionedOptimizer", "KFACPreconditioner", "MFACPreconditioner", "Preconditioner",
    "FactorStore", "FactorEntry", "FactorFileError",
    "CurvatureMethod", "DecompositionError", "EigenKFAC", "InverseKFAC", "EigenCorrectedKFAC", "ModuleAdapter",
    "WarmStart", "register_adapter", "__version__",
]
