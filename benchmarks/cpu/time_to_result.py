"""Time to result: adaptive K-FAC (no tuning) against tuned first-order optimizers and tuned K-FAC (issue 14).

Workloads (real data, offline: scikit-learn's bundled digits, 1797 8x8 images scaled to [0, 1]):

* ``autoencoder``: the Hinton & Salakhutdinov / Martens & Grosse deep autoencoder scaled to 8x8 images,
  64-128-64-32-8-32-64-128-64 with tanh, Bernoulli loss (``binary_cross_entropy_with_logits`` on the pixel
  intensities), batch 256. Measured: the full-data training loss.
* ``classification``: an MLP 64-256-256-10 (tanh), cross-entropy, large batch 512 on a fixed 1437/360 split.
  Measured: test accuracy.

Optimizers: SGD with momentum 0.9, AdamW (weight decay 0), ``torch.optim.Muon`` on the weight matrices with AdamW
on the rest (as its docs recommend; where this torch has it), SOAP from ``pytorch-optimizer`` (its default betas
and preconditioning frequency, weight decay 0; the ``benchmarks`` extra, skipped with a note without it), K-FAC eigen around SGD momentum 0.9 (library
defaults otherwise), each at its own learning rate chosen from a grid on a separate tuning seed (best final
metric), and adaptive K-FAC (``kfac.KFAC(..., adaptive=True)``) with no tuning at all. Every optimizer gets the same
model initialisation, data order and step budget per seed; evaluation seeds differ from the tuning seed.

Reported per workload: the target (the best first-order peer's median final metric), and per optimizer the median
over seeds of the final metric, the steps to reach the target and the training wall time to reach it (evaluation
excluded), with ratios to the best peer; a JSON summary and a PNG of the median curves.

    python benchmarks/cpu/time_to_result.py                 # both workloads, 3 seeds (~5 minutes on 2 cores)
    python benchmarks/cpu/time_to_result.py --quick         # smoke test
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import kfac  # noqa: E402
from benchmarks.common import machine_info, save_png, write_json  # noqa: E402
from kfac.adaptive.controller import AdaptiveConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def mlp(dims: list[int], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


class Workload:
    def __init__(self, name: str, steps: int, eval_every: int) -> None:
        self.name, self.steps, self.eval_every = name, steps, eval_every
        self.x, self.y = digits()
        g = torch.Generator().manual_seed(1234)
        perm = torch.randperm(len(self.x), generator=g)
        self.train, self.test = perm[:1437], perm[1437:]
        if name == "autoencoder":
            self.dims, self.batch, self.loss_kind, self.higher_is_better = [64, 128, 64, 32, 8, 32, 64, 128, 64], 256, \
                "bernoulli", False
        else:
            self.dims, self.batch, self.loss_kind, self.higher_is_better = [64, 256, 256, 10], 512, \
                "cross_entropy", True

    def loss(self, model: nn.Module, idx: Tensor) -> Tensor:
        x = self.x[idx]
        if self.name == "autoencoder":
            return F.binary_cross_entropy_with_logits(model(x), x)
        return F.cross_entropy(model(x), self.y[idx])

    @torch.no_grad()
    def metric(self, model: nn.Module) -> float:
        if self.name == "autoencoder":
            return float(F.binary_cross_entropy_with_logits(model(self.x), self.x))
        return float((model(self.x[self.test]).argmax(1) == self.y[self.test]).float().mean())


def make(kind: str, model: nn.Module, lr: float | None, wl: Workload) -> Any:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    if kind == "muon":
        mats = [p for p in model.parameters() if p.dim() == 2]
        rest = [p for p in model.parameters() if p.dim() != 2]
        return [torch.optim.Muon(mats, lr=lr), torch.optim.AdamW(rest, lr=1e-3, weight_decay=0.0)]
    if kind == "soap":
        from pytorch_optimizer import SOAP

        return SOAP(model.parameters(), lr=lr, weight_decay=0.0)
    if kind == "kfac":
        return kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
    if kind == "adaptive":
        return kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=1.0), adaptive=AdaptiveConfig(loss=wl.loss_kind))
    raise ValueError(kind)


def run(kind: str, lr: float | None, wl: Workload, seed: int) -> dict[str, Any]:
    model = mlp(wl.dims, seed)
    opt = make(kind, model, lr, wl)
    opts = opt if isinstance(opt, list) else [opt]
    g = torch.Generator().manual_seed(seed)
    curve, times, elapsed = [wl.metric(model)], [0.0], 0.0
    for step in range(1, wl.steps + 1):
        idx = wl.train[torch.randint(0, len(wl.train), (wl.batch,), generator=g)]
        start = time.perf_counter()
        if kind == "adaptive":
            opt.step(lambda: wl.loss(model, idx))
        else:
            for o in opts:
                o.zero_grad()
            wl.loss(model, idx).backward()
            for o in opts:
                o.step()
        elapsed += time.perf_counter() - start
        if step % wl.eval_every == 0:
            value = wl.metric(model)
            curve.append(value if math.isfinite(value) else float("nan"))
            times.append(elapsed)
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    return {"curve": curve, "times": times, "final": curve[-1], "finite": bool(finite)}


def better(a: float, b: float, higher: bool) -> bool:
    if math.isnan(a):
        return False
    return a > b if higher else a < b


def tune(kind: str, grid: list[float], wl: Workload, seed: int) -> float:
    scores = {lr: run(kind, lr, wl, seed)["final"] for lr in grid}
    best = None
    for lr, value in scores.items():
        if best is None or better(value, scores[best], wl.higher_is_better):
            best = lr
    print(f"  {wl.name:14s} {kind:9s} tuned lr {best:g}  (grid: " +
          ", ".join(f"{lr:g}: {v:.4g}" for lr, v in scores.items()) + ")", flush=True)
    return float(best if best is not None else grid[0])


def reached(run_: dict[str, Any], target: float, wl: Workload) -> tuple[float, float]:
    """(steps, seconds) to the first evaluation at or past ``target`` (nan if never)."""
    for i, value in enumerate(run_["curve"]):
        if not math.isnan(value) and (value >= target if wl.higher_is_better else value <= target):
            return float(i * wl.eval_every), float(run_["times"][i])
    return float("nan"), float("nan")


def median(values: list[float]) -> float:
    """Median over seeds, a run that never reached the target counting as infinitely late (nan: the median run
    did not reach it)."""
    value = statistics.median(math.inf if math.isnan(v) else v for v in values)
    return float("nan") if math.isinf(value) else value


GRIDS = {"sgd": [0.03, 0.1, 0.3, 1.0, 3.0, 10.0], "adamw": [1e-3, 3e-3, 1e-2, 3e-2], "muon": [0.01, 0.03, 0.1, 0.3],
         "soap": [1e-3, 3e-3, 1e-2, 3e-2], "kfac": [0.03, 0.1, 0.3, 1.0, 3.0, 10.0]}
PEERS = ("sgd", "adamw", "muon", "soap")


def available(kind: str) -> bool:
    """Muon needs torch >= 2.9; SOAP needs the ``benchmarks`` extra (``pip install -e '.[benchmarks]'``)."""
    if kind == "muon":
        return hasattr(torch.optim, "Muon")
    if kind == "soap":
        import importlib.util

        if importlib.util.find_spec("pytorch_optimizer") is None:
            print("note: SOAP skipped (pip install -e '.[benchmarks]' for pytorch-optimizer)")
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny budgets, one seed (smoke test)")
    ap.add_argument("--workloads", nargs="+", default=["autoencoder", "classification"])
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(2)
    kinds = [k for k in ("sgd", "adamw", "muon", "soap", "kfac", "adaptive") if available(k)]
    seeds = list(range(1 if args.quick else args.seeds))
    record: dict[str, Any] = {"machine": machine_info(), "workloads": {}, "seeds": seeds, "tuning_seed": 100}
    for name in args.workloads:
        wl = Workload(name, steps=20 if args.quick else (300 if name == "autoencoder" else 200),
                      eval_every=5 if args.quick else 10)
        lrs = {k: (tune(k, GRIDS[k][:2] if args.quick else GRIDS[k], wl, 100) if k in GRIDS else None) for k in kinds}
        runs = {k: [run(k, lrs[k], wl, s) for s in seeds] for k in kinds}
        finals = {k: median([r["final"] for r in runs[k]]) for k in kinds}
        peers = [k for k in PEERS if k in kinds]
        best_peer = peers[0]
        for k in peers:
            if better(finals[k], finals[best_peer], wl.higher_is_better):
                best_peer = k
        target = finals[best_peer]
        rows = {}
        for k in kinds:
            hits = [reached(r, target, wl) for r in runs[k]]
            rows[k] = {"lr": lrs[k], "final": finals[k], "steps_to_target": median([h[0] for h in hits]),
                       "seconds_to_target": median([h[1] for h in hits]),
                       "seconds_total": statistics.median(r["times"][-1] for r in runs[k]),
                       "diverged_or_non_finite": sum(not r["finite"] or math.isnan(r["final"]) for r in runs[k])}
        ref = rows[best_peer]
        # the first-order peer that reaches the target soonest (it may not be the one with the best final metric)
        fastest = min(peers, key=lambda k: math.inf if math.isnan(rows[k]["steps_to_target"])
                      else rows[k]["steps_to_target"])
        for row in rows.values():
            row["steps_ratio"] = row["steps_to_target"] / ref["steps_to_target"] if ref["steps_to_target"] else None
            row["time_ratio"] = row["seconds_to_target"] / ref["seconds_to_target"] if ref["seconds_to_target"] else None
            row["steps_ratio_fastest_peer"] = row["steps_to_target"] / rows[fastest]["steps_to_target"]
            row["time_ratio_fastest_peer"] = row["seconds_to_target"] / rows[fastest]["seconds_to_target"]
        record["workloads"][name] = {
            "metric": "full-data Bernoulli loss (lower is better)" if name == "autoencoder" else "test accuracy",
            "steps": wl.steps, "batch": wl.batch, "eval_every": wl.eval_every, "target": target,
            "best_peer": best_peer, "fastest_peer": fastest, "rows": rows,
            "median_curves": {k: [median([r["curve"][i] for r in runs[k]]) for i in range(len(runs[k][0]["curve"]))]
                              for k in kinds}}
        print(f"\n{name}: target = best peer ({best_peer}) median final {target:.4g}; fastest peer to it: {fastest}; "
              f"medians over {len(seeds)} seeds")
        print(f"{'optimizer':10s} {'lr':>7s} {'final':>9s} {'steps':>7s} {'x best':>7s} {'x fast':>7s} {'seconds':>8s} "
              f"{'x best':>7s} {'x fast':>7s} {'diverged':>8s}")
        for k, row in rows.items():
            lr = "-" if row["lr"] is None else f"{row['lr']:g}"
            print(f"{k:10s} {lr:>7s} {row['final']:9.4g} {row['steps_to_target']:7.0f} "
                  f"{(row['steps_ratio'] or float('nan')):7.2f} {row['steps_ratio_fastest_peer']:7.2f} "
                  f"{row['seconds_to_target']:8.2f} {(row['time_ratio'] or float('nan')):7.2f} "
                  f"{row['time_ratio_fastest_peer']:7.2f} {row['diverged_or_non_finite']:8d}", flush=True)
    stem = "time_to_result_quick" if args.quick else "time_to_result"
    write_json(args.out_dir / f"{stem}.json", record, indent=1)
    plot(record, args.out_dir / f"{stem}.png")


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(record["workloads"])
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        w = record["workloads"][name]
        for k, curve in w["median_curves"].items():
            ax.plot([i * w["eval_every"] for i in range(len(curve))], curve, label=k)
        ax.axhline(w["target"], color="grey", linestyle=":", label="target")
        ax.set_title(f"{name} (batch {w['batch']})")
        ax.set_xlabel("step")
        ax.set_ylabel(w["metric"])
        if name == "autoencoder":
            ax.set_yscale("log")
        else:  # the interesting part: the last few percent
            ax.set_ylim(max(0.0, w["target"] - 0.08), 1.0)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, path, dpi=90)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
