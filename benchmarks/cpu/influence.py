"""Influence functions on digits: fit time, scoring throughput, memory and the linear datamodeling score (issue 5).

Setting. scikit-learn's digits (``examples/_digits.py``: 1347 training / 450 test images, 8x8, standardised; read
offline). The model is an MLP 64-128-10 with tanh (``--model cnn``: the small CNN of ``examples/_digits.py``),
trained to convergence from the initial weights of ``--seed`` by full-batch L-BFGS (strong Wolfe line search) on
``mean cross-entropy + weight_decay / 2 * ||theta||^2`` (``--weight-decay 1e-3``, up to ``--max-iter 1000``
iterations; the final gradient norm is recorded).

Methods: ``InfluenceAnalyzer(method=...)`` for identity / kfac / ekfac / mfac, ``ClassificationTask()``,
``fisher="mc"``, default damping (``None``: ``0.1 * mean(Lambda)`` per layer for kfac/ekfac, ``0.1 * mean(g^2)``
for mfac); M-FAC keeps the gradients of ``--mfac-grads`` training examples (default: all of them). Measured:

* fit time (``fit(train)``) and scoring time (``pairwise_scores(queries, train)``: query gradients,
  preconditioning and the streamed training gradients), best of ``--repeats`` (medians in the JSON); throughput =
  ``n_train * n_queries / scoring time`` (pairs per second);
* memory: ``analyzer.memory_estimate(n_queries, batch_size)`` -- the fitted state (factors, eigenbases, Lambda; or
  M-FAC's stored gradients), the preconditioned queries and one training batch's per-example gradients -- and the
  fitted state actually held ("held": the distinct tensor storages reachable from the analyzer, model excluded; for
  M-FAC this also counts StaticFisher's whitened ``k x d`` copy, which the estimate leaves out). tracemalloc cannot
  be used: it does not see torch's CPU allocator;
* LDS (linear datamodeling score, Park et al. 2023, "TRAK"): ``--subsets`` random subsets ``S_k`` holding
  ``--fraction`` (50%) of the training set are drawn once; a fresh model is trained on each, with the *same*
  hyperparameters and the *same* initial weights (``--seed``) as the full model, so the subset is the only thing
  that changes; ``loss_q(S_k)`` is the cross-entropy of query ``q`` under that model (the measurement). The scores
  predict ``loss_q(S) ~ const - (1/n) sum_{j in S} score[q, j]`` (positive score: upweighting ``j`` lowers the
  query's loss), so per query we take the Spearman rank correlation, across the subsets, between the predicted
  group influence ``sum_{j in S_k} score[q, j]`` and ``-loss_q(S_k)``, and average over queries (+1: a perfect
  ranking of the subsets by their effect on the query). The standard error over queries is reported too.

Queries: the full model's misclassified test examples (at most half of ``--queries``), then random correctly
classified ones (fixed seed), ``--queries`` (100) in all. A damping sweep (``--damping-sweep``, fixed damping for
every layer) is reported separately; its LDS uses the same subset models.

Reference only: kronfluence reports EK-FAC LDS of about 0.32 (RTE, BERT) and 0.44 (WikiText-2, GPT-2), as quoted in
issue 5 -- other tasks, models, measurements and retraining noise; not comparable with the numbers here.

Writes ``benchmarks/cpu/results/influence.json`` and ``influence.png`` (``--quick``: 10 subsets, 20 queries, a
two-point sweep, ``influence_quick.*``; ``--model cnn``: ``influence_cnn*``, 40 subsets by default since each CNN
takes ~10x longer to retrain than the MLP); ``--out-dir`` puts them elsewhere. The JSON is the summary (settings,
machine, model, per-method LDS, timings, memory, paired differences, damping sweep); ``--raw [PATH]`` also writes
the complete record with the per-query LDS, every timing repeat and the query indices (``--quick`` keeps them in its
JSON). The default (MLP) run takes about 1-2 minutes on 2 CPU cores.

    python benchmarks/cpu/influence.py [--quick] [--threads 1] [--model mlp|cnn] [--subsets 100] [--queries 100]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing: `kfac` and `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "examples"))
from benchmarks.common import add_raw_argument, machine_info, save_png, write_results  # noqa: E402
from _digits import load_data  # noqa: E402
from _digits import make_model as make_cnn  # noqa: E402

from kfac.influence import ClassificationTask, InfluenceAnalyzer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RAW_KEYS: tuple[tuple[str, ...], ...] = (("methods", "*", "lds_per_query"), ("methods", "*", "fit_s_all"),
                                         ("methods", "*", "score_s_all"), ("queries", "test_indices"))
"""Left out of the summary JSON (``--raw`` keeps them): per-query LDS, every timing repeat, which test examples."""
METHODS = ("identity", "kfac", "ekfac", "ekfac_sampled", "mfac")
"""``ekfac_sampled``: EK-FAC with ``lambda_labels="sampled"`` (Lambda at the labels sampled for A and G, as
kronfluence does)."""
SWEEP_METHODS = ("kfac", "ekfac", "mfac")  # identity ignores damping
REFERENCE = {
    "source": "kronfluence, as quoted in issue 5",
    "ekfac_lds": {"RTE (BERT)": 0.32, "WikiText-2 (GPT-2)": 0.44},
    "note": "different tasks, models, measurements and retraining noise: not comparable with the digits numbers",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run (few subsets/queries), writes influence_quick.*")
    p.add_argument("--model", choices=("mlp", "cnn"), default="mlp",
                   help="MLP 64-128-10 (tanh) or the CNN of examples/_digits.py (much slower to retrain)")
    p.add_argument("--hidden", type=int, default=128, help="MLP hidden width")
    p.add_argument("--subsets", type=int, default=None,
                   help="subset models for the LDS (default 100, quick 10; --model cnn: 40, quick 4)")
    p.add_argument("--fraction", type=float, default=0.5, help="fraction of the training set in each subset")
    p.add_argument("--queries", type=int, default=None, help="test-set queries (default 100, quick 20)")
    p.add_argument("--weight-decay", type=float, default=1e-3, help="L2 coefficient of the training objective")
    p.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations per model (at most)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size of the fit/scoring loaders")
    p.add_argument("--mfac-grads", type=int, default=None, help="M-FAC's num_grads (default: all training examples)")
    p.add_argument("--fisher", choices=("mc", "empirical"), default="mc", help="Fisher of kfac/ekfac/mfac")
    p.add_argument("--damping-sweep", type=str, default=None,
                   help="comma-separated fixed dampings (default 1e-6,...,1e-1; quick 1e-4,1e-2; 'none' to skip)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timing repeats, the best is reported (default 5, quick 1)")
    p.add_argument("--seed", type=int, default=0, help="initial weights of every model; subsets and queries")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (tiny matrices: on a shared 2-core machine 2 threads mostly add waiting)")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="where influence[_quick].{json,png} go")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    add_raw_argument(p, "influence[_cnn][_quick]")
    a = p.parse_args(argv)
    a.subsets = a.subsets or ((10 if a.quick else 100) if a.model == "mlp" else (4 if a.quick else 40))
    a.queries = a.queries or (20 if a.quick else 100)
    a.repeats = a.repeats or (1 if a.quick else 5)
    sweep = a.damping_sweep or ("1e-4,1e-2" if a.quick else "1e-6,1e-5,1e-4,1e-3,1e-2,1e-1")
    a.damping_sweep = [] if sweep.lower() == "none" else [float(v) for v in sweep.split(",")]
    if a.subsets < 3 or a.queries < 1 or not 0 < a.fraction < 1 or a.threads < 1 or a.repeats < 1:
        p.error("need --subsets >= 3, --queries >= 1, 0 < --fraction < 1, positive --threads and --repeats")
    if any(not (d > 0 and math.isfinite(d)) for d in a.damping_sweep):
        p.error("--damping-sweep values must be positive")
    return a


# ---- model and training ---------------------------------------------------------------------------------------------

def make_model(kind: str, seed: int, hidden: int = 128) -> nn.Module:
    """The benchmark's model with the initial weights of ``seed`` (the global RNG state is left untouched)."""
    if kind == "cnn":
        return make_cnn(seed)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))
    finally:
        torch.random.set_rng_state(state)


def train_lbfgs(model: nn.Module, x: Tensor, y: Tensor, *, weight_decay: float, max_iter: int) -> dict[str, float]:
    """Full-batch L-BFGS on mean cross-entropy + L2 (deterministic: no sampling anywhere)."""
    params = list(model.parameters())
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-7, tolerance_change=1e-10)

    def objective() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) + 0.5 * weight_decay * sum(p.square().sum() for p in params)
        loss.backward()
        return loss

    start = time.perf_counter()
    model.train()
    opt.step(objective)
    wall = time.perf_counter() - start
    final = float(objective().detach())
    grad_norm = float(torch.cat([p.grad.flatten() for p in params]).norm())
    opt.zero_grad()
    state = opt.state[params[0]]
    return {"iterations": int(state["n_iter"]), "objective": final, "grad_norm": grad_norm, "wall_s": wall}


@torch.no_grad()
def per_example_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    model.eval()
    return F.cross_entropy(model(x), y, reduction="none")


def batches(x: Tensor, y: Tensor, size: int) -> list[tuple[Tensor, Tensor]]:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def choose_queries(pred: Tensor, y: Tensor, count: int, seed: int) -> tuple[Tensor, int]:
    """Misclassified test examples (at most half of ``count``) first, then random correct ones."""
    wrong = (pred != y).nonzero().flatten()[: count // 2]
    taken = set(wrong.tolist())
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + 7)).tolist()
    right = [i for i in order if i not in taken and bool(pred[i] == y[i])][: count - len(wrong)]
    return torch.cat([wrong, torch.tensor(right, dtype=torch.long)]), len(wrong)


# ---- LDS ------------------------------------------------------------------------------------------------------------

def _ranks(a: Tensor) -> Tensor:
    """Average ranks along dim 0 (ties share their mean rank)."""
    from scipy.stats import rankdata

    return torch.as_tensor(rankdata(a.double().numpy(), axis=0), dtype=torch.float64)


def lds_per_query(scores: Tensor, masks: Tensor, losses: Tensor) -> Tensor:
    """Spearman correlation per query between ``sum_{j in S_k} score[q, j]`` and ``-loss_q(S_k)`` over subsets k.

    scores: ``[Q, n]``; masks: ``[K, n]`` (bool); losses: ``[K, Q]``. Returns ``[Q]`` (NaN where a side is constant).
    """
    predicted = masks.double() @ scores.double().T  # [K, Q]: higher = lower predicted loss
    r1, r2 = _ranks(predicted), _ranks(-losses)
    r1, r2 = r1 - r1.mean(0), r2 - r2.mean(0)
    denom = r1.norm(dim=0) * r2.norm(dim=0)
    return torch.where(denom > 0, (r1 * r2).sum(0) / denom.clamp_min(1e-300), torch.full_like(denom, math.nan))


def summarise(corr: Tensor, n_wrong: int) -> dict[str, float]:
    ok = corr[~corr.isnan()]
    se = float(ok.std() / math.sqrt(len(ok))) if len(ok) > 1 else math.nan
    wrong, right = corr[:n_wrong], corr[n_wrong:]
    return {"lds": float(ok.mean()) if len(ok) else math.nan, "lds_se": se,
            "lds_misclassified": float(wrong.nanmean()) if n_wrong else math.nan,
            "lds_correct": float(right.nanmean()) if len(right) else math.nan,
            "queries_with_nan": int(corr.isnan().sum())}


# ---- one method ----------------------------------------------------------------------------------------------------

def held_tensor_bytes(root: Any) -> int:
    """Bytes of the distinct tensor storages reachable from ``root`` through attributes, dicts and sequences.
    Modules are not entered (the model's weights are not part of the fitted state)."""
    seen, storages, total, stack = set(), set(), 0, [root]
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen or isinstance(obj, (nn.Module, type, str, bytes, int, float)):
            continue
        seen.add(id(obj))
        if isinstance(obj, Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in storages:
                storages.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return total


def analyzer_for(model: nn.Module, method: str, args: argparse.Namespace, n_train: int,
                 damping: float | None = None) -> InfluenceAnalyzer:
    sampled = method == "ekfac_sampled"
    return InfluenceAnalyzer(model, ClassificationTask(), method="ekfac" if sampled else method, fisher=args.fisher,
                             lambda_labels="sampled" if sampled else "data", damping=damping,
                             num_grads=args.mfac_grads or n_train, seed=args.seed, progress=False)


def run_method(model: nn.Module, method: str, args: argparse.Namespace, train: list, queries: list, n_train: int,
               n_queries: int) -> tuple[Tensor, dict[str, Any]]:
    fit_times, score_times, scores = [], [], None
    for _ in range(args.repeats):
        an = analyzer_for(model, method, args, n_train)
        start = time.perf_counter()
        an.fit(train)
        fit_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        s = an.pairwise_scores(queries, train)
        score_times.append(time.perf_counter() - start)
        scores = s if scores is None else scores
    mem = an.memory_estimate(n_queries, args.batch_size)
    held = held_tensor_bytes(an)
    fit_s, score_s = min(fit_times), min(score_times)  # best of the repeats: the least disturbed by other load
    damping = sorted(set(an.damping.values()))
    return scores, {
        "fit_s": fit_s, "score_s": score_s, "throughput_pairs_per_s": n_train * n_queries / score_s,
        "fit_s_median": statistics.median(fit_times), "score_s_median": statistics.median(score_times),
        "fit_s_all": fit_times, "score_s_all": score_times,
        "memory_bytes": {**mem, "fitted_held": held, "fitted_held_plus_queries": held + mem["queries"],
                         "estimate_total": sum(mem.values())},
        "damping": an.damping if method != "identity" else None,
        "damping_range": [damping[0], damping[-1]] if method != "identity" else None,
        "num_grads": an.args.num_grads if method == "mfac" else None,
    }


# ---- output ----------------------------------------------------------------------------------------------------------

def format_table(results: dict[str, Any]) -> str:
    head = (f"{'method':<14}{'LDS':>8}{'+-SE':>7}{'LDS wrong':>11}{'fit [s]':>10}{'score [s]':>11}"
            f"{'pairs/s':>11}{'fitted MiB held/est':>21}{'+queries MiB':>14}  damping (default)")
    lines = [head, "-" * len(head)]
    for m, r in results["methods"].items():
        mem = r["memory_bytes"]
        d = r["damping_range"]
        damp = "-" if d is None else (f"{d[0]:.2e}" if d[0] == d[1] else f"{d[0]:.2e}..{d[1]:.2e}")
        lines.append(f"{m:<14}{r['lds']:>8.3f}{r['lds_se']:>7.3f}{r['lds_misclassified']:>11.3f}{r['fit_s']:>10.3f}"
                     f"{r['score_s']:>11.3f}{r['throughput_pairs_per_s']:>11.3g}"
                     f"{mem['fitted_held'] / 2**20:>12.3f}/{mem['fitted'] / 2**20:<8.3f}"
                     f"{mem['fitted_held_plus_queries'] / 2**20:>14.3f}  {damp}")
    if results["damping_sweep"]:
        values = results["config"]["damping_sweep"]
        lines += ["", "damping sweep (fixed damping for every layer), LDS:",
                  f"{'method':<10}" + "".join(f"{v:>10.0e}" for v in values)]
        for m, rows in results["damping_sweep"].items():
            lines.append(f"{m:<10}" + "".join(f"{r['lds']:>10.3f}" for r in rows))
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results["methods"])
    r = results["methods"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    ax = axes[0]
    xs = range(len(methods))
    ax.bar([x - 0.2 for x in xs], [r[m]["lds"] for m in methods], 0.4, yerr=[r[m]["lds_se"] for m in methods],
           capsize=3, label="all queries (+-SE)", color="tab:blue")
    ax.bar([x + 0.2 for x in xs], [r[m]["lds_misclassified"] for m in methods], 0.4, label="misclassified queries",
           color="tab:orange")
    ax.set_xticks(list(xs), methods)
    ax.set_ylabel("LDS (mean Spearman over queries)")
    ax.set_title(f"LDS, default damping ({results['subsets']['count']} subset models)")
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=8, loc="lower right")
    ax = axes[1]
    ax.bar(methods, [r[m]["throughput_pairs_per_s"] for m in methods], color="tab:green")
    ax.set_yscale("log")
    ax.set_ylabel("scoring throughput [train x query pairs / s]")
    for i, m in enumerate(methods):
        ax.text(i, r[m]["throughput_pairs_per_s"], f"fit {r[m]['fit_s']:.2f}s", ha="center", va="bottom", fontsize=8)
    ax.set_title(f"throughput ({results['machine']['threads']} thread(s))")
    ax = axes[2]
    if results["damping_sweep"]:
        for i, (m, rows) in enumerate(results["damping_sweep"].items()):
            color = f"C{i}"
            ax.plot([row["damping"] for row in rows], [row["lds"] for row in rows], "o-", color=color, label=m)
            ax.axhline(r[m]["lds"], color=color, ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("damping (dashed: default damping)")
        ax.set_ylabel("LDS")
        ax.legend(fontsize=8)
    ax.set_title("damping sweep")
    cfg = results["config"]
    fig.suptitle(f"influence on digits: {results['model']['description']}, {cfg['queries']} queries, "
                 f"{results['machine']['cpu_model']}", fontsize=10)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)


# ---- main ------------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    data = load_data()
    x, y, xt, yt = data.x_train, data.y_train, data.x_test, data.y_test
    n = len(x)
    train_kw = {"weight_decay": args.weight_decay, "max_iter": args.max_iter}

    model = make_model(args.model, args.seed, args.hidden)
    info = train_lbfgs(model, x, y, **train_kw)
    with torch.no_grad():
        model.eval()
        pred = model(xt).argmax(1)
    test_acc = float((pred == yt).float().mean())
    description = (f"MLP 64-{args.hidden}-10 tanh" if args.model == "mlp" else "CNN (examples/_digits.py)")
    print(f"model: {description}, {sum(p.numel() for p in model.parameters())} parameters; L-BFGS "
          f"{info['iterations']} it, {info['wall_s']:.2f}s, |grad| {info['grad_norm']:.1e}, test acc "
          f"{100 * test_acc:.2f}%", flush=True)

    q_idx, n_wrong = choose_queries(pred, yt, args.queries, args.seed)
    nq = len(q_idx)
    train = batches(x, y, args.batch_size)
    queries = batches(xt[q_idx], yt[q_idx], args.batch_size)

    scores: dict[str, Tensor] = {}
    methods: dict[str, Any] = {}
    for method in METHODS:
        scores[method], methods[method] = run_method(model, method, args, train, queries, n, nq)
        print(f"  {method:<9} fit {methods[method]['fit_s']:.3f}s  score {methods[method]['score_s']:.3f}s",
              flush=True)

    # subset models: same init and hyperparameters, only the data differ
    gen = torch.Generator().manual_seed(args.seed + 1)
    size = round(args.fraction * n)
    masks = torch.zeros(args.subsets, n, dtype=torch.bool)
    losses = torch.empty(args.subsets, nq, dtype=torch.float64)
    sub_acc, sub_iters, sub_grad = [], [], []
    start = time.perf_counter()
    for k in range(args.subsets):
        masks[k, torch.randperm(n, generator=gen)[:size]] = True
        m = make_model(args.model, args.seed, args.hidden)
        r = train_lbfgs(m, x[masks[k]], y[masks[k]], **train_kw)
        losses[k] = per_example_loss(m, xt[q_idx], yt[q_idx]).double()
        with torch.no_grad():
            sub_acc.append(float((m(xt).argmax(1) == yt).float().mean()))
        sub_iters.append(r["iterations"])
        sub_grad.append(r["grad_norm"])
        if (k + 1) % max(1, args.subsets // 5) == 0:
            print(f"  subset models: {k + 1}/{args.subsets} ({time.perf_counter() - start:.1f}s)", flush=True)
    subset_s = time.perf_counter() - start

    corrs = {}
    for method in METHODS:
        corrs[method] = corr = lds_per_query(scores[method], masks, losses)
        methods[method].update(summarise(corr, n_wrong))
        methods[method]["lds_per_query"] = [None if math.isnan(c) else round(float(c), 5) for c in corr]
    paired = {}  # EK-FAC against the others, per query (the same queries and subset models)
    for other in METHODS:
        if other != "ekfac":
            diff = corrs["ekfac"] - corrs[other]
            diff = diff[~diff.isnan()]
            paired[f"ekfac-{other}"] = {"mean": float(diff.mean()), "se": float(diff.std() / math.sqrt(len(diff)))
                                        if len(diff) > 1 else math.nan, "ekfac_better_on": int((diff > 0).sum()),
                                        "queries": len(diff)}

    sweep: dict[str, list[dict[str, float]]] = {}
    for method in SWEEP_METHODS if args.damping_sweep else ():
        sweep[method] = []
        for d in args.damping_sweep:
            an = analyzer_for(model, method, args, n, damping=d).fit(train)
            corr = lds_per_query(an.pairwise_scores(queries, train), masks, losses)
            sweep[method].append({"damping": d, **summarise(corr, n_wrong)})

    results: dict[str, Any] = {
        "benchmark": "influence", "quick": args.quick,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine_info(threads=torch.get_num_threads(), load_avg_1_5_15_start=load_start,
                                load_avg_1_5_15_end=os.getloadavg() if hasattr(os, "getloadavg") else None),
        "model": {"kind": args.model, "description": description,
                  "parameters": sum(p.numel() for p in model.parameters()), "training": "full-batch L-BFGS "
                  "(strong Wolfe), mean cross-entropy + weight_decay/2 ||theta||^2", **info,
                  "test_accuracy": test_acc, "n_train": n, "n_test": len(xt)},
        "queries": {"count": nq, "misclassified": n_wrong, "test_indices": q_idx.tolist(),
                    "selection": "misclassified test examples (at most half), then random correct ones"},
        "subsets": {"count": args.subsets, "fraction": args.fraction, "size": size, "train_s": subset_s,
                    "init": f"same initial weights (seed {args.seed}) and hyperparameters as the full model",
                    "mean_test_accuracy": statistics.mean(sub_acc), "mean_iterations": statistics.mean(sub_iters),
                    "max_grad_norm": max(sub_grad)},
        "lds_definition": "mean over queries q of Spearman_k( sum_{j in S_k} score[q, j], -loss_q(model trained on "
                          "S_k) ); score > 0 = upweighting j lowers the query's loss, so a perfect predictor gives +1",
        "methods": methods, "paired_lds_differences": paired, "damping_sweep": sweep, "reference": REFERENCE,
        "total_s": time.perf_counter() - t0,
    }
    table = format_table(results)
    print()
    print(table)
    print("paired LDS differences over queries: " + ", ".join(
        f"{k} {v['mean']:+.3f} +- {v['se']:.3f} (better on {v['ekfac_better_on']}/{v['queries']})"
        for k, v in paired.items()))
    print(f"\nsubset models: {args.subsets} x {size} examples in {subset_s:.1f}s (mean test acc "
          f"{100 * results['subsets']['mean_test_accuracy']:.2f}%); queries: {nq} ({n_wrong} misclassified)")
    print(f"reference: {REFERENCE['source']}: EK-FAC LDS 0.32 (RTE, BERT), 0.44 (WikiText-2, GPT-2) -- "
          f"{REFERENCE['note']}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "influence" + ("_cnn" if args.model == "cnn" else "") + ("_quick" if args.quick else "")
    json_path = args.out_dir / f"{stem}.json"
    write_results(json_path, results, RAW_KEYS, raw=args.raw, embed_raw=args.quick, indent=1)
    if not args.no_plot:
        plot(results, args.out_dir / f"{stem}.png")
        print(f"wrote {args.out_dir / (stem + '.png')}")
    print(f"({time.perf_counter() - t0:.1f}s)")
    return results


if __name__ == "__main__":
    main()
