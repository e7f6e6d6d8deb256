"""Influence functions on the factor store: fit curvature once, then score training examples against queries.

Score convention::

    score[q, j] = grad f(q)^T (C + damping I)^-1 grad L(z_j)

summed over the tracked layers (``C`` is block-diagonal by layer), with ``f`` the task's measurement and ``L`` its
per-example training loss. Positive: upweighting ``z_j`` lowers ``f(q)`` (helpful). Gradients are per-example
(``d loss_n / d W``, see :mod:`kfac.influence.gradients`), in the ``(g_dim, a_dim)`` layout of each layer.

Methods (``C`` per layer):

* ``"ekfac"``: ``(QA (x) QG) diag(Lambda) (QA (x) QG)^T`` with ``A = mean a a^T`` and ``G = mean g g^T`` over all
  rows of the fitted data (plain averages: no decay, no identity initialisation; ``G`` from per-example gradients
  of the loss -- on labels sampled from the model for ``fisher="mc"``, the default), and
  ``Lambda = mean_n (QG^T V_n QA)^2`` from per-example gradients ``V_n`` of the loss with the data's own labels;
* ``"kfac"``: the same basis with ``Lambda = T * outer(dG, dA)`` (``T`` rows per example: the K-FAC estimate of the
  per-example Fisher, ``E_n[vec V_n vec V_n^T] ~ T A (x) G`` for independent rows; ``T = 1`` for MLPs);
* ``"mfac"``: M-FAC's static Fisher ``(1/m) sum_i g_i g_i^T`` over the first ``m`` training examples' gradients
  (all tracked layers jointly, see :class:`kfac.mfac.fisher.StaticFisher`);
* ``"identity"``: ``C + damping I = I``: plain gradient dot products.

Damping: a float is used as is for every layer; ``None`` (default) is ``0.1 * mean(Lambda)`` per layer for
"ekfac"/"kfac", and ``0.1 * mean(g^2)`` (the mean diagonal of the empirical Fisher) for "mfac".

Solver (queries only): ``"direct"`` (default) applies ``(C + damping I)^-1``; ``"ggn"`` and ``"hessian"`` refine it
towards the exact ``(K + damping I)^-1 grad f(q)``, ``K`` the Gauss-Newton matrix or the Hessian of the mean
training loss over the fitted data, by conjugate gradients preconditioned with ``(C + damping I)^-1``
(:mod:`kfac.influence.solver`; ``solver_iterations`` passes over the data at most, ``solver_tolerance`` on the
relative residual).
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn
from torch.utils.data import default_collate

from ..distributed.comm import Communicator
from ..kronecker.methods import EigenCorrectedKFAC
from ..kronecker.preconditioner import KFACPreconditioner
from ..kronecker.store import FactorStore
from ..modules import GroupedConvAdapter, ModuleAdapter, NormAdapter, TiedEmbeddingAdapter
from ..modules.loose import LooseAdapter
from ..tracking import summarize
from ..mfac.static import StaticFisher
from . import persistence, scoring
from .arguments import METHODS, InfluenceArguments  # noqa: F401 (METHODS: re-exported)
from .fitting import Fit, collect_mfac_gradients, fit_factors, mfac_curvature
from .passes import DataPasses, eval_mode
from .persistence import weights_digest
from .index import MANIFEST, GradientIndex, add_examples, project_queries
from .scoring import TopK
from .solver import conjugate_gradients
from .task import Task

__all__ = ["GradientIndex", "InfluenceAnalyzer", "InfluenceArguments", "TopK", "weights_digest"]

logger = logging.getLogger("kfac")


class InfluenceAnalyzer:
    """Fit curvature on training data, then compute influence scores (see the module docstring).

    Args:
        model: the trained model (put in eval mode while fitting and scoring; restored afterwards).
        task: a :class:`kfac.influence.Task`.
        arguments: the settings (:class:`InfluenceArguments`; default: its defaults). The analyzer keeps a
            validated copy as :attr:`args`.
        progress: tqdm progress bars (rank 0 only).
        process_group: under ``torchrun``, fitting and scoring are split by batch (batch ``i`` on rank
            ``i % world_size``; loaders must yield the same batches in the same order on every rank) and the
            decompositions by the planner; results equal a single process.
        **options: :class:`InfluenceArguments` fields overriding ``arguments`` (``method``, ``fisher``,
            ``damping``, ``tracked_modules``, ``num_grads``, ``query_rank``, ``score_dtype``, ``factor_dtype``,
            ``seed``; dtypes as ``torch.dtype`` or names); other names raise ``TypeError``.

    Modules with parameters that are not tracked are listed in :attr:`skipped`. Construction warns (one
    ``UserWarning``) about those whose trainable parameters are left out against the user's choice: unsupported
    layer types, parameters shared with another layer, partly frozen layers. It does not warn about modules left
    out of ``tracked_modules`` (the user's choice: listing layers there also silences the warning), embeddings
    (never tracked, by design) or modules whose parameters are all frozen (not trained, so not part of the
    influence of training data).

    Batches with no examples contribute nothing: they yield 0-sized blocks of scores, and those that visibly hold
    no rows (every batched tensor in a tuple/list/mapping batch has 0 rows) are dropped before batches are
    numbered, so they change neither the distributed split nor ``fisher="mc"``'s sampled labels.
    """

    def __init__(self, model: nn.Module, task: Task, arguments: InfluenceArguments | None = None, *,
                 progress: bool = True, process_group: Any | None = None, **options: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(task, Task):
            raise TypeError(f"task must be a kfac.influence.Task, got {type(task).__name__}")
        self.args = InfluenceArguments.with_options(arguments, options)
        self.model, self.task, self.progress = model, task, progress
        self._pre = self._engine(process_group)
        self._skipped = self._report_skipped()
        self._fit: Fit | None = None
        self._mfac: StaticFisher | None = None
        self._mfac_grads: dict[str, Tensor] | None = None
        self._method = EigenCorrectedKFAC()
        self._curvature_data: Iterable[Any] | None = None
        # what the last CG solve (solver "ggn" / "hessian") did: iterations, relative_residual per query,
        # stopped_negative
        self.solver_info: dict[str, Any] = {}

    # -- set-up --------------------------------------------------------------------------------------------
    def _engine(self, process_group: Any | None) -> KFACPreconditioner:
        """The K-FAC preconditioner as a factor engine: tracked layers, the store, the plan and the collectives
        (its own statistics hooks are removed: the analyzer collects per-example statistics in eval mode)."""
        wanted: set[str] | None = None
        if self.args.tracked_modules is not None:
            wanted = set(self.args.tracked_modules)
            known = {n for n, _ in self.model.named_modules()}
            unknown = sorted(wanted - known)
            if unknown:
                raise ValueError(f"tracked_modules: no module named {unknown} in the model")
        comm = Communicator(group=process_group)
        strategy = "comm-opt" if comm.world_size > 1 else None
        pre = KFACPreconditioner(self.model, method="eigen", factor_decay=0.0, kl_clip=None,
                                 factor_dtype=getattr(torch, self.args.factor_dtype), strategy=strategy,
                                 process_group=process_group, hooks=False)
        if wanted is not None:  # untracked one by one: a listed layer is found wherever its parent is
            drop = [n for n in pre.layers if n not in wanted]
            if len(drop) < len(pre.layers):  # (none left: the check below names what cannot be tracked)
                pre.untrack(drop, "not listed in tracked_modules")
        without = {n: a for n, a in pre.adapters.items() if not a.per_example}
        if without and len(without) < len(pre.layers):
            for name, adapter in without.items():
                pre.untrack([name], not_per_example(adapter))
        diagonal = [n for n, a in pre.adapters.items() if a.a_diagonal]
        if diagonal and len(diagonal) < len(pre.layers):
            pre.untrack(diagonal, "influence does not track embeddings (per-example gradients are dim x vocab)")
        elif diagonal:
            raise ValueError(f"influence: no supported layer to track (embeddings {diagonal} are not tracked: their "
                             "per-example gradients are dim x vocab)")
        if self.args.tracked_modules is not None:
            missing = sorted(set(self.args.tracked_modules) - set(pre.layers))
            if missing:
                reasons = dict(pre.skipped)
                raise ValueError("tracked_modules: cannot track " + ", ".join(
                    f"{n!r} ({reasons.get(n, 'no supported parameters')})" for n in missing))
        if not pre.layers:
            raise ValueError("influence: no supported layer to track")
        return pre

    def _report_skipped(self) -> list[tuple[str, str]]:
        """``(name, reason)`` of every untracked module with parameters of its own; warns about those whose
        trainable parameters are left out for reasons other than the user's choice (see the class docstring)."""
        wanted = None if self.args.tracked_modules is None else set(self.args.tracked_modules)
        modules = {n: m for n, m in self.model.named_modules() if any(True for _ in m.parameters(recurse=False))}
        reasons: dict[str, str] = {}
        for name, reason in self._pre.skipped:
            reasons.setdefault(name, "not listed in tracked_modules" if wanted is not None and name not in wanted
                               else reason)
        tracked = set(self.layers)
        for name, reason in reasons.items():  # a head tied to an embedding influence does not track either
            owner = reason.partition("tied to ")[2].partition("'")[2].partition("'")[0]
            if reason.startswith("tied to ") and owner not in tracked:
                reasons[name] = f"shares its weight with {owner!r}, which influence does not track either"
        skipped = {n: reasons.get(n, "not tracked") for n in modules if n not in tracked}  # in model order
        unexpected = [(n, r) for n, r in skipped.items()
                      if (wanted is None or n in wanted) and not isinstance(modules[n], nn.Embedding)
                      and any(p.requires_grad for p in modules[n].parameters(recurse=False))]
        if unexpected:
            warnings.warn(f"influence: {len(unexpected)} module(s) not tracked: their parameters get no influence "
                          "(scores cover the tracked layers only; tracked_modules chooses the layers):\n"
                          + summarize(unexpected), UserWarning, stacklevel=3)
        return list(skipped.items())

    def _passes(self) -> DataPasses:
        """Batches and per-example rows under the current settings."""
        return DataPasses(self.model, self.task, self._pre, seed=self.args.seed,
                          dtype=getattr(torch, self.args.factor_dtype), progress=self.progress)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """``(module name, reason)`` for every module with parameters of its own that is not tracked (a copy)."""
        return list(self._skipped)

    @property
    def layers(self) -> list[str]:
        """The tracked module names."""
        return self._pre.layers

    @property
    def bytes_communicated(self) -> dict[str, int]:
        """This rank's share of the bytes fitting and scoring put on the wire, by category."""
        return self._pre.bytes_communicated

    @property
    def store(self) -> FactorStore:
        """The factor store (factors, eigenbases and ``Lambda`` of "ekfac"/"kfac" after :meth:`fit`)."""
        return self._pre.store

    @property
    def damping(self) -> dict[str, float]:
        """The damping of each layer (after :meth:`fit`)."""
        return dict(self._require_fit().damping)

    def _require_fit(self) -> Fit:
        if self._fit is None:
            raise RuntimeError("InfluenceAnalyzer: call fit(train_loader) (or load()) first")
        return self._fit

    # -- fitting -------------------------------------------------------------------------------------------
    def fit(self, train_loader: Iterable[Any]) -> InfluenceAnalyzer:
        """Fit the curvature (factors, eigenbases and ``Lambda``; or M-FAC's gradients) on ``train_loader``."""
        with eval_mode(self.model):
            if self.args.method in ("ekfac", "kfac"):
                self._fit = fit_factors(self._passes(), self._pre, self.args, self._method, train_loader)
            elif self.args.method == "mfac":
                self._set_mfac(collect_mfac_gradients(self._passes(), self.args, train_loader))
            else:
                self._fit = Fit(damping=dict.fromkeys(self.layers, self.args.damping or 1.0))  # D of a CG solve
        self._curvature_data = train_loader
        self._require_fit().weights_sha256 = weights_digest(self.model)
        return self

    def _set_mfac(self, grads: dict[str, Tensor]) -> None:
        self._mfac_grads = grads
        self._mfac, self._fit = mfac_curvature(grads, self.args.damping)

    # -- scores --------------------------------------------------------------------------------------------
    def _precondition(self, mats: dict[str, Tensor]) -> dict[str, Tensor]:
        """``(C + damping I)^-1`` applied to per-example gradient matrices ``{layer: (n, g_dim, a_dim)}``."""
        fit = self._require_fit()
        return scoring.precondition(mats, method=self.args.method, damping=fit.damping, store=self.store,
                                    kfac=self._method, mfac=self._mfac)

    def _queries(self, passes: DataPasses, query_loader: Iterable[Any], dtype: torch.dtype) -> dict[str, Any]:
        """The preconditioned query gradients of one scoring call (``solver_info`` then describes this call)."""
        self.solver_info = {}
        return scoring.query_gradients(passes, query_loader, self._query_inverse, dtype=dtype,
                                       query_rank=self.args.query_rank)

    def _query_inverse(self, mats: dict[str, Tensor]) -> dict[str, Tensor]:
        """The query gradients' inverse-curvature products: :meth:`_precondition` (``solver="direct"``) or
        conjugate gradients on the damped exact curvature of the fitted data, preconditioned by it."""
        if self.args.solver == "direct":
            return self._precondition(mats)
        if self._curvature_data is None:
            raise RuntimeError(f"influence: solver={self.args.solver!r} needs the training data: call "
                               "fit(train_loader) or, after load(), use_curvature_data(train_loader)")
        x, info = conjugate_gradients(
            self._passes(), self._curvature_data, mats, curvature=self.args.solver, inverse=self._precondition,
            damping=self._require_fit().damping, iterations=self.args.solver_iterations,
            tolerance=self.args.solver_tolerance)
        last = self.solver_info  # one solve per batch of queries: reported together
        if last:
            info = {"iterations": max(info["iterations"], last["iterations"]),
                    "relative_residual": torch.cat([last["relative_residual"], info["relative_residual"]]),
                    "stopped_negative": last["stopped_negative"] + info["stopped_negative"]}
        self.solver_info = info
        return x

    def use_curvature_data(self, train_loader: Iterable[Any]) -> InfluenceAnalyzer:
        """The (re-iterable) training batches whose mean-loss curvature ``solver="ggn"`` / ``"hessian"`` solves
        with; :meth:`fit` sets them to its own."""
        self._curvature_data = train_loader
        return self

    @overload
    def pairwise_scores(self, query_loader: Iterable[Any], train_loader: Iterable[Any], *,
                        per_layer: Literal[False] = ...) -> Tensor: ...
    @overload
    def pairwise_scores(self, query_loader: Iterable[Any], train_loader: Iterable[Any], *,
                        per_layer: Literal[True]) -> dict[str, Tensor]: ...
    @overload
    def pairwise_scores(self, query_loader: Iterable[Any], train_loader: Iterable[Any], *,
                        per_layer: bool) -> Tensor | dict[str, Tensor]: ...

    def pairwise_scores(self, query_loader: Iterable[Any], train_loader: Iterable[Any], *,
                        per_layer: bool = False) -> Tensor | dict[str, Tensor]:
        """``[n_query, n_train]`` scores (or ``{layer: scores}`` with ``per_layer``); training gradients are
        streamed, never stored. ``train_loader`` may be a :class:`GradientIndex` of the training set (built by
        :meth:`build_index`): the scores then come from its stored projections (exact where it does not project)."""
        dtype = getattr(torch, self.args.score_dtype)
        if isinstance(train_loader, GradientIndex):
            if per_layer:
                raise ValueError("influence: per_layer scores are not kept by a gradient index (it stores the layers "
                                 "concatenated); score the training loader instead")
            return train_loader.scores(self._indexed_queries(query_loader, train_loader))
        with eval_mode(self.model):
            passes = self._passes()
            queries = self._queries(passes, query_loader, dtype)
            self._log_memory(queries)
            blocks: scoring.Blocks = []
            for i, batch in passes.batches(train_loader, "scoring"):
                blocks.append((i, scoring.score_batch(queries, passes.rows(batch, sampled=False), self.layers,
                                                      dtype)))
        return scoring.assemble(blocks, self.layers, self._pre.communicator, per_layer=per_layer, axis=1)

    def per_token_scores(self, query_loader: Iterable[Any], train_loader: Iterable[Any], *,
                         per_layer: bool = False) -> Tensor | dict[str, Tensor]:
        """``[n_query, n_train, T]``: :meth:`pairwise_scores` split over each training example's token positions
        (the rows ``t`` of ``V_n = sum_t g_nt a_nt^T``; summing over ``T`` gives the pairwise scores). Every tracked
        layer must see the same positions per example; batches of different lengths are zero-padded to the
        longest. With a mask in the task, padded positions carry no gradient and score zero."""
        dtype = getattr(torch, self.args.score_dtype)
        with eval_mode(self.model):
            passes = self._passes()
            queries = self._queries(passes, query_loader, dtype)
            blocks: scoring.Blocks = []
            for i, batch in passes.batches(train_loader, "per-token scoring"):
                blocks.append((i, scoring.token_score_batch(queries, passes.rows(batch, sampled=False), self.layers,
                                                            dtype)))
        return scoring.assemble(blocks, self.layers, self._pre.communicator, per_layer=per_layer, axis=1)

    @overload
    def self_scores(self, train_loader: Iterable[Any], *, per_layer: Literal[False] = ...) -> Tensor: ...
    @overload
    def self_scores(self, train_loader: Iterable[Any], *, per_layer: Literal[True]) -> dict[str, Tensor]: ...
    @overload
    def self_scores(self, train_loader: Iterable[Any], *, per_layer: bool) -> Tensor | dict[str, Tensor]: ...

    def self_scores(self, train_loader: Iterable[Any], *, per_layer: bool = False) -> Tensor | dict[str, Tensor]:
        """``[n_train]``: ``grad L(z)^T (C + damping I)^-1 grad L(z)`` for every training example."""
        dtype = getattr(torch, self.args.score_dtype)
        with eval_mode(self.model):
            passes = self._passes()
            blocks: scoring.Blocks = []
            for i, batch in passes.batches(train_loader, "self-influence"):
                blocks.append((i, scoring.self_score_batch(passes.rows(batch, sampled=False), self.layers,
                                                           self._precondition, dtype)))
        return scoring.assemble(blocks, self.layers, self._pre.communicator, per_layer=per_layer, axis=0)

    def top_k(self, query_loader: Iterable[Any], train_loader: Iterable[Any], *, k: int = 10,
              candidates: Tensor | None = None, batch_size: int = 32,
              collate_fn: Callable[[list[Any]], Any] | None = None) -> TopK:
        """The ``k`` most helpful training examples per query (largest scores; ``-scores`` for the most harmful).

        ``train_loader``: batches of the training set; or a :class:`GradientIndex` of it (:meth:`build_index`:
        one matrix product per shard, a running top-k, no pass over the data); or, with ``candidates``, the
        training *dataset* itself (indexable). ``candidates`` (``[n_query, c]`` training positions, e.g. from
        :class:`kfac.influence.candidates.TextCandidates`) makes the query two-stage: only the union of the
        candidates is scored (batched ``batch_size`` at a time with ``collate_fn``, default
        ``torch.utils.data.default_collate``), each query among its own candidates; indices are positions in the
        training set either way."""
        if isinstance(train_loader, GradientIndex):
            return train_loader.top_k(self._indexed_queries(query_loader, train_loader), k)
        if candidates is not None:
            return self._top_k_among(query_loader, train_loader, candidates, k, batch_size, collate_fn)
        scores = self.pairwise_scores(query_loader, train_loader)
        k = min(k, scores.shape[1])
        values, indices = torch.topk(scores, k, dim=1)
        return TopK(indices=indices, scores=values)

    def _top_k_among(self, query_loader: Iterable[Any], dataset: Any, candidates: Tensor, k: int, batch_size: int,
                     collate_fn: Callable[[list[Any]], Any] | None) -> TopK:
        """Stage two of a two-stage query: score the union of ``candidates`` and keep each query's own."""
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise TypeError("influence: with candidates, pass the training dataset (indexable: dataset[i]), not a "
                            f"loader; got {type(dataset).__name__}")
        candidates = torch.as_tensor(candidates, dtype=torch.int64)
        if candidates.dim() != 2 or (candidates.numel() and not 0 <= int(candidates.min()) <= int(candidates.max())
                                     < len(dataset)):
            raise ValueError(f"influence: candidates must be [n_query, c] positions in the training set of "
                             f"{len(dataset)} examples")
        union = torch.unique(candidates)
        collate = collate_fn if collate_fn is not None else default_collate
        batches = [collate([dataset[int(i)] for i in union[s:s + batch_size]]) for s in range(0, len(union), batch_size)]
        scores = self.pairwise_scores(query_loader, batches)  # [n_query, len(union)]
        if scores.shape[0] != candidates.shape[0]:
            raise ValueError(f"influence: {candidates.shape[0]} candidate rows for {scores.shape[0]} queries")
        columns = torch.searchsorted(union, candidates.contiguous())  # each query's candidates among the scored union
        own = torch.gather(scores, 1, columns)
        values, pick = torch.topk(own, min(k, own.shape[1]), dim=1)
        return TopK(indices=torch.gather(candidates, 1, pick), scores=values)

    # -- gradient index ------------------------------------------------------------------------------------
    def build_index(self, path: str | Path, train_loader: Iterable[Any], *, dims: int | Mapping[str, Any] = 32,
                    seed: int = 0, dtype: torch.dtype = torch.float16) -> GradientIndex:
        """Compute every training example's gradient once and store its projection in a new
        :class:`GradientIndex` at ``path`` (see :mod:`kfac.influence.index`): ``dims`` is the projection size
        ``k`` of both sides of every layer (or ``{layer: k or (k_g, k_a)}``; ``k >= dim``: that side is kept
        exactly). The index belongs to the model's current weights (their digest is recorded and checked), not
        to a fit: any method's queries use it. Add more training data later with :meth:`add_to_index`."""
        fit, comm = self._require_fit(), self._pre.communicator
        shapes = self._pre.block_shapes()
        fresh = comm.all_true(not (Path(path) / MANIFEST).exists())  # every rank raises, or none
        index = GradientIndex.create(path, shapes={n: (shapes[n][0], shapes[n][1]) for n in self.layers}, dims=dims,
                                     seed=seed, dtype=dtype, weights_sha256=fit.weights_sha256 or
                                     weights_digest(self.model), task=type(self.task).__name__,
                                     write=comm.rank == 0, fresh=fresh)
        return self.add_to_index(index, train_loader)

    def add_to_index(self, index: GradientIndex, train_loader: Iterable[Any]) -> GradientIndex:
        """Append ``train_loader``'s examples to ``index`` (their positions continue after the index's last)."""
        self._check_index(index)
        with eval_mode(self.model):
            add_examples(index, self._passes(), train_loader, self._pre.communicator,
                         getattr(torch, self.args.score_dtype))
        return index

    def _check_index(self, index: GradientIndex) -> None:
        digest = self._require_fit().weights_sha256 or weights_digest(self.model)
        if index.manifest["weights_sha256"] != digest:
            raise ValueError(f"influence: the gradient index in {index.path} was built from other weights than "
                             "this model's (weights digests differ); rebuild it")
        if [layer.name for layer in index.layers] != self.layers:
            raise ValueError(f"influence: the gradient index covers layers {[layer.name for layer in index.layers]}, "
                             f"this analyzer tracks {self.layers}")

    def _indexed_queries(self, query_loader: Iterable[Any], index: GradientIndex) -> dict[str, Tensor]:
        self._check_index(index)
        dtype = getattr(torch, self.args.score_dtype)
        with eval_mode(self.model):
            queries = self._queries(self._passes(), query_loader, dtype)
        return project_queries(queries, index.projections, dtype)

    def memory_estimate(self, num_queries: int, batch_size: int) -> dict[str, int]:
        """Bytes needed for scoring: the fitted state, the preconditioned queries, one training batch's
        per-example gradients."""
        size = getattr(torch, self.args.score_dtype).itemsize
        dims = [(self.store[n].g_dim, self.store[n].a_dim) for n in self.layers]
        r = self.args.query_rank
        per_query = sum(g * a if r is None else (g + a) * min(r, g, a) for g, a in dims) * size
        mfac = 0
        if self._mfac is not None and self._mfac_grads is not None:  # B^T, and the gradients for save()
            mfac = self._mfac.nbytes + sum(t.numel() * t.element_size() for t in self._mfac_grads.values())
        return {"fitted": self.store.nbytes() + mfac,
                "queries": num_queries * per_query,
                "train_batch": batch_size * sum(g * a for g, a in dims) * size}

    def _log_memory(self, queries: Mapping[str, Any]) -> None:
        n = next(iter(queries.values()))
        n = (n[0] if isinstance(n, tuple) else n).shape[0]
        est = self.memory_estimate(n, 1)
        logger.info("influence: %d preconditioned queries hold %.1f MiB; each training example's gradients take "
                    "%.2f MiB while its batch is scored", n, est["queries"] / 2**20, est["train_batch"] / 2**20)

    # -- persistence ---------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the fitted state to directory ``path`` (rank 0 only): factors or M-FAC's gradients (safetensors)
        + settings (JSON, with the :func:`weights_digest` of the model when it was fitted, checked by
        :meth:`load`)."""
        fit = self._require_fit()
        if self._pre.communicator.rank != 0:
            return
        shapes = self._pre.block_shapes()
        persistence.save_fit(path, args=self.args, fit=fit, shapes={n: shapes[n] for n in self.layers},
                             store=self.store if self.args.method in ("ekfac", "kfac") else None,
                             mfac_grads=self._mfac_grads)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, task: Task, *, progress: bool = True,
             process_group: Any | None = None, check_weights: bool = True) -> InfluenceAnalyzer:
        """Rebuild an analyzer saved by :meth:`save` for ``model``; clear errors if it does not match.

        ``check_weights``: raise ``ValueError`` if ``model``'s parameters are not the ones the fit was made on (by
        :func:`weights_digest`; files saved without a digest load with a logged warning). ``False`` skips the
        check (the scores then mix the saved curvature with gradients of other weights)."""
        path = Path(path)
        settings = persistence.read_settings(path)
        analyzer = cls(model, task, persistence.saved_arguments(settings), progress=progress,
                       process_group=process_group)
        persistence.check_saved(settings, path, analyzer._pre.block_shapes(), model, check_weights=check_weights)
        if analyzer.args.method in ("ekfac", "kfac"):
            persistence.load_factors(path, analyzer.store)
        elif analyzer.args.method == "mfac":
            analyzer._set_mfac(persistence.load_mfac_gradients(path, analyzer.layers))
        analyzer._fit = persistence.saved_fit(settings)
        return analyzer


def not_per_example(adapter: ModuleAdapter) -> str:
    """Why influence does not track a layer whose per-example gradients lack the ``V_n = sum_t g_t a_t^T`` form
    that its scores project (one short reason per kind of block)."""
    if isinstance(adapter, TiedEmbeddingAdapter):
        return ("embedding tied to an output layer: the shared matrix's per-example gradient adds a vocab x dim "
                "scatter to the head's V_n, which has no Kronecker form to project")
    if isinstance(adapter, NormAdapter):
        return "normalisation layer: a diagonal block of per-example gradients, not the V_n = sum_t g a^T form"
    if isinstance(adapter, LooseAdapter):
        return f"{adapter.describe()}: a diagonal block of per-example gradients, not the V_n = sum_t g a^T form"
    if isinstance(adapter, GroupedConvAdapter):
        return "grouped convolution: one block per group with a shared A, not the V_n = sum_t g a^T form"
    return f"{type(adapter).__name__}: no per-example gradients of the V_n = sum_t g a^T form"
