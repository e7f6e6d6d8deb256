"""Stage one of a two-stage influence query (Grosse et al., 2023): a TF-IDF index over the training sequences picks,
per query, the candidates that EK-FAC then scores (:meth:`kfac.influence.InfluenceAnalyzer.top_k` with
``candidates=``); the rest of the corpus is never differentiated.

Documents are strings or token-id sequences. Terms are character 3-5-grams within words for strings (on the
two-stage benchmark, a character-level GPT on standard-library docstrings, they found 0.92 of the exhaustive EK-FAC
top 10 among 2% of the corpus, word 1-2-grams 0.76: ``benchmarks/cpu/two_stage.py``), id unigrams and bigrams for
token ids; weighted by sublinear TF times smoothed IDF, rows L2-normalised; a query's candidates are the documents
of highest cosine similarity. scikit-learn's ``TfidfVectorizer`` does the work (a
maintained implementation, rather than our own); it is an optional dependency (``pip install scikit-learn``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["TextCandidates"]

Document = Union[str, Sequence[int], Tensor]


class TextCandidates:
    """A TF-IDF index over ``documents`` (the training set, in its order: positions are the training positions).

    Args:
        documents: strings, or token-id sequences (lists or 1-D tensors; padding ids can be left out by the
            caller, every id counts as a term).
        **options: ``sklearn.feature_extraction.text.TfidfVectorizer`` options over the defaults above (e.g.
            ``analyzer="word", ngram_range=(1, 2)`` for word terms, ``min_df``, ``max_features``).
    """

    def __init__(self, documents: Sequence[Document], **options: Any) -> None:
        try:
            from sklearn.feature_extraction.text import TfidfVectorizer
        except ImportError:
            raise ImportError("TextCandidates needs scikit-learn (pip install scikit-learn)") from None
        if len(documents) == 0:
            raise ValueError("TextCandidates: no documents")
        self.tokens = not isinstance(documents[0], str)
        settings: dict[str, Any] = ({"ngram_range": (1, 2), "token_pattern": r"\S+", "lowercase": False} if self.tokens
                                    else {"analyzer": "char_wb", "ngram_range": (3, 5)})  # ids: each a term
        settings.update(sublinear_tf=True, **options)
        self.vectorizer = TfidfVectorizer(**settings)
        self.matrix = self.vectorizer.fit_transform([self._text(d) for d in documents])  # n x terms, sparse

    def __len__(self) -> int:
        return int(self.matrix.shape[0])

    def _text(self, document: Document) -> str:
        if isinstance(document, str):
            if self.tokens:
                raise TypeError("TextCandidates was built on token ids: query with token ids too")
            return document
        if not self.tokens:
            raise TypeError("TextCandidates was built on strings: query with strings too")
        ids = document.tolist() if isinstance(document, Tensor) else list(document)
        return " ".join(f"t{int(i)}" for i in ids)

    def similarities(self, queries: Sequence[Document]) -> np.ndarray:
        """``[n_query, n_documents]`` cosine similarities of the queries' TF-IDF vectors to every document."""
        q = self.vectorizer.transform([self._text(d) for d in queries])
        return np.asarray((q @ self.matrix.T).todense())

    def select(self, queries: Sequence[Document], count: int | float) -> Tensor:
        """``[n_query, c]`` training positions of each query's candidates, most similar first: ``count`` of them
        (an int), or that fraction of the corpus (a float in ``(0, 1]``; at least one)."""
        n = len(self)
        if isinstance(count, float):
            if not 0 < count <= 1:
                raise ValueError(f"candidate fraction must be in (0, 1], got {count}")
            c = max(1, int(round(count * n)))
        elif isinstance(count, int) and not isinstance(count, bool) and count >= 1:
            c = min(count, n)
        else:
            raise ValueError(f"candidate count must be a positive int or a fraction, got {count!r}")
        sims = self.similarities(queries)
        part = np.argpartition(-sims, c - 1, axis=1)[:, :c] if c < n else np.tile(np.arange(n), (len(sims), 1))
        order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1, kind="stable")
        return torch.from_numpy(np.take_along_axis(part, order, axis=1).astype(np.int64))
