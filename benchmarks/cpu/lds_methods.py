"""The attribution methods of the LDS peer benchmark (``lds_peers.py``): ours and the installable peers.

Every runner takes a trained :class:`~benchmarks.cpu.lds_setups.Setting` (the same model, data and queries for
every method) and returns ``(scores [Q, n], fit_s, score_s, notes)`` with scores in our convention: positive =
upweighting the training example lowers the query's measurement (loss). Runners work on a deep copy of the model
(kronfluence, for one, wraps its modules and freezes its parameters). Settings: each package's defaults unless
noted (none tuned on the evaluation subsets):

* ours: ``InfluenceAnalyzer(method=...)``, ``fisher="mc"``, default damping (``0.1 * mean(Lambda)`` per layer;
  M-FAC: ``0.1 * mean(g^2)``, all training gradients kept); ``ours_ekfac_ggn`` / ``ours_ekfac_hessian``:
  ``solver="ggn"`` / ``"hessian"`` (conjugate gradients on the exact Gauss-Newton matrix / Hessian of the mean
  training loss, preconditioned by EK-FAC, ``--solver-iters`` passes at most, relative residual 1e-4) with damping
  the objective's L2 coefficient (the heuristic on the GPT, which has none); ``exact``: the exact Hessian of the training objective
  (mean cross-entropy + L2), logistic regression only -- a reference, not a package method;
* kronfluence 1.0.1: ``FactorArguments(strategy=...)`` (its default: sampled labels), ``ScoreArguments()``
  (default ``damping_factor=1e-8``) and, for EK-FAC, also ``damping_factor=None`` (its heuristic,
  ``0.1 * mean eigenvalue``); on the GPT it tracks the ``nn.Linear`` modules that are called as modules
  (the MLP and the head: ``nn.MultiheadAttention`` uses its projections' weights directly);
* TRAK (traker 0.3.2): one checkpoint (the final model), ``BasicProjector`` (Rademacher, CPU), ``proj_dim``
  ``min(--trak-proj-dim, n_train / 2, parameters / 2)`` (TRAK inverts ``X^T X`` unregularised: it must have full
  rank; 2048, its default, does not on these models), no half precision; classification: TRAK's margin output; GPT: the sequence log-probability
  as output with ``Q = 1`` (a custom ``AbstractModelOutput``);
* dattri 0.3.0: ``IFAttributorExplicit`` / ``IFAttributorCG`` (Hessian of the mean training cross-entropy plus
  ``regularization = weight_decay``: the training objective's Hessian), TracIn (``TracInAttributor``) over
  ``TRACIN_CHECKPOINTS`` checkpoints of the training trajectory, weights 1.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import tempfile
import time
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.cpu.lds_setups import Setting
from kfac.influence import CausalLMTask, ClassificationTask, InfluenceAnalyzer

Result = tuple[Tensor, float, float, dict[str, Any]]
PEER_VERSIONS = {"kronfluence": "1.0.1", "trak": "0.3.2", "dattri": "0.3.0"}


def available(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v

    try:
        return v({"trak": "traker"}.get(package, package))
    except PackageNotFoundError:
        return None


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def math_attention() -> Any:
    """The composite (math) attention kernel: torch.func's vmap and double backward (TRAK, dattri) need it on the
    GPT (CPU's fused kernel has no batching rule and no second derivative); other models have no attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


# ---- ours ------------------------------------------------------------------------------------------------------

def ours(method: str, solver: str = "direct") -> Callable[[Setting, Any], Result]:
    """Ours; ``solver="ggn"`` / ``"hessian"``: CG on the damped exact Gauss-Newton matrix / Hessian preconditioned
    by ``method``, with the training objective's own L2 coefficient as damping (the heuristic default where it has
    none, as on the GPT)."""
    def run(s: Setting, args: Any) -> Result:
        task = CausalLMTask() if s.kind == "lm" else ClassificationTask()
        options: dict[str, Any] = {}
        if solver != "direct":
            options = {"solver": solver, "solver_iterations": args.solver_iters, "solver_tolerance": 1e-4,
                       "damping": s.weight_decay or None}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the GPT's LayerNorms and embeddings are not tracked
            an = InfluenceAnalyzer(s.model, task, method=method, num_grads=s.n_train, seed=args.seed, progress=False,
                                   **options)
            train = s.batched(s.train_data)
            _, fit_s = _timed(lambda: an.fit(train))
            scores, score_s = _timed(lambda: an.pairwise_scores(s.batched(s.query_data), train))
        damping = sorted(set(an.damping.values())) if method != "identity" else None
        notes = {"layers": an.layers, "damping_range": damping and [damping[0], damping[-1]]}
        if solver != "direct":
            info = an.solver_info
            notes.update(iterations=info["iterations"], stopped_negative=info["stopped_negative"],
                         median_relative_residual=float(info["relative_residual"].median()))
        return scores, fit_s, score_s, notes
    return run


def flat_functional(model: nn.Module) -> tuple[Tensor, Callable[[Tensor, Tensor], Tensor]]:
    """The model's parameters as one vector and ``logits(theta, x)`` (``torch.func.functional_call``)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().flatten() for p in model.parameters()]).double()

    def logits(vec: Tensor, x: Tensor) -> Tensor:
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            size = shape.numel()
            params[name] = vec[offset:offset + size].view(shape)
            offset += size
        return torch.func.functional_call(model, params, (x,))

    return theta, logits


def exact(s: Setting, args: Any) -> Result:
    """``g_q^T H^-1 g_j`` with ``H`` the exact Hessian of mean cross-entropy + ``weight_decay / 2 ||theta||^2``."""
    model = copy.deepcopy(s.model).double().eval()
    theta, logits = flat_functional(model)
    (x, y), (xq, yq) = [tuple(t.double() if t.is_floating_point() else t for t in d)
                        for d in (s.train_data, s.query_data)]

    def objective(v: Tensor) -> Tensor:
        return F.cross_entropy(logits(v, x), y) + 0.5 * s.weight_decay * v.square().sum()

    def example_loss(v: Tensor, xi: Tensor, yi: Tensor) -> Tensor:
        return F.cross_entropy(logits(v, xi[None]), yi[None])

    def fit() -> Tensor:
        return torch.linalg.cholesky(torch.func.hessian(objective)(theta))

    chol, fit_s = _timed(fit)
    per_example = torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, 0, 0))

    def score() -> Tensor:
        gq = per_example(theta, xq, yq)
        return (torch.cholesky_solve(gq.T, chol).T @ per_example(theta, x, y).T).float()

    scores, score_s = _timed(score)
    return scores, fit_s, score_s, {"hessian": "exact, of the training objective (float64, Cholesky)"}


# ---- kronfluence ---------------------------------------------------------------------------------------------------

def kronfluence(strategy: str, damping: float | None = 1e-8) -> Callable[[Setting, Any], Result]:
    def run(s: Setting, args: Any) -> Result:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task

        lm = s.kind == "lm"
        tracked = [n for n, m in s.model.named_modules() if isinstance(m, nn.Linear) and "self_attn" not in n]

        class KTask(Task):
            def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Tensor:
                inputs = batch[0]
                logits = model(inputs)
                if lm:
                    logits, targets = logits[:, :-1].reshape(-1, logits.shape[-1]), inputs[:, 1:].reshape(-1)
                else:
                    targets = batch[1]
                if sample:
                    with torch.no_grad():
                        targets = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
                return F.cross_entropy(logits, targets, reduction="sum")

            def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
                return self.compute_train_loss(batch, model, sample=False)

            def get_influence_tracked_modules(self) -> list[str] | None:
                return tracked if lm else None

        task = KTask()
        model = prepare_model(copy.deepcopy(s.model), task)
        train, query = TensorDataset(*s.train_data), TensorDataset(*s.query_data)
        torch.manual_seed(args.seed)  # the labels sampled for the Fisher
        with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            an = Analyzer("lds", model, task, cpu=True, disable_tqdm=True, output_dir=out, log_level=logging.ERROR)
            _, fit_s = _timed(lambda: an.fit_all_factors(
                "f", train, per_device_batch_size=s.batch_size, factor_args=FactorArguments(strategy=strategy),
                overwrite_output_dir=True))

            def score() -> Tensor:
                an.compute_pairwise_scores(
                    "s", "f", query, train, per_device_query_batch_size=len(query),
                    per_device_train_batch_size=s.batch_size, score_args=ScoreArguments(damping_factor=damping),
                    overwrite_output_dir=True)
                return an.load_pairwise_scores("s")["all_modules"].clone()

            scores, score_s = _timed(score)
        return scores, fit_s, score_s, {"strategy": strategy, "damping_factor": damping,
                                        "layers": tracked if lm else "every nn.Linear"}
    return run


# ---- TRAK --------------------------------------------------------------------------------------------------------

def trak(s: Setting, args: Any) -> Result:
    from trak import TRAKer
    from trak.modelout_functions import AbstractModelOutput
    from trak.projectors import BasicProjector, ProjectionType

    class SequenceLogProb(AbstractModelOutput):
        """Output: the sequence's log-probability (minus its summed cross-entropy); ``Q = 1``."""

        def __init__(self) -> None:
            pass

        @staticmethod
        def get_output(model: nn.Module, weights: Any, buffers: Any, ids: Tensor) -> Tensor:
            logits = torch.func.functional_call(model, (weights, buffers), ids.unsqueeze(0))[0, :-1]
            return -F.cross_entropy(logits, ids[1:], reduction="sum")

        def get_out_to_loss_grad(self, model: nn.Module, weights: Any, buffers: Any, batch: Any) -> Tensor:
            return torch.ones(len(batch[0]), 1)

    model = copy.deepcopy(s.model).eval()
    grad_dim = sum(p.numel() for p in model.parameters())
    # X^T X (proj_dim x proj_dim) is inverted without regularisation (lambda_reg 0, TRAK's default): it must be of
    # full rank, so proj_dim stays below the rank of the per-example gradients (<= n_train, < grad_dim); half of
    # the smaller bound, chosen once by this rule (not on the evaluation subsets)
    dim = min(args.trak_proj_dim, s.n_train // 2, grad_dim // 2)
    # block_size: at least 2 blocks -- with one, traker 0.3.2 frees the projection matrix after featurizing and
    # then scores with it (AttributeError); the projection is the same kind either way
    proj = BasicProjector(grad_dim=grad_dim, proj_dim=dim, seed=args.seed, block_size=min(100, (dim + 1) // 2),
                          proj_type=ProjectionType.rademacher, device="cpu", dtype=torch.float32)
    train = [tuple(t[i:i + s.batch_size] for t in s.train_data) for i in range(0, s.n_train, s.batch_size)]
    nq = len(s.query_data[0])
    with tempfile.TemporaryDirectory() as out, math_attention():
        logging.getLogger("TRAK").setLevel(logging.ERROR)
        traker = TRAKer(model=model, task=SequenceLogProb() if s.kind == "lm" else "image_classification",
                        train_set_size=s.n_train, save_dir=out, device="cpu",
                        projector=proj, proj_dim=dim, use_half_precision=False,
                        logging_level=logging.ERROR)
        state = model.state_dict()

        def fit() -> None:
            traker.load_checkpoint(state, model_id=0)
            for b in train:
                traker.featurize(batch=list(b), num_samples=len(b[0]))
            traker.finalize_features()

        def score() -> Tensor:
            traker.start_scoring_checkpoint(exp_name="q", checkpoint=state, model_id=0, num_targets=nq)
            traker.score(batch=list(s.query_data), num_samples=nq)
            return torch.as_tensor(traker.finalize_scores(exp_name="q")).T.float().clone()

        _, fit_s = _timed(fit)
        scores, score_s = _timed(score)
    return scores, fit_s, score_s, {"proj_dim": dim, "checkpoints": 1,
                                    "output": "sequence log-probability, Q = 1" if s.kind == "lm" else "margin"}


# ---- dattri --------------------------------------------------------------------------------------------------------

def _dattri_task(s: Setting, checkpoints: Any) -> Any:
    from dattri.task import AttributionTask

    model = copy.deepcopy(s.model).eval()

    def loss(params: Any, data: Any) -> Tensor:
        if s.kind == "lm":
            ids = data[0] if isinstance(data, (tuple, list)) else data
            ids = ids[None] if ids.dim() == 1 else ids  # TracIn maps over examples without a batch dimension
            logits = torch.func.functional_call(model, params, (ids,))[:, :-1]
            return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="sum") / len(ids)
        x, y = data
        if y.dim() == 0:  # TracIn maps over examples without a batch dimension
            x, y = x[None], y[None]
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    return AttributionTask(loss_func=loss, model=model, checkpoints=checkpoints)


def dattri(kind: str) -> Callable[[Setting, Any], Result]:
    def run(s: Setting, args: Any) -> Result:
        from dattri.algorithm.influence_function import IFAttributorCG, IFAttributorExplicit
        from dattri.algorithm.tracin import TracInAttributor

        # one training batch: dattri recomputes the queries' inverse-Hessian products for every training batch,
        # and sums the explicit inverse over batches of its cache loader (right only for one batch); query batches
        # of 20 bound the memory of CG's vmapped Hessian-vector products
        train = DataLoader(TensorDataset(*s.train_data), batch_size=s.n_train)
        query = DataLoader(TensorDataset(*s.query_data), batch_size=20)
        notes: dict[str, Any] = {}
        if kind == "tracin":
            task = _dattri_task(s, s.checkpoints)
            att: Any = TracInAttributor(task, weight_list=torch.ones(len(s.checkpoints)), normalized_grad=False,
                                        device="cpu")
            notes.update(checkpoints=len(s.checkpoints), weights=1.0)
        elif kind == "explicit":
            att = IFAttributorExplicit(_dattri_task(s, s.model.state_dict()), device="cpu",
                                       regularization=s.weight_decay)
            notes.update(regularization=s.weight_decay)
        else:
            att = IFAttributorCG(_dattri_task(s, s.model.state_dict()), device="cpu", max_iter=args.cg_iters,
                                 regularization=s.weight_decay)
            notes.update(regularization=s.weight_decay, max_iter=args.cg_iters)
        with warnings.catch_warnings(), math_attention():
            warnings.simplefilter("ignore")
            _, fit_s = _timed(lambda: None if kind == "tracin" else att.cache(train))
            scores, score_s = _timed(lambda: att.attribute(train, query).T.float().clone())
        return scores, fit_s, score_s, notes
    return run


# ---- the registry ------------------------------------------------------------------------------------------------

METHODS: dict[str, tuple[str | None, str, Callable[[Setting, Any], Result]]] = {
    # name: (package needed, label, runner)
    "ours_identity": (None, "ours: identity (gradient dot product)", ours("identity")),
    "ours_kfac": (None, "ours: K-FAC (no eigenvalue correction)", ours("kfac")),
    "ours_ekfac": (None, "ours: EK-FAC", ours("ekfac")),
    "ours_mfac": (None, "ours: M-FAC (all training gradients)", ours("mfac")),
    "ours_ekfac_ggn": (None, "ours: EK-FAC-preconditioned CG on the exact Gauss-Newton matrix", ours("ekfac", "ggn")),
    "ours_ekfac_hessian": (None, "ours: EK-FAC-preconditioned CG on the exact Hessian", ours("ekfac", "hessian")),
    "exact": (None, "exact Hessian inverse (reference; logistic regression)", exact),
    "kronfluence_ekfac": ("kronfluence", "kronfluence: EK-FAC (damping 1e-8, its default)", kronfluence("ekfac")),
    "kronfluence_ekfac_heuristic": ("kronfluence", "kronfluence: EK-FAC (heuristic damping)",
                                    kronfluence("ekfac", None)),
    "kronfluence_kfac": ("kronfluence", "kronfluence: K-FAC (damping 1e-8)", kronfluence("kfac")),
    "kronfluence_diagonal": ("kronfluence", "kronfluence: diagonal (damping 1e-8)", kronfluence("diagonal")),
    "trak": ("trak", "TRAK (traker, 1 checkpoint, CPU BasicProjector)", trak),
    "dattri_if_explicit": ("dattri", "dattri: IF, explicit Hessian inverse", dattri("explicit")),
    "dattri_if_cg": ("dattri", "dattri: IF, conjugate gradient", dattri("cg")),
    "dattri_tracin": ("dattri", "dattri: TracIn (training checkpoints)", dattri("tracin")),
}
NOT_FOR = {
    "exact": {"mlp": "reference computed for the (convex) logistic regression only",
              "lm": "reference computed for the (convex) logistic regression only"},
    "dattri_if_explicit": {"mlp": "explicit Hessian of 9.6k parameters: left to CG", "lm": "left to CG"},
    "dattri_if_cg": {"lm": "out of memory in trial runs: killed by the OOM killer on this 23 GiB machine; under a "
                           "14 GB address-space limit it failed to allocate after reaching 10.5 GB resident, with 4 "
                           "queries per batch as with 20 (Hessian-vector products through the GPT)"},
}
"""Methods deliberately not run on a model, with the reason."""
