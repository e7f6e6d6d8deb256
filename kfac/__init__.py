"""kfac: distributed second-order optimization for PyTorch (K-FAC and friends)."""

from .methods import CurvatureMethod, DecompositionError, EigenKFAC, InverseKFAC
from .optimizer import KFAC
from .preconditioner import KFACPreconditioner
from .store import FactorEntry, FactorFileError, FactorStore

__version__ = "0.1.0"

__all__ = [
    "KFAC", "KFACPreconditioner", "FactorStore", "FactorEntry", "FactorFileError",
    "CurvatureMethod", "DecompositionError", "EigenKFAC", "InverseKFAC", "__version__",
]
