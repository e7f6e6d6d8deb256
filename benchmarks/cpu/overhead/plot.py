"""The step-overhead benchmark's PNG: K-FAC's step time relative to SGD per schedule and method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.common import save_png
from benchmarks.cpu.overhead.configs import KAISA_METHODS, KAISA_REFERENCE, METHODS, TRUNCATE


def plot(rows: list[dict[str, Any]], path: Path, *, title: str, show_reference: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schedules = list(dict.fromkeys(r["schedule"] for r in rows))
    methods = [m for m in METHODS + ("eigen-truncated",) + KAISA_METHODS
               if m != "sgd" and any(r["method"] == m for r in rows)]
    show_reference = show_reference and not any(m in KAISA_METHODS for m in methods)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"eigen": "tab:blue", "inverse": "tab:orange", "eigen-truncated": "tab:green", "kaisa-eigen": "tab:cyan", "kaisa-inverse": "tab:red"}
    ref_labelled = False
    for j, method in enumerate(methods):
        xs, ys, lo, hi = [], [], [], []
        for i, sch in enumerate(schedules):
            row = next(r for r in rows if r["schedule"] == sch and r["method"] == method)
            x = i + (j - (len(methods) - 1) / 2) * width
            xs.append(x)
            ys.append(row["ratio_vs_sgd"])
            lo.append(max(row["ratio_vs_sgd"] - row["ratio_vs_sgd_paired_min"], 0))
            hi.append(max(row["ratio_vs_sgd_paired_max"] - row["ratio_vs_sgd"], 0))
            top = max(row["ratio_vs_sgd"], row["ratio_vs_sgd_paired_max"])
            ax.annotate(f"{row['ratio_vs_sgd']:.1f}x", (x, top), textcoords="offset points",
                        xytext=(0, 3), ha="center", fontsize=8)
            ref = KAISA_REFERENCE.get((row["factor_update_steps"], row["inv_update_steps"]))
            if show_reference and method == "eigen" and ref is not None:
                ax.hlines(ref, x - width / 2, x + width / 2, colors="crimson", linestyles="--", lw=2, zorder=5,
                          label=None if ref_labelled else
                          "KAISA eigen: reported reference, not measured in this run")
                ax.annotate(f"KAISA {ref:g}x\n(reported, not measured)", (x, ref), textcoords="offset points",
                            xytext=(0, 4), ha="center", fontsize=7, color="crimson", zorder=6,
                            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})
                ref_labelled = True
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, color=colors[method],
               label=(f"KAISA compute_method={method.removeprefix('kaisa-')} (measured)" if method in KAISA_METHODS
                      else f"kfac.KFAC method=eigen, truncate={TRUNCATE.get('truncate')} (measured)"
                      if method == "eigen-truncated" else f"kfac.KFAC method={method} (measured)"))
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(range(len(schedules)), [f"{s}\n(factor_update_steps, inv_update_steps)" for s in schedules])
    ax.set_ylabel("ms/step relative to plain SGD (median)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_ylim(0, max([r["ratio_vs_sgd_paired_max"] for r in rows] + (
        list(KAISA_REFERENCE.values()) if show_reference else [])) * 1.15)
    fig.tight_layout()
    save_png(fig, path, dpi=120)
    plt.close(fig)


def plot_title(result: dict[str, Any]) -> str:
    st, m = result["settings"], result["machine"]
    size = result.get("image_size", 32)
    return (f"kfac.KFAC per-step time / SGD: {result['model']}, {size}x{size}, batch {result['batch_size']}, "
            f"CPU, {st['threads']} thread(s)\n{m['cpu_model']}, torch {m['torch']}, synthetic data, "
            f"median of {st['repeats']} (error bars: paired per-repeat min-max)")


