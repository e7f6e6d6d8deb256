"""Influence functions on the factor store (see :mod:`kfac.influence.analyzer` for the math and conventions)."""

from .analyzer import InfluenceAnalyzer, InfluenceArguments, TopK
from .task import ClassificationTask, Task

__all__ = ["InfluenceAnalyzer", "InfluenceArguments", "TopK", "Task", "ClassificationTask"]
