"""Stage one of a two-stage influence query (Grosse et al., 2023): a TF-IDF index over the training sequences picks,
per query, the candidates that EK-FAC then scores (:meth:`kfac.influence.InfluenceAnalyzer.top_k` with
``candidates=``); the rest of the corpus is never differentiated.

Documents are strings (words, scikit-learn's default tokenisation) or token-id sequences (each id a term). Terms
are unigrams and bigrams by default, weighted by sublinear TF times smoothed IDF, rows L2-normalised; a query's
candidates are the documents of highest cosine similarity. scikit-learn's ``TfidfVectorizer`` does the work (a
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
        ngram_range: the n-grams used as terms.
        **options: further ``sklearn.feature_extraction.text.TfidfVectorizer`` options (e.g. ``min_df``,
            ``max_features``, ``stop_words`` for strings).
    """

    def __init__(self, documents: Sequence[Document], *, ngram_range: tuple[int, int] = (1, 2),
                 **options: Any) -> None:
        try:
            from sklearn.feature_extraction.text import TfidfVectorizer
        except ImportError:
            raise ImportError("TextCandidates needs scikit-learn (pip install scikit-learn)") from None
        if len(documents) == 0:
            raise ValueError("TextCandidates: no documents")
        self.tokens = not isinstance(documents[0], str)
        settings: dict[str, Any] = {"ngram_range": ngram_range, "sublinear_tf": True, **options}
        if self.tokens:  # token ids: each id is a term, whitespace-separated in its own text form
            settings.update(token_pattern=r"\S+", lowercase=False)
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
