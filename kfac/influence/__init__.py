"""Influence functions on the factor store (see :mod:`kfac.influence.analyzer` for the math and conventions).

Layout: :mod:`~kfac.influence.analyzer` (:class:`InfluenceAnalyzer`, the composing class: set-up and the public
methods) over :mod:`~kfac.influence.arguments` (settings), :mod:`~kfac.influence.passes` (batches and per-example
rows), :mod:`~kfac.influence.fitting` (factors, ``Lambda``, M-FAC gradients), :mod:`~kfac.influence.scoring`
(preconditioning, query gradients, score assembly), :mod:`~kfac.influence.persistence` (save/load,
:func:`weights_digest`), :mod:`~kfac.influence.index` (the on-disk training-gradient index) and
:mod:`~kfac.influence.candidates` (TF-IDF candidates of two-stage queries); :mod:`~kfac.influence.task` and :mod:`~kfac.influence.gradients` are the leaves.
"""

from .analyzer import InfluenceAnalyzer
from .candidates import TextCandidates
from .index import GradientIndex
from .arguments import InfluenceArguments
from .persistence import weights_digest
from .scoring import TopK
from .task import CausalLMTask, ClassificationTask, Task

__all__ = ["CausalLMTask", "ClassificationTask", "GradientIndex", "InfluenceAnalyzer", "InfluenceArguments", "Task",
           "TextCandidates", "TopK", "weights_digest"]
