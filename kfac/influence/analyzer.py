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
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import __version__, ext
from ..distributed.comm import Communicator
from ..kronecker.methods import EigenCorrectedKFAC
from ..mfac.fisher import StaticFisher
from ..kronecker.preconditioner import KFACPreconditioner
from ..kronecker.store import FactorFileError, FactorStore
from .gradients import capture, example_matrices
from .task import Task

__all__ = ["InfluenceAnalyzer", "InfluenceArguments", "TopK", "weights_digest"]

logger = logging.getLogger("kfac")

METHODS = ("ekfac", "kfac", "mfac", "identity")
_SETTINGS_FILE = "influence.json"
_FACTORS_FILE = "factors.safetensors"
_MFAC_FILE = "mfac_gradients.safetensors"


@dataclass
class InfluenceArguments:
    """Settings of an :class:`InfluenceAnalyzer` (saved with the fitted factors)."""

    method: str = "ekfac"
    fisher: str = "mc"
    damping: float | None = None
    tracked_modules: list[str] | None = None
    num_grads: int = 256
    factor_dtype: str = "float32"
    score_dtype: str = "float32"
    query_rank: int | None = None
    seed: int = 0

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.fisher not in ("mc", "empirical"):
            raise ValueError(f"fisher must be 'mc' or 'empirical', got {self.fisher!r}")
        if self.damping is not None and not (isinstance(self.damping, (int, float)) and self.damping > 0
                                             and math.isfinite(self.damping)):
            raise ValueError(f"damping must be None or a finite positive number, got {self.damping!r}")
        if self.query_rank is not None and (not isinstance(self.query_rank, int) or self.query_rank < 1):
            raise ValueError(f"query_rank must be None or a positive integer, got {self.query_rank!r}")
        if not isinstance(self.num_grads, int) or self.num_grads < 1:
            raise ValueError(f"num_grads must be a positive integer, got {self.num_grads!r}")
        for name in ("factor_dtype", "score_dtype"):
            dtype = getattr(torch, getattr(self, name), None)
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise ValueError(f"{name} must name a floating point torch dtype, got {getattr(self, name)!r}")


@dataclass
class TopK:
    """The ``k`` highest scores per query: ``indices[q]`` (training-set positions) and ``scores[q]``."""

    indices: Tensor
    scores: Tensor


@dataclass
class _Fit:
    damping: dict[str, float] = field(default_factory=dict)
    rows_per_example: dict[str, float] = field(default_factory=dict)
    examples: int = 0
    weights_sha256: str | None = None  # of the model's parameters when fitted (None: unknown, an old file)


class InfluenceAnalyzer:
    """Fit curvature on training data, then compute influence scores (see the module docstring).

    Args:
        model: the trained model (put in eval mode while fitting and scoring; restored afterwards).
        task: a :class:`kfac.influence.Task`.
        method, fisher, damping, tracked_modules, num_grads, query_rank, score_dtype, factor_dtype, seed: see
            :class:`InfluenceArguments` (dtypes as ``torch.dtype`` or names). ``tracked_modules``: module names
            (default: every supported layer; embeddings are never tracked).
        progress: tqdm progress bars (rank 0 only).
        process_group: under ``torchrun``, fitting and scoring are split by batch (batch ``i`` on rank
            ``i % world_size``; loaders must yield the same batches in the same order on every rank) and the
            decompositions by the planner; results equal a single process.

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

    def __init__(self, model: nn.Module, task: Task, *, method: str = "ekfac", fisher: str = "mc",
                 damping: float | None = None, tracked_modules: Iterable[str] | None = None, num_grads: int = 256,
                 query_rank: int | None = None, score_dtype: torch.dtype | str = torch.float32,
                 factor_dtype: torch.dtype | str = torch.float32, seed: int = 0, progress: bool = True,
                 process_group: Any | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(task, Task):
            raise TypeError(f"task must be a kfac.influence.Task, got {type(task).__name__}")
        self.args = InfluenceArguments(
            method=method, fisher=fisher, damping=damping,
            tracked_modules=None if tracked_modules is None else list(tracked_modules), num_grads=num_grads,
            factor_dtype=_dtype_name(factor_dtype), score_dtype=_dtype_name(score_dtype), query_rank=query_rank,
            seed=seed)
        self.args.validate()
        self.model, self.task, self.progress = model, task, progress
        self._pre = self._engine(process_group)
        self._skipped = self._report_skipped()
        self._fit: _Fit | None = None
        self._mfac: StaticFisher | None = None
        self._mfac_grads: dict[str, Tensor] | None = None
        self._method = EigenCorrectedKFAC()

    # -- set-up --------------------------------------------------------------------------------------------
    def _engine(self, process_group: Any | None) -> KFACPreconditioner:
        """The K-FAC preconditioner as a factor engine: tracked layers, the store, the plan and the collectives
        (its own statistics hooks are removed: the analyzer collects per-example statistics in eval mode)."""
        skip: list[str] = []
        if self.args.tracked_modules is not None:
            wanted = set(self.args.tracked_modules)
            known = {n for n, _ in self.model.named_modules()}
            unknown = sorted(wanted - known)
            if unknown:
                raise ValueError(f"tracked_modules: no module named {unknown} in the model")
            skip = [re.escape(n) for n, m in self.model.named_modules()
                    if n and n not in wanted and any(True for _ in m.parameters(recurse=False))]
        comm = Communicator(group=process_group)
        strategy = "comm-opt" if comm.world_size > 1 else None
        pre = KFACPreconditioner(self.model, method="eigen", factor_decay=0.0, kl_clip=None, skip_layers=skip,
                                 factor_dtype=getattr(torch, self.args.factor_dtype), strategy=strategy,
                                 process_group=process_group, hooks=False)
        diagonal = [n for n, a in pre.adapters.items() if a.a_diagonal]
        if diagonal:
            pre.untrack(diagonal, "influence does not track embeddings (per-example gradients are dim x vocab)")
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
        skipped = {n: reasons.get(n, "not tracked") for n in modules if n not in tracked}  # in model order
        unexpected = [(n, r) for n, r in skipped.items()
                      if (wanted is None or n in wanted) and not isinstance(modules[n], nn.Embedding)
                      and any(p.requires_grad for p in modules[n].parameters(recurse=False))]
        if unexpected:
            warnings.warn("influence: not tracking " + ", ".join(f"{n or '<root>'!r} ({r})" for n, r in unexpected)
                          + ": their parameters get no influence (scores cover the tracked layers only); pass "
                          "tracked_modules to choose the layers explicitly", UserWarning, stacklevel=3)
        return list(skipped.items())

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """``(module name, reason)`` for every module with parameters of its own that is not tracked (a copy)."""
        return list(self._skipped)

    @property
    def layers(self) -> list[str]:
        """The tracked module names."""
        return self._pre.layers

    @property
    def store(self) -> FactorStore:
        return self._pre.store

    @property
    def damping(self) -> dict[str, float]:
        """The damping of each layer (after :meth:`fit`)."""
        return dict(self._require_fit().damping)

    def _require_fit(self) -> _Fit:
        if self._fit is None:
            raise RuntimeError("InfluenceAnalyzer: call fit(train_loader) (or load()) first")
        return self._fit

    # -- fitting -------------------------------------------------------------------------------------------
    def fit(self, train_loader: Iterable[Any]) -> "InfluenceAnalyzer":
        """Fit the curvature (factors, eigenbases and ``Lambda``; or M-FAC's gradients) on ``train_loader``."""
        with _eval(self.model):
            if self.args.method in ("ekfac", "kfac"):
                self._fit_factors(train_loader)
            elif self.args.method == "mfac":
                self._fit_mfac(train_loader)
            else:
                self._fit = _Fit(damping={n: 1.0 for n in self.layers})
        self._fit.weights_sha256 = weights_digest(self.model)
        return self

    def _batches(self, loader: Iterable[Any], what: str, *, shard: bool = True) -> Iterable[tuple[int, Any]]:
        """``(index, batch)`` of this rank's batches. Batches of no examples (see :func:`_is_empty`) are dropped
        before numbering, so they change neither the sharding nor the sampled labels of the other batches."""
        comm = self._pre._comm
        items = ((i, b) for i, b in enumerate(b for b in loader if not _is_empty(b))
                 if not shard or i % comm.world_size == comm.rank)
        return _progress(items, f"influence: {what}", total=_len(loader), enabled=self.progress and comm.rank == 0)

    def _backward(self, batch: Any, *, sampled: bool, measurement: bool = False, index: int = 0,
                  ) -> dict[str, tuple[Tensor, Tensor]]:
        """Per-example rows of one batch (``loss.sum()`` backward through the tracked layers only). Sampled labels
        come from a generator seeded by ``(seed, batch index)``: the same on any rank that processes the batch."""
        dtype = getattr(torch, self.args.factor_dtype)
        with capture(self._pre.adapters, dtype) as cap:
            if measurement:
                values = self.task.measurement(self.model, batch)
            elif sampled:
                generator = torch.Generator().manual_seed(self.args.seed * 1_000_003 + index)
                values = self.task.sampled_loss(self.model, batch, generator=generator)
            else:
                values = self.task.loss(self.model, batch)
            if not isinstance(values, Tensor) or values.dim() != 1:
                what = "measurement" if measurement else "loss"
                shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
                raise ValueError(f"Task.{what}() must return one value per example (shape [B]), got {shape}")
            weights = [p for params in self._pre.parameters_of().values() for p in params]
            torch.autograd.grad(values.sum(), weights, allow_unused=True)
        rows = cap.rows
        missing = [n for n in self.layers if n not in rows]
        if missing:
            raise RuntimeError(f"influence: tracked layers {missing} received no gradient from the task's "
                               f"{'measurement' if measurement else 'loss'}")
        return rows

    def _device(self) -> torch.device:
        """Where fitting sums live (and, distributed, travel): the model's device."""
        return next((p.device for p in self.model.parameters()), torch.device("cpu"))

    def _fit_factors(self, loader: Iterable[Any]) -> None:
        comm, store = self._pre._comm, self._pre.store
        sums: dict[str, list[Tensor]] = {}
        device = self._device()
        counts = [[0, 0] for _ in self.layers]  # rows, examples
        for index, batch in self._batches(loader, "fitting factors"):
            rows = self._backward(batch, sampled=self.args.fisher == "mc", index=index)
            for i, name in enumerate(self.layers):
                a, g = rows[name]
                a2, g2 = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
                s = sums.setdefault(name, [a.new_zeros(a.shape[-1], a.shape[-1]), g.new_zeros(g.shape[-1],
                                                                                               g.shape[-1])])
                ext.sym_outer_update(a2, s[0])  # s += x^T x, the library's one factor-statistic op
                ext.sym_outer_update(g2, s[1])
                counts[i][0] += a2.shape[0]
                counts[i][1] += a.shape[0]
        counts = torch.tensor(counts, dtype=torch.float64, device=device).reshape(len(self.layers), 2)
        dtype = getattr(torch, self.args.factor_dtype)
        flat = [sums.get(n, [torch.zeros(e.a_dim, e.a_dim, dtype=dtype, device=device),
                             torch.zeros(e.g_dim, e.g_dim, dtype=dtype, device=device)])[k]
                for n, e in ((n, store[n]) for n in self.layers) for k in (0, 1)]
        if comm.enabled:
            counts = comm.all_reduce_sum([counts], category="influence", exact=True)[0]
            flat = comm.all_reduce_sum(flat, category="influence")
        if bool((counts[:, 1] == 0).any()):
            raise ValueError("influence: fit() saw no training examples")
        fit = _Fit(examples=int(counts[0, 1]))
        for i, name in enumerate(self.layers):
            entry = store[name]
            rows_n, examples = counts[i].tolist()
            entry.A = (flat[2 * i] + flat[2 * i].T) / (2 * rows_n)
            entry.G = (flat[2 * i + 1] + flat[2 * i + 1].T) / (2 * rows_n)
            entry.num_updates = 1
            fit.rows_per_example[name] = rows_n / examples
        self._pre.refresh()  # eigenbases, decomposed by their owners and shared (comm-opt)
        if self.args.method == "ekfac":
            self._fit_lambda(loader)
        else:
            for name in self.layers:
                e = store[name]
                e.extras["Lambda"] = fit.rows_per_example[name] * torch.outer(e.dG, e.dA)
        for name in self.layers:
            lam = store[name].extras["Lambda"]
            fit.damping[name] = (float(self.args.damping) if self.args.damping is not None
                                 else 0.1 * float(lam.mean()))
        self._fit = fit

    def _fit_lambda(self, loader: Iterable[Any]) -> None:
        comm, store = self._pre._comm, self._pre.store
        sums = {n: torch.zeros(store[n].g_dim, store[n].a_dim, dtype=store[n].QG.dtype, device=store[n].QG.device)
                for n in self.layers}
        count = 0
        for _, batch in self._batches(loader, "fitting eigenvalue corrections"):
            rows = self._backward(batch, sampled=False)
            for name in self.layers:
                part = self._method.correction_sum(store[name], *rows[name])
                sums[name] += part
            count += next(iter(rows.values()))[0].shape[0]
        if comm.enabled:
            total = torch.tensor([count], dtype=torch.float64, device=self._device())
            count = int(comm.all_reduce_sum([total], category="influence", exact=True)[0])
            reduced = comm.all_reduce_sum([sums[n] for n in self.layers], category="influence")
            sums = dict(zip(self.layers, reduced))
        for name in self.layers:
            store[name].extras["Lambda"] = sums[name] / float(count)

    def _fit_mfac(self, loader: Iterable[Any]) -> None:
        m = self.args.num_grads
        grads: dict[str, list[Tensor]] = {n: [] for n in self.layers}
        seen = 0
        for i, batch in self._batches(loader, "collecting M-FAC gradients", shard=False):
            rows = self._backward(batch, sampled=self.args.fisher == "mc", index=i)
            take = min(m - seen, next(iter(rows.values()))[0].shape[0])
            for name in self.layers:
                a, g = rows[name]
                grads[name].append(example_matrices(a[:take], g[:take]))
            seen += take
            if seen >= m:
                break
        if seen == 0:
            raise ValueError("influence: fit() saw no training examples")
        self._set_mfac({n: torch.cat(v) for n, v in grads.items()})

    def _set_mfac(self, grads: dict[str, Tensor]) -> None:
        if self.args.damping is not None:
            damping = float(self.args.damping)
        else:
            total = sum(float(g.double().square().sum()) for g in grads.values())
            numel = sum(g[0].numel() for g in grads.values())
            damping = 0.1 * total / (numel * next(iter(grads.values())).shape[0])
        self._mfac_grads = grads
        self._mfac = StaticFisher(grads, damping=damping, blocks="global")
        self._fit = _Fit(damping={n: damping for n in self.layers}, examples=next(iter(grads.values())).shape[0])

    # -- preconditioning -----------------------------------------------------------------------------------
    def _precondition(self, mats: dict[str, Tensor]) -> dict[str, Tensor]:
        """``(C + damping I)^-1`` applied to per-example gradient matrices ``{layer: (n, g_dim, a_dim)}``."""
        fit = self._require_fit()
        method = self.args.method
        if method == "identity":
            return mats
        if method == "mfac":
            n = next(iter(mats.values())).shape[0]
            outs = [self._mfac.ihvp({k: v[i] for k, v in mats.items()}) for i in range(n)]
            return {k: torch.stack([o[k] for o in outs]) if n else v.clone() for k, v in mats.items()}
        return {name: self._method.precondition(self.store[name], v, damping=fit.damping[name])
                for name, v in mats.items()}  # EK-FAC's map with this fit's Lambda (K-FAC's: T outer(dG, dA))

    def _query_gradients(self, query_loader: Iterable[Any]) -> dict[str, Any]:
        """Preconditioned query gradients per layer (full ``(nq, g, a)``, or ``(US, V)`` of rank ``query_rank``)."""
        dtype = getattr(torch, self.args.score_dtype)
        r = self.args.query_rank
        parts: dict[str, list] = {n: [] for n in self.layers}
        for _, batch in self._batches(query_loader, "preconditioning queries", shard=False):
            rows = self._backward(batch, sampled=False, measurement=True)
            pre = self._precondition({n: example_matrices(*rows[n]) for n in self.layers})
            for name, p in pre.items():
                if r is None:
                    parts[name].append(p.to(dtype))
                else:
                    u, s, vh = torch.linalg.svd(p.to(torch.float64), full_matrices=False)
                    k = min(r, s.shape[-1])
                    parts[name].append(((u[..., :k] * s[..., None, :k]).to(dtype), vh[..., :k, :].mT.to(dtype)))
        if not parts[self.layers[0]]:
            raise ValueError("influence: the query loader yielded no examples")
        if r is None:
            return {n: torch.cat(v) for n, v in parts.items()}
        return {n: (torch.cat([a for a, _ in v]), torch.cat([b for _, b in v])) for n, v in parts.items()}

    # -- scores --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _score_batch(self, queries: Mapping[str, Any], rows: Mapping[str, tuple[Tensor, Tensor]]
                     ) -> dict[str, Tensor]:
        dtype = getattr(torch, self.args.score_dtype)
        out = {}
        for name in self.layers:
            a, g = (t.to(dtype) for t in rows[name])
            q = queries[name]
            if isinstance(q, tuple):  # low rank: sum_t sum_k (g_t . (US)_k)(a_t . V_k)
                us, v = q
                out[name] = torch.einsum("ntg,qgk,nta,qak->qn", g, us, a, v)
            else:
                mats = example_matrices(a, g)
                out[name] = q.flatten(1) @ mats.flatten(1).T  # flatten, not reshape(n, -1): n may be 0
        return out

    def pairwise_scores(self, query_loader: Iterable[Any], train_loader: Iterable[Any], *,
                        per_layer: bool = False) -> Tensor | dict[str, Tensor]:
        """``[n_query, n_train]`` scores (or ``{layer: scores}`` with ``per_layer``); training gradients are
        streamed, never stored."""
        with _eval(self.model):
            queries = self._query_gradients(query_loader)
            self._log_memory(queries)
            blocks: list[tuple[int, dict[str, Tensor]]] = []
            for i, batch in self._batches(train_loader, "scoring"):
                blocks.append((i, self._score_batch(queries, self._backward(batch, sampled=False))))
        return self._assemble(blocks, per_layer, axis=1)

    def self_scores(self, train_loader: Iterable[Any], *, per_layer: bool = False) -> Tensor | dict[str, Tensor]:
        """``[n_train]``: ``grad L(z)^T (C + damping I)^-1 grad L(z)`` for every training example."""
        dtype = getattr(torch, self.args.score_dtype)
        with _eval(self.model):
            blocks = []
            for i, batch in self._batches(train_loader, "self-influence"):
                rows = self._backward(batch, sampled=False)
                mats = {n: example_matrices(*rows[n]) for n in self.layers}
                pre = self._precondition(mats)
                blocks.append((i, {n: (pre[n].to(dtype) * mats[n].to(dtype)).sum((1, 2)) for n in self.layers}))
        return self._assemble(blocks, per_layer, axis=0)

    def top_k(self, query_loader: Iterable[Any], train_loader: Iterable[Any], *, k: int = 10) -> TopK:
        """The ``k`` most helpful training examples per query (largest scores; ``-scores`` for the most harmful)."""
        scores = self.pairwise_scores(query_loader, train_loader)
        k = min(k, scores.shape[1])
        values, indices = torch.topk(scores, k, dim=1)
        return TopK(indices=indices, scores=values)

    def _assemble(self, blocks: list[tuple[int, dict[str, Tensor]]], per_layer: bool, axis: int
                  ) -> Tensor | dict[str, Tensor]:
        comm = self._pre._comm
        if comm.enabled:
            gathered = comm.all_gather_object([(i, {n: t.cpu() for n, t in b.items()}) for i, b in blocks])
            blocks = [item for part in gathered for item in part]
        blocks.sort(key=lambda ib: ib[0])
        if not blocks:
            raise ValueError("influence: the training loader yielded no examples")
        per = {n: torch.cat([b[n] for _, b in blocks], dim=axis) for n in self.layers}
        return per if per_layer else sum(per.values())

    def memory_estimate(self, num_queries: int, batch_size: int) -> dict[str, int]:
        """Bytes needed for scoring: the fitted state, the preconditioned queries, one training batch's
        per-example gradients."""
        size = getattr(torch, self.args.score_dtype).itemsize
        dims = [(self.store[n].g_dim, self.store[n].a_dim) for n in self.layers]
        r = self.args.query_rank
        per_query = sum(g * a if r is None else (g + a) * min(r, g, a) for g, a in dims) * size
        mfac = 0 if self._mfac is None else self._mfac.nbytes + sum(
            t.numel() * t.element_size() for t in self._mfac_grads.values())  # B^T, and the gradients for save()
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
        """Write the fitted state to directory ``path``: factors (safetensors) + settings (JSON, with the
        :func:`weights_digest` of the model when it was fitted, checked by :meth:`load`)."""
        fit = self._require_fit()
        if self._pre._comm.rank != 0:
            return
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.args.method in ("ekfac", "kfac"):
            self.store.save(path / _FACTORS_FILE)
        if self._mfac_grads is not None:
            from safetensors.torch import save_file

            save_file({n: t.contiguous() for n, t in self._mfac_grads.items()}, str(path / _MFAC_FILE))
        settings = {"format": "kfac.influence", "version": 1, "kfac_version": __version__,
                    "arguments": asdict(self.args), "layers": {n: list(self._pre.block_shapes()[n])
                                                                for n in self.layers},
                    "damping": fit.damping, "rows_per_example": fit.rows_per_example, "examples": fit.examples,
                    "weights_sha256": fit.weights_sha256}
        tmp = path / (_SETTINGS_FILE + ".tmp")
        tmp.write_text(json.dumps(settings, indent=1))
        tmp.replace(path / _SETTINGS_FILE)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, task: Task, *, progress: bool = True,
             process_group: Any | None = None, check_weights: bool = True) -> "InfluenceAnalyzer":
        """Rebuild an analyzer saved by :meth:`save` for ``model``; clear errors if it does not match.

        ``check_weights``: raise ``ValueError`` if ``model``'s parameters are not the ones the fit was made on (by
        :func:`weights_digest`; files saved without a digest load with a logged warning). ``False`` skips the
        check (the scores then mix the saved curvature with gradients of other weights)."""
        path = Path(path)
        try:
            settings = json.loads((path / _SETTINGS_FILE).read_text())
        except FileNotFoundError:
            raise FactorFileError(f"{path}: no {_SETTINGS_FILE} (not a saved InfluenceAnalyzer)") from None
        except (OSError, ValueError) as exc:
            raise FactorFileError(f"{path / _SETTINGS_FILE}: unreadable ({exc})") from exc
        if settings.get("format") != "kfac.influence":
            raise FactorFileError(f"{path / _SETTINGS_FILE}: not a kfac.influence settings file")
        args = dict(settings["arguments"])
        analyzer = cls(model, task, method=args["method"], fisher=args["fisher"], damping=args["damping"],
                       tracked_modules=args["tracked_modules"], num_grads=args["num_grads"],
                       query_rank=args["query_rank"], score_dtype=args["score_dtype"],
                       factor_dtype=args["factor_dtype"], seed=args["seed"], progress=progress,
                       process_group=process_group)
        expected = {n: list(s) for n, s in analyzer._pre.block_shapes().items()}
        if settings["layers"] != expected:
            raise ValueError(f"influence state in {path} was fitted for other layers/shapes: saved "
                             f"{settings['layers']}, this model has {expected}")
        saved = settings.get("weights_sha256")
        if saved is None:
            logger.warning("influence: %s has no weights checksum (saved by an older kfac): cannot check that the "
                           "model has the weights the fit was made on", path)
        elif check_weights and saved != weights_digest(model):
            raise ValueError(f"influence state in {path} was fitted on other weights than this model's (parameter "
                             "checksum mismatch): load the weights the fit was made on, or refit with fit() on "
                             "these weights; pass check_weights=False to load it anyway")
        if args["method"] in ("ekfac", "kfac"):
            loaded = FactorStore.load(path / _FACTORS_FILE)
            analyzer.store.load_state_dict(loaded.state_dict())
        elif args["method"] == "mfac":
            from safetensors.torch import load_file

            try:
                grads = load_file(str(path / _MFAC_FILE))
            except Exception as exc:
                raise FactorFileError(f"{path / _MFAC_FILE}: unreadable ({exc})") from exc
            analyzer._set_mfac({n: grads[n] for n in analyzer.layers})
        analyzer._fit = _Fit(damping={n: float(v) for n, v in settings["damping"].items()},
                             rows_per_example=settings.get("rows_per_example", {}), examples=settings["examples"],
                             weights_sha256=saved)
        return analyzer


# -- helpers ---------------------------------------------------------------------------------------------------
def weights_digest(model: nn.Module) -> str:
    """SHA-256 (hex) over every parameter of ``model`` in ``named_parameters()`` order: its name, shape and values
    as float64 bytes on the CPU (one parameter at a time). Deterministic across runs, devices and parameter dtypes
    that hold the same values; buffers are not included."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        digest.update(f"{name}:{tuple(p.shape)};".encode())
        digest.update(p.detach().to("cpu", torch.float64).contiguous().numpy())
    return digest.hexdigest()


class _eval:  # noqa: N801
    """Eval mode for the duration (dropout off, batch norm frozen); the previous modes are restored."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc: Any) -> None:
        for m, mode in self.modes:
            m.training = mode


def _is_empty(batch: Any) -> bool:
    """Whether ``batch`` visibly holds no examples: every tensor in it (through tuples, lists and mappings) with at
    least one dimension has a leading dimension of 0, and there is at least one. Other empty batches are still
    processed (and contribute nothing), but they count as a batch for sharding and label sampling."""
    sizes: list[int] = []
    stack = [batch]
    while stack:
        item = stack.pop()
        if isinstance(item, Tensor):
            if item.dim() > 0:
                sizes.append(item.shape[0])
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
    return bool(sizes) and not any(sizes)


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).replace("torch.", "") if isinstance(dtype, torch.dtype) else str(dtype)


def _len(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def _progress(items: Iterable[Any], desc: str, *, total: int | None, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are optional
        return items
    return tqdm(items, desc=desc, total=total, leave=False)

