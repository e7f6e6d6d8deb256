"""The distributed benchmark's PNG: step time, bytes on the wire and memory per configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.common import save_png
from benchmarks.cpu.strategies.configs import PLAN_CATEGORIES
from benchmarks.cpu.strategies.report import byte_unit


def plot(rows: list[dict[str, Any]], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["config"] for r in rows]
    xs = list(range(len(rows)))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))

    ax = axes[0]
    med = [r["ms_per_step_median"] for r in rows]
    mean = [r["ms_per_step_mean"] for r in rows]
    w = 0.38
    ax.bar([x - w / 2 for x in xs], med, w, label="median step (typical)", color="tab:blue")
    ax.bar([x + w / 2 for x in xs], mean, w, label="mean step (amortised, incl. refresh)", color="tab:orange")
    for x, m in zip(xs, mean):
        ax.annotate(f"{m:.0f}", (x + w / 2, m), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=7)
    ax.set_xticks(xs, labels, rotation=15)
    ax.set_ylabel("ms / step (oversubscribed: relative only)")
    ax.set_title("wall time per step")
    ax.set_ylim(0, max(mean + med) * 1.25)
    ax.legend(fontsize=7, loc="upper right")

    ax = axes[1]
    bu, bd = byte_unit(max(r["kfac_bytes_per_step_total"] + r["ddp_allreduce_bytes_per_step"] for r in rows))
    cats = [("factors", "K-FAC factors", "tab:blue"), ("decompositions", "K-FAC decompositions", "tab:green"),
            ("gradients", "K-FAC precond. gradients", "tab:red")]
    bottom = [0.0] * len(rows)
    for key, name, color in cats:
        vals = [r["kfac_bytes_per_step"].get(key, 0.0) / bd for r in rows]
        ax.bar(xs, vals, 0.6, bottom=bottom, label=name, color=color)
        bottom = [b + v for b, v in zip(bottom, vals)]
    other = [sum(v for k, v in r["kfac_bytes_per_step"].items() if k not in PLAN_CATEGORIES) / bd for r in rows]
    ax.bar(xs, other, 0.6, bottom=bottom, label="K-FAC other (counts, flags)", color="tab:gray")
    bottom = [b + v for b, v in zip(bottom, other)]
    ddp = [r["ddp_allreduce_bytes_per_step"] / bd for r in rows]
    ax.bar(xs, ddp, 0.6, bottom=bottom, label="DDP gradient all-reduce", color="tab:purple", alpha=0.6)
    top = [b + d for b, d in zip(bottom, ddp)]
    pred = [(x, (r["predicted_bytes_per_step_total"] + r["ddp_allreduce_bytes_per_step"]) / bd)
            for x, r in zip(xs, rows) if r["kfac"]]
    if pred:
        ax.scatter([p[0] for p in pred], [p[1] for p in pred], marker="_", s=600, color="black", zorder=5,
                   label="plan prediction (+ DDP)")
    for x, t in zip(xs, top):
        ax.annotate(f"{t:.0f}" if t >= 100 else f"{t:.3g}", (x, t), textcoords="offset points", xytext=(0, 2),
                    ha="center", fontsize=7)
    ax.set_xticks(xs, labels, rotation=15)
    ax.set_ylabel(f"{bu} / step, sum over ranks")
    ax.set_title("bytes on the wire per step (measured)")
    ax.set_ylim(0, max(top) * 1.6)
    ax.legend(fontsize=7, loc="upper right", ncol=2)

    ax = axes[2]
    krows = [r for r in rows if r["kfac"]]
    mu, md = byte_unit(max([r["memory_bytes_max"] for r in krows], default=0))
    kx = list(range(len(krows)))
    ax.bar(kx, [r["memory_bytes_max"] / md for r in krows], 0.6, color="tab:cyan", label="max over ranks (measured)")
    ax.scatter(kx, [r["predicted_memory_bytes_max"] / md for r in krows], marker="_", s=600, color="black",
               zorder=5, label="plan prediction (max)")
    for x, r in zip(kx, krows):
        ax.annotate(f"{r['memory_bytes_max'] / md:.0f}\n(sum {r['memory_bytes_sum'] / md:.0f})",
                    (x, r["memory_bytes_max"] / md), textcoords="offset points", xytext=(0, 2), ha="center",
                    fontsize=7)
    ax.set_xticks(kx, [r["config"] for r in krows], rotation=15)
    ax.set_ylabel(mu)
    ax.set_title("K-FAC factors + decompositions per rank\n(bar, label: max over ranks; sum over ranks)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_ylim(0, max(r["memory_bytes_max"] for r in krows) / md * 1.3 if krows else 1)

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)


def plot_title(result: dict[str, Any]) -> str:
    st, m = result["settings"], result["machine"]
    sub = "OVERSUBSCRIBED" if result["oversubscribed"] else "not oversubscribed"
    launcher = (result.get("launcher") or {}).get("name", "spawn")
    return (f"{result['model']}: DDP + kfac.KFAC strategies, {st['world_size']} gloo ranks ({launcher}) x "
            f"{st['threads']} thread "
            f"on {result['usable_cores']} cores ({sub}), per-rank batch {st['per_rank_batch']}, "
            f"F={st['factor_update_steps']}, I={st['inv_update_steps']}, "
            f"{st['repeats']} x {st['window']} timed steps, synthetic data\n{m['cpu_model']}, torch {m['torch']}, "
            f"{m['date_utc']}")

