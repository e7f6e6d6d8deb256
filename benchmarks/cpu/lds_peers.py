"""LDS of our influence methods side by side with the installable attribution packages (issue 24, item 1).

Models (``lds_setups.py``): a logistic regression and an MLP 64-128-10 on scikit-learn's digits (full-batch L-BFGS
to convergence on mean cross-entropy + L2, as ``influence.py``), and a tiny GPT on standard-library docstrings
(``examples/gpt_influence.py``; full-batch AdamW for a fixed number of steps). For each model, every method scores
the same trained checkpoint, the same training set and the same queries (``lds_methods.py`` lists the methods and
their settings: ours -- identity, K-FAC, EK-FAC, M-FAC at default damping; kronfluence EK-FAC / K-FAC / diagonal;
TRAK (traker, CPU ``BasicProjector``); dattri's influence function (explicit inverse, CG) and TracIn; and an exact
Hessian reference on the logistic regression). No setting was tuned on the evaluation subsets: every package
runs at its defaults, except where ``lds_methods.py`` says otherwise.

LDS (linear datamodeling score, Park et al. 2023): ``--subsets`` random subsets holding ``--fraction`` (50%) of the
training set; a model is retrained on each with the same initial weights and recipe as the full model; per query,
the Spearman correlation over subsets between ``sum_{j in S_k} score[q, j]`` and ``-loss_q(S_k)``, averaged over
queries (``influence.py``'s ``lds_per_query`` / ``summarise``); +- is the standard error over queries. The paired
difference ours EK-FAC minus each other method (per query, same subsets) is reported with its standard error.
Times: fit (factors / features / Hessian; dattri's ``cache`` keeps the data only: its inverse-Hessian work and
TracIn's gradients count as scoring) and scoring, one run each after a warm-up of ours and the peers' imports,
``--threads`` threads.

A peer package that is not installed, or that fails on a model, is recorded as not run with the reason (the run
goes on). Writes ``lds_peers.json`` and ``lds_peers.png`` (``--quick``: ``lds_peers_quick.*``, 8 subsets, 10
queries, logistic regression and MLP only) to ``--out-dir`` (default ``benchmarks/cpu/results``).

    python benchmarks/cpu/lds_peers.py [--quick] [--threads 2] [--models logreg,mlp,lm] [--subsets 100]
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # silence the peers' progress bars (tqdm reads this when first imported)
    os.environ.setdefault("TQDM_DISABLE", "1")
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing: `kfac` and `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))
from benchmarks.common import add_raw_argument, log, machine_info, save_png, write_results  # noqa: E402
from benchmarks.cpu.influence import lds_per_query, summarise  # noqa: E402
from benchmarks.cpu.lds_methods import METHODS, NOT_FOR, PEER_VERSIONS, available, version  # noqa: E402
from benchmarks.cpu.lds_setups import TRACIN_CHECKPOINTS, build, retrain_subsets  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("logreg", "mlp", "lm")
RAW_KEYS: tuple[tuple[str, ...], ...] = (("models", "*", "methods", "*", "lds_per_query"),
                                         ("models", "*", "model", "query_test_indices"))
PEER_IMPORTS = {"kronfluence": ("kronfluence.analyzer",), "trak": ("trak", "trak.projectors"),
                "dattri": ("dattri.task", "dattri.algorithm.influence_function", "dattri.algorithm.tracin")}
GOAL_MARGIN = 0.02
"""Goal: our EK-FAC within this LDS of exact influence on the logistic regression."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 8 subsets, 10 queries, logreg and mlp")
    p.add_argument("--models", default=None, help="comma-separated subset of logreg,mlp,lm (quick: logreg,mlp)")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    p.add_argument("--subsets", type=int, default=None, help="subset models per digits model (default 100, quick 8)")
    p.add_argument("--lm-subsets", type=int, default=None, help="subset models for the GPT (default 100, quick 6)")
    p.add_argument("--fraction", type=float, default=0.5, help="fraction of the training set in each subset")
    p.add_argument("--queries", type=int, default=None, help="digits test queries (default 100, quick 10)")
    p.add_argument("--hidden", type=int, default=128, help="MLP hidden width")
    p.add_argument("--weight-decay", type=float, default=1e-3, help="L2 coefficient of the digits objective")
    p.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations per digits model (at most)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size of fitting and scoring (digits)")
    p.add_argument("--lm-chars", type=int, default=16000, help="characters of the docstring corpus (GPT)")
    p.add_argument("--lm-seq-len", type=int, default=24, help="sequence length (GPT)")
    p.add_argument("--lm-queries", type=int, default=40, help="held-out query sequences (GPT; at most a quarter)")
    p.add_argument("--lm-steps", type=int, default=125,
                   help="full-batch AdamW steps per GPT (where the held-out query loss stops falling: 2.75/token)")
    p.add_argument("--lm-lr", type=float, default=3e-3, help="AdamW learning rate (GPT)")
    p.add_argument("--lm-weight-decay", type=float, default=0.0, help="AdamW weight decay (GPT)")
    p.add_argument("--lm-batch-size", type=int, default=32, help="batch size of fitting and scoring (GPT)")
    p.add_argument("--trak-proj-dim", type=int, default=2048, help="TRAK's projection dimension (its default)")
    p.add_argument("--cg-iters", type=int, default=None, help="dattri CG iterations (default 100, quick 20)")
    p.add_argument("--solver-iters", type=int, default=20, help="most CG iterations of ours_ekfac_{ggn,hessian}")
    p.add_argument("--seed", type=int, default=0, help="initial weights, subsets, queries, sampled labels")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="where lds_peers[_quick].{json,png} go")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    add_raw_argument(p, "lds_peers[_quick]")
    a = p.parse_args(argv)
    a.models = (a.models or ("logreg,mlp" if a.quick else ",".join(MODELS))).split(",")
    a.methods = a.methods.split(",") if a.methods else list(METHODS)
    a.subsets = a.subsets or (8 if a.quick else 100)
    a.lm_subsets = a.lm_subsets or (6 if a.quick else 100)
    a.queries = a.queries or (10 if a.quick else 100)
    a.cg_iters = a.cg_iters or (20 if a.quick else 100)
    if set(a.models) - set(MODELS) or set(a.methods) - set(METHODS):
        p.error(f"--models from {MODELS}, --methods from {tuple(METHODS)}")
    if min(a.subsets, a.lm_subsets) < 3 or a.queries < 1 or not 0 < a.fraction < 1 or a.threads < 1:
        p.error("need --subsets/--lm-subsets >= 3, --queries >= 1, 0 < --fraction < 1, --threads >= 1")
    return a


def run_methods(setting: Any, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Every method on the setting's trained model; a method that is absent or fails is recorded as not run."""
    records, scores = {}, {}
    METHODS["ours_identity"][2](setting, args)  # warm-up (first-call overheads), not timed
    for package in PEER_IMPORTS:  # imports are not timed either
        if available(package):
            for module in PEER_IMPORTS[package]:
                importlib.import_module(module)
    for name in args.methods:
        package, label, runner = METHODS[name]
        rec: dict[str, Any] = {"label": label, "package": package,
                               "package_version": version(package) if package else None}
        reason = NOT_FOR.get(name, {}).get(setting.name)
        if reason is None and package and not available(package):
            reason = f"{package} is not installed (pip install {package if package != 'trak' else 'traker'}"\
                     f"=={PEER_VERSIONS[package]})"
        if reason is None:
            try:
                s, fit_s, score_s, notes = runner(setting, args)
                s = s.detach().float()
                if tuple(s.shape) != (len(setting.query_data[0]), setting.n_train) or not bool(s.isfinite().all()):
                    raise ValueError(f"scores of shape {tuple(s.shape)}, finite: {bool(s.isfinite().all())}")
                scores[name] = s
                rec.update(ran=True, fit_s=fit_s, score_s=score_s, settings=notes)
                log(f"  {setting.name:<7}{name:<28} fit {fit_s:8.3f}s  score {score_s:8.3f}s")
            except Exception as exc:  # a peer that cannot run here: recorded, the benchmark goes on
                reason = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                log(f"  {setting.name:<7}{name:<28} {reason}")
                rec["traceback_tail"] = traceback.format_exc().splitlines()[-4:]
        if reason is not None:
            rec.update(ran=False, reason=reason)
        records[name] = rec
    return records, scores


def evaluate(setting: Any, records: dict[str, Any], scores: dict[str, torch.Tensor]) -> dict[str, Any]:
    """LDS of each method that ran, and the paired difference of ours EK-FAC against each other one."""
    corrs = {}
    for name, s in scores.items():
        corrs[name] = corr = lds_per_query(s, setting.masks, setting.losses)
        records[name].update(summarise(corr, setting.n_wrong))
        records[name]["lds_per_query"] = [None if math.isnan(c) else round(float(c), 5) for c in corr]
    paired = {}
    if "ours_ekfac" in corrs:
        for other, corr in corrs.items():
            if other != "ours_ekfac":
                d = corrs["ours_ekfac"] - corr
                d = d[~d.isnan()]
                paired[f"ours_ekfac-{other}"] = {
                    "mean": float(d.mean()), "se": float(d.std() / math.sqrt(len(d))) if len(d) > 1 else math.nan,
                    "ekfac_better_on": int((d > 0).sum()), "queries": len(d)}
    return paired


def goals(models: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals, checked on the measured LDS of our EK-FAC (the direct map, and refined by CG towards the
    exact Gauss-Newton matrix or Hessian) -- None where a method needed for the check did not run."""
    out: dict[str, Any] = {}
    for ours, label in (("ours_ekfac", "EK-FAC"), ("ours_ekfac_ggn", "EK-FAC + CG on the GGN"),
                        ("ours_ekfac_hessian", "EK-FAC + CG on the Hessian")):
        for mname, m in models.items():
            meth = m["methods"]
            lds = meth.get(ours, {}).get("lds")
            peers = {k: v["lds"] for k, v in meth.items() if v.get("ran") and v["package"] is not None}
            out[f"{mname}: ours {label} >= every peer"] = None if lds is None or not peers else {
                "met": all(lds >= v for v in peers.values()), ours: lds,
                "peers_above": {k: v for k, v in peers.items() if v > lds}}
        m = models.get("logreg", {}).get("methods", {})
        for ref in ("exact", "dattri_if_explicit"):
            if m.get(ref, {}).get("ran") and m.get(ours, {}).get("ran"):
                gap = m[ref]["lds"] - m[ours]["lds"]
                out[f"logreg: ours {label} within {GOAL_MARGIN} of {ref}"] = {"met": gap <= GOAL_MARGIN, "gap": gap}
    return out


def format_table(models: dict[str, Any]) -> str:
    head = f"{'model':<8}{'method':<30}{'LDS':>8}{'+-SE':>7}{'fit [s]':>10}{'score [s]':>11}  note"
    lines = [head, "-" * len(head)]
    for mname, m in models.items():
        for name, r in m["methods"].items():
            if r["ran"]:
                lines.append(f"{mname:<8}{name:<30}{r['lds']:>8.3f}{r['lds_se']:>7.3f}{r['fit_s']:>10.3f}"
                             f"{r['score_s']:>11.3f}")
            else:
                lines.append(f"{mname:<8}{name:<30}{'not run':>8}{'':>28}  {r['reason'][:80]}")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    fig, axes = plt.subplots(len(models), 1, figsize=(11, 3.7 * len(models)), squeeze=False)
    for ax, (mname, m) in zip(axes[:, 0], models.items()):
        ran = [(k, r) for k, r in m["methods"].items() if r["ran"]]
        colors = ["tab:gray" if k == "exact" else "tab:blue" if r["package"] is None else "tab:orange" for k, r in ran]
        ax.bar(range(len(ran)), [r["lds"] for _, r in ran], yerr=[r["lds_se"] for _, r in ran], capsize=3,
               color=colors)
        for i, (_, r) in enumerate(ran):
            ax.text(i, 0, f"{r['fit_s'] + r['score_s']:.2g}s", ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_xticks(range(len(ran)), [k for k, _ in ran], rotation=25, ha="right", fontsize=8)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_ylabel("LDS (+-SE over queries)")
        ax.set_title(f"{m['model']['description']}: {m['subsets']['count']} subset models, {m['queries']} queries\n"
                     "(blue: ours; orange: peers; grey: exact-Hessian reference; text: fit + score time)", fontsize=9)
    fig.suptitle(f"LDS by method, {results['machine']['cpu_model']}, {results['machine']['threads']} thread(s)",
                 fontsize=10)
    fig.tight_layout()
    save_png(fig, path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    log("peers: " + ", ".join(f"{p} {version(p) or 'not installed'}" for p in PEER_VERSIONS))
    models: dict[str, Any] = {}
    for mname in args.models:
        setting = build(mname, args)
        log(f"{mname}: {setting.description}; trained in {setting.info['wall_s']:.1f}s")
        records, scores = run_methods(setting, args)
        count = args.lm_subsets if mname == "lm" else args.subsets
        retrain_subsets(setting, count, args.fraction, args.seed, log)
        paired = evaluate(setting, records, scores)
        info = {k: v for k, v in setting.info.items()}
        models[mname] = {"model": {"description": setting.description, "n_train": setting.n_train, **info},
                         "queries": len(setting.query_data[0]), "misclassified_queries": setting.n_wrong,
                         "subsets": setting.subsets, "methods": records, "paired_lds_differences": paired}
    results: dict[str, Any] = {
        "benchmark": "lds_peers", "quick": args.quick,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine_info(threads=torch.get_num_threads(), load_avg_1_5_15_start=load_start,
                                load_avg_1_5_15_end=os.getloadavg() if hasattr(os, "getloadavg") else None,
                                peers={p: version(p) for p in PEER_VERSIONS}),
        "lds_definition": "mean over queries q of Spearman_k( sum_{j in S_k} score[q, j], -loss_q(model trained on "
                          "S_k) ); score > 0 = upweighting j lowers the query's loss; +-: standard error over queries",
        "tracin_checkpoints": TRACIN_CHECKPOINTS, "models": models, "goals": goals(models),
        "total_s": time.perf_counter() - t0,
    }
    log("\n" + format_table(models))
    for mname, m in models.items():
        log(f"{mname} paired (ours EK-FAC - other): " + ", ".join(
            f"{k.split('-', 1)[1]} {v['mean']:+.3f}+-{v['se']:.3f}" for k, v in m["paired_lds_differences"].items()))
    for goal, verdict in results["goals"].items():
        log(f"goal {goal}: {'not checked' if verdict is None else ('MET' if verdict['met'] else 'NOT MET')} "
            f"{'' if verdict is None else {k: v for k, v in verdict.items() if k != 'met'}}")
    stem = "lds_peers" + ("_quick" if args.quick else "")
    write_results(args.out_dir / f"{stem}.json", results, RAW_KEYS, raw=args.raw, embed_raw=args.quick, indent=1)
    if not args.no_plot:
        plot(results, args.out_dir / f"{stem}.png")
        log(f"wrote {args.out_dir / (stem + '.png')}")
    log(f"({time.perf_counter() - t0:.1f}s)")
    return results


if __name__ == "__main__":
    main()
