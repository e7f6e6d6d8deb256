"""How the K-FAC sharding plans scale: ResNet-50 and BERT-Large at N = 8 ... 1024 ranks.

For each model, world size, strategy (dp-kfac, comm-opt, mem-opt, hybrid f=0.5) and assigner (the planner's LPT,
DP-KFAC's round-robin, KAISA's greedy) it prints makespan / lower bound, the largest per-rank memory and the bytes
sent per step, as predicted by the planner's cost model (``CostModel.default()``, or ``--calibrate`` to time this
device). Writes ``benchmarks/results/planner_scale.json`` and ``planner_scale.png``.

    python benchmarks/planner_scale.py [--factor-update-steps 1] [--inv-update-steps 10] [--calibrate]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kfac.planner import CostModel, LayerSpec, calibrate, layer_specs, make_plan

RESULTS = Path(__file__).resolve().parent / "results"
WORLD_SIZES = (8, 64, 256, 1024)
CONFIGS = [  # (label, strategy, assigner, extra kwargs)
    ("dp-kfac/lpt", "dp-kfac", "lpt", {}),
    ("dp-kfac/round-robin", "dp-kfac", "round-robin", {}),
    ("dp-kfac/kaisa-greedy", "dp-kfac", "kaisa-greedy", {}),
    ("comm-opt/lpt", "comm-opt", "lpt", {}),
    ("comm-opt/round-robin", "comm-opt", "round-robin", {}),
    ("comm-opt/kaisa-greedy", "comm-opt", "kaisa-greedy", {}),
    ("mem-opt/lpt", "mem-opt", "lpt", {}),
    ("mem-opt/round-robin", "mem-opt", "round-robin", {}),
    ("mem-opt/kaisa-greedy", "mem-opt", "kaisa-greedy", {}),
    ("hybrid-0.5/lpt", "hybrid", "lpt", {"grad_worker_fraction": 0.5}),
]


def bert_large_specs() -> list[LayerSpec]:
    """BERT-Large (uncased) K-FAC shapes without downloading anything: embeddings (diagonal A) and 24 encoder
    layers of q, k, v, o (1024 -> 1024), intermediate (1024 -> 4096) and output (4096 -> 1024), all with bias."""
    h, ff = 1024, 4096
    specs = [LayerSpec("embeddings.word_embeddings", 30522, h, a_diagonal=True),
             LayerSpec("embeddings.position_embeddings", 512, h, a_diagonal=True),
             LayerSpec("embeddings.token_type_embeddings", 2, h, a_diagonal=True)]
    for i in range(24):
        p = f"encoder.layer.{i}"
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            specs.append(LayerSpec(f"{p}.{name}", h + 1, h))
        specs.append(LayerSpec(f"{p}.intermediate.dense", h + 1, ff))
        specs.append(LayerSpec(f"{p}.output.dense", ff + 1, h))
    return specs


def resnet50_specs() -> list[LayerSpec]:
    import torchvision

    return layer_specs(torchvision.models.get_model("resnet50", weights=None))


def run(cost: CostModel, fu: int, iu: int) -> dict:
    models = {"resnet50": resnet50_specs(), "bert-large": bert_large_specs()}
    rows = []
    for model, specs in models.items():
        for n in WORLD_SIZES:
            for label, strategy, assigner, kw in CONFIGS:
                t0 = time.perf_counter()
                plan = make_plan(specs, n, strategy, assigner=assigner, cost_model=cost, factor_update_steps=fu,
                                 inv_update_steps=iu, **kw)
                rows.append({
                    "model": model, "layers": len(specs), "world_size": n, "config": label, "strategy": strategy,
                    "assigner": assigner, "split": plan.split, "makespan_s": plan.makespan,
                    "lower_bound_s": plan.lower_bound, "imbalance": plan.imbalance,
                    "max_rank_memory_bytes": max(plan.rank_memory), "idle_ranks": len(plan.idle_ranks),
                    "bytes_per_step": plan.comm.total, "comm": plan.comm.to_dict(),
                    "plan_seconds": time.perf_counter() - t0, "digest": plan.digest(),
                })
    # dp-kfac / comm-opt traffic at factor_update_steps=1 for several refresh intervals
    ratios = []
    for model, specs in models.items():
        for n in WORLD_SIZES:
            for r_iu in (1, 10, 100):
                dp = make_plan(specs, n, "dp-kfac", cost_model=cost, factor_update_steps=1, inv_update_steps=r_iu)
                co = make_plan(specs, n, "comm-opt", cost_model=cost, factor_update_steps=1, inv_update_steps=r_iu)
                ratios.append({"model": model, "world_size": n, "inv_update_steps": r_iu,
                               "dp_kfac_bytes": dp.comm.total, "comm_opt_bytes": co.comm.total,
                               "ratio": dp.comm.total / co.comm.total})
    return {"cost_model": cost.to_dict(), "factor_update_steps": fu, "inv_update_steps": iu, "rows": rows,
            "dp_over_comm_opt_bytes_fu1": ratios}


def print_table(result: dict) -> None:
    print(f"cost model: {result['cost_model']['source']}  factor_update_steps={result['factor_update_steps']}  "
          f"inv_update_steps={result['inv_update_steps']}")
    head = (f"{'model':<11}{'N':>6}  {'config':<22}{'split':>6}{'makespan ms':>13}{'mk/LB':>8}{'idle':>6}"
            f"{'max mem MiB':>13}{'GiB/step':>11}{'plan s':>8}")
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        print(f"{r['model']:<11}{r['world_size']:>6}  {r['config']:<22}{'yes' if r['split'] else 'no':>6}"
              f"{r['makespan_s'] * 1e3:>13.2f}{r['imbalance']:>8.3f}{r['idle_ranks']:>6}"
              f"{r['max_rank_memory_bytes'] / 2**20:>13.1f}{r['bytes_per_step'] / 2**30:>11.2f}"
              f"{r['plan_seconds']:>8.3f}")
    print()
    print("dp-kfac bytes/step divided by comm-opt bytes/step (factor_update_steps=1):")
    print(f"{'model':<11}{'N':>6}{'iu=1':>8}{'iu=10':>8}{'iu=100':>8}")
    by_key: dict[tuple[str, int], dict[int, float]] = {}
    for r in result["dp_over_comm_opt_bytes_fu1"]:
        by_key.setdefault((r["model"], r["world_size"]), {})[r["inv_update_steps"]] = r["ratio"]
    for (model, n), vals in by_key.items():
        print(f"{model:<11}{n:>6}" + "".join(f"{vals[k]:>8.3f}" for k in (1, 10, 100)))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in result["rows"]))
    configs = [c[0] for c in CONFIGS]
    fig, axes = plt.subplots(len(models), 3, figsize=(16, 4.2 * len(models)), squeeze=False)
    metrics = [("imbalance", "makespan / lower bound", False),
               ("max_rank_memory_bytes", "max memory per rank (GiB)", True),
               ("bytes_per_step", "bytes sent per step, all ranks (GiB)", True)]
    for i, model in enumerate(models):
        for j, (key, title, log) in enumerate(metrics):
            ax = axes[i][j]
            for c in configs:
                pts = [(r["world_size"], r[key]) for r in result["rows"] if r["model"] == model and r["config"] == c]
                xs, ys = zip(*pts)
                if key != "imbalance":
                    ys = [y / 2**30 for y in ys]
                style = "-" if c.endswith("/lpt") else (":" if "round-robin" in c else "--")
                ax.plot(xs, ys, style, marker="o", ms=3, label=c)
            ax.set_xscale("log", base=2)
            if log:
                ax.set_yscale("log")
            ax.set_title(f"{model}: {title}", fontsize=10)
            ax.set_xlabel("world size N")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"K-FAC sharding plans (fu={result['factor_update_steps']}, iu={result['inv_update_steps']}, "
                 f"cost model: {result['cost_model']['source']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--factor-update-steps", type=int, default=1)
    ap.add_argument("--inv-update-steps", type=int, default=10)
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args()
    cost = calibrate() if args.calibrate else CostModel.default()
    result = run(cost, args.factor_update_steps, args.inv_update_steps)
    print_table(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "planner_scale.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    if not args.no_plot:
        plot(result, RESULTS / "planner_scale.png")
    written = [RESULTS / "planner_scale.json"] + ([] if args.no_plot else [RESULTS / "planner_scale.png"])
    print("\nwrote " + " and ".join(map(str, written)))


if __name__ == "__main__":
    main()
