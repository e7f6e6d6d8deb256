"""``make demo``: K-FAC vs. SGD as 2-process torchrun jobs on the offline digits data, with a table, a plot and
TensorBoard logs.

For each optimizer (default ``sgd``, ``kfac``, ``ekfac``) this launches::

    python -m torch.distributed.run --standalone --nproc-per-node=N examples/torch_cifar10_resnet.py \\
        --model resnet8 --width 16 --batch-size 64 --epochs 8 --lr-schedule cosine ... \\
        --optimizer OPT --log-dir OUT/OPT

(gloo on the CPU; when CUDA GPUs exist, ``N = min(--nproc, GPUs)`` and the example picks NCCL itself). Every run
uses the same model, seed (initial weights, data order, augmentation), global batch and learning-rate schedule, so
the rows differ only by the optimizer. The data is the example's offline default (scikit-learn's bundled
handwritten digits, 1347 train / 450 test, upscaled to 32x32x3; nothing is downloaded).

Then it reads the TensorBoard event files and prints one row per optimizer: the final training loss (mean over
the last ``--log-interval`` steps), the final test accuracy, the wall time of the launch (process start-up
included), the mean time per step and, for K-FAC/EK-FAC, the MiB communicated per step (all ranks together). It
writes ``OUT/demo.png`` (test accuracy and training loss vs. step) and ``OUT/demo.json``, and prints how to open
the logs: ``tensorboard --logdir OUT``.

Then the payoff stage, where second-order optimization pays off: the digits deep autoencoder
(``examples/autoencoder_payoff.py``, same torchrun processes, same seed, data and 300-step budget) by SGD, AdamW and
Muon at the learning rates ``benchmarks/cpu/time_to_result.py`` tuned, and by adaptive K-FAC with nothing to tune;
a table gives each one's final loss and the steps it needs to reach the best first-order final loss, and
``OUT/demo_payoff.png`` the curves. The whole demo takes about two minutes on a 2-core CPU.

Usage::

    python examples/demo.py [--out-dir runs/demo] [--optimizers sgd,kfac,ekfac] [--nproc 2] [--epochs 8]
                            [--quick]          # a few steps of a tiny model: checks the plumbing (tests)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training.cli import HelpFormatter  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent / "torch_cifar10_resnet.py"
PAYOFF = Path(__file__).resolve().parent / "autoencoder_payoff.py"
PAYOFF_OPTIMIZERS = ("sgd", "adamw", "muon", "adaptive")  # Muon where this torch has it (>= 2.9)
FIRST_ORDER = ("sgd", "adamw", "muon")
KNOWN = ("sgd", "kfac", "ekfac", "mfac")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--out-dir", type=Path, default=Path("runs/demo"),
                   help="one TensorBoard log dir per optimizer below it, plus demo.png and demo.json")
    p.add_argument("--optimizers", default="sgd,kfac,ekfac", help=f"comma-separated, from {','.join(KNOWN)}")
    p.add_argument("--nproc", type=int, default=2, help="processes per run (capped at the number of GPUs if any)")
    p.add_argument("--epochs", type=int, default=8, help="length of each run and of its cosine LR schedule")
    p.add_argument("--model", default="resnet8", help="CIFAR ResNet (resnet<6n+2>)")
    p.add_argument("--width", type=int, default=16, help="channels of the first ResNet stage")
    p.add_argument("--batch-size", type=int, default=64, help="global batch")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate (every optimizer)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per process (default: CPU cores / processes, at least 1)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a run is killed")
    p.add_argument("--quick", action="store_true", help="a few steps of a tiny model (for tests)")
    p.add_argument("--payoff-steps", type=int, default=300,
                   help="steps of the autoencoder stage (SGD, AdamW, Muon and adaptive K-FAC; 0 skips it)")
    args = p.parse_args(argv)
    args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    bad = [o for o in args.optimizers if o not in KNOWN]
    if bad or not args.optimizers:
        p.error(f"--optimizers: unknown {bad}; choose from {','.join(KNOWN)}")
    if args.nproc < 1 or args.epochs < 1:
        p.error("--nproc and --epochs must be at least 1")
    return args


def launch_config(args: argparse.Namespace) -> tuple[int, bool, list[str]]:
    """(processes, on GPU, the example's flags shared by every optimizer)."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    nproc = min(args.nproc, gpus) if gpus else args.nproc
    if args.quick:
        flags = ["--model", "resnet8", "--width", "4", "--batch-size", "16", "--epochs", "1", "--max-steps", "4",
                 "--warmup-epochs", "0.05", "--factor-update-steps", "1", "--inv-update-steps", "2",
                 "--log-interval", "2", "--num-grads", "2"]
    else:
        flags = ["--model", args.model, "--width", str(args.width), "--batch-size", str(args.batch_size),
                 "--epochs", str(args.epochs), "--warmup-epochs", "1", "--lr-schedule", "cosine",
                 "--factor-update-steps", "5", "--inv-update-steps", "20", "--log-interval", "5"]
    flags += ["--lr", str(args.lr), "--seed", str(args.seed), "--no-progress"]
    if not gpus:
        threads = args.threads or max(1, (os.cpu_count() or 1) // nproc)
        flags += ["--threads", str(threads)]
    return nproc, bool(gpus), flags


def run_one(opt: str, nproc: int, flags: list[str], out_dir: Path, timeout: float) -> tuple[float, str]:
    """Launch one torchrun job; returns (wall seconds, rank 0's output). Old event files in its log dir are
    removed first, so a re-run does not mix two runs' scalars."""
    log_dir = out_dir / opt
    log_dir.mkdir(parents=True, exist_ok=True)
    for old in log_dir.glob("events.out.tfevents.*"):
        old.unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", str(EXAMPLE), *flags, "--optimizer", opt, "--log-dir", str(log_dir)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # --standalone: every process on this machine
    print(f"[demo] {opt}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        raise SystemExit(f"[demo] {opt}: no result after {timeout:.0f}s (--timeout)\n{out[-3000:]}") from None
    wall = time.perf_counter() - t0
    (log_dir / "train.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"[demo] {opt}: torchrun exited with {proc.returncode} (log: {log_dir / 'train.log'})\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    final = next((ln for ln in proc.stdout.splitlines() if ln.startswith("final: ")), "")
    print(f"[demo] {opt}: done in {wall:.1f}s  {final}", flush=True)
    return wall, proc.stdout


def run_payoff(nproc: int, steps: int, quick: bool, out_dir: Path, timeout: float) -> list[dict[str, Any]]:
    """The payoff stage: the digits autoencoder by SGD, AdamW, Muon (lrs tuned by the time-to-result suite) and adaptive
    K-FAC (untuned), each a torchrun job of ``nproc`` processes; returns each run's JSON."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch

    rows = []
    for opt in PAYOFF_OPTIMIZERS:
        if opt == "muon" and not hasattr(torch.optim, "Muon"):
            print("[demo] autoencoder muon: skipped (torch.optim.Muon needs torch >= 2.9)", flush=True)
            continue
        out = out_dir / "payoff" / f"{opt}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "--max-restarts=0", str(PAYOFF), "--optimizer", opt, "--steps", str(steps),
               "--eval-every", "5" if quick else "10", "--out", str(out)]
        print(f"[demo] autoencoder {opt}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"[demo] autoencoder {opt}: torchrun exited with {proc.returncode}\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        row = json.loads(out.read_text())
        row["wall_time_s"] = time.perf_counter() - t0
        rows.append(row)
    return rows


def payoff_table(rows: list[dict[str, Any]]) -> str:
    """Final full-data loss, and the steps each optimizer needs to reach the best first-order final loss."""
    best = min((r for r in rows if r["optimizer"] in FIRST_ORDER), key=lambda r: r["curve"][-1][1])
    target = best["curve"][-1][1]
    column = f"steps to {best['optimizer']} final"
    header = f"{'optimizer':<10}{'steps':>6}{'final loss':>12}{column:>22}{'time/step':>11}"
    lines = [header, "-" * len(header)]
    for r in rows:
        hit = next((s for s, v in r["curve"] if v <= target), None)
        r["steps_to_best_final"] = hit
        lines.append(f"{r['optimizer']:<10}{r['steps']:>6}{r['curve'][-1][1]:>12.4f}"
                     f"{'-' if hit is None else hit:>22}{1000 * r['seconds_per_step']:>9.1f}ms")
    return "\n".join(lines)


def plot_payoff(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.plot([s for s, _ in r["curve"]], [v for _, v in r["curve"]], label=r["optimizer"])
    ax.set(xlabel="step", ylabel="full-data Bernoulli loss", yscale="log",
           title=f"digits autoencoder, {rows[0]['world_size']} process(es), batch {rows[0]['batch_size']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def summarize(opt: str, scalars: dict[str, list[tuple[int, float]]], wall: float) -> dict[str, Any]:
    def last(tag: str) -> float:
        return scalars[tag][-1][1] if scalars.get(tag) else math.nan

    steps = scalars["train/loss"][-1][0] if scalars.get("train/loss") else 0
    step_ms = [v for _, v in scalars.get("time/step_ms", [])]
    if len(step_ms) > 2:
        step_ms = step_ms[1:]  # the first window includes warm-up (first K-FAC decompositions, allocator)
    comm = scalars.get("kfac/bytes_communicated/total")  # cumulative, all ranks
    return {
        "optimizer": opt,
        "steps": steps,
        "train_loss": last("train/loss"),
        "train_accuracy": last("train/accuracy"),
        "test_loss": last("test/loss"),
        "test_accuracy": last("test/accuracy"),
        "wall_time_s": wall,
        "time_per_step_ms": sum(step_ms) / len(step_ms) if step_ms else math.nan,
        "optimizer_step_ms": last("time/optimizer_step_ms"),
        "comm_MiB_per_step": comm[-1][1] / comm[-1][0] / 2**20 if comm and comm[-1][0] else None,
        "curves": {"train_loss": scalars.get("train/loss", []), "test_accuracy": scalars.get("test/accuracy", [])},
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (f"{'optimizer':<10}{'steps':>6}{'train loss':>12}{'test acc':>10}{'wall time':>11}{'time/step':>11}"
              f"{'K-FAC MiB/step':>16}")
    lines = [header, "-" * len(header)]
    for r in rows:
        comm = "-" if r["comm_MiB_per_step"] is None else f"{r['comm_MiB_per_step']:.3f}"
        lines.append(f"{r['optimizer']:<10}{r['steps']:>6}{r['train_loss']:>12.4f}{100 * r['test_accuracy']:>9.2f}%"
                     f"{r['wall_time_s']:>10.1f}s{r['time_per_step_ms']:>9.1f}ms{comm:>16}")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        for ax, key in ((ax_acc, "test_accuracy"), (ax_loss, "train_loss")):
            pts = r["curves"][key]
            ax.plot([s for s, _ in pts], [100 * v if key == "test_accuracy" else v for _, v in pts],
                    marker="o" if key == "test_accuracy" else None, label=r["optimizer"])
    ax_acc.set(xlabel="step", ylabel="test accuracy (%)", title="test accuracy")
    ax_loss.set(xlabel="step", ylabel="cross-entropy", title="training loss", yscale="log")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(textwrap.fill(title, 150, break_on_hyphens=False), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    nproc, gpu, flags = launch_config(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    where = f"{nproc} GPU process(es) (NCCL)" if gpu else f"{nproc} CPU process(es) (gloo)"
    print(f"[demo] {', '.join(args.optimizers)} on the offline digits data, torchrun with {where}; "
          f"same model, seed and LR schedule for each", flush=True)
    rows = []
    for opt in args.optimizers:
        wall, _ = run_one(opt, nproc, flags, args.out_dir, args.timeout)
        rows.append(summarize(opt, read_scalars(args.out_dir / opt), wall))

    table = format_table(rows)
    config = " ".join(flags)
    print(f"\n{where}, flags: {config}\n{table}\n", flush=True)
    png, js = args.out_dir / "demo.png", args.out_dir / "demo.json"
    plot(rows, png, f"digits (offline), {where}: {config}")
    payoff: list[dict[str, Any]] = []
    if args.payoff_steps > 0:
        print("[demo] where K-FAC pays off: the digits deep autoencoder, SGD, AdamW and Muon at their tuned lrs vs "
              "adaptive K-FAC with nothing to tune", flush=True)
        payoff = run_payoff(nproc, 20 if args.quick else args.payoff_steps, args.quick, args.out_dir, args.timeout)
        print(f"\n{payoff_table(payoff)}\n", flush=True)
        plot_payoff(payoff, args.out_dir / "demo_payoff.png")
        print(f"payoff plot:      {args.out_dir / 'demo_payoff.png'}")
    js.write_text(json.dumps({"nproc": nproc, "device": "cuda" if gpu else "cpu", "flags": flags,
                              "quick": args.quick, "table": table, "results": rows, "payoff": payoff},
                             indent=1) + "\n")
    print(f"TensorBoard logs: {args.out_dir}/<optimizer>/ ({', '.join(args.optimizers)})")
    print(f"plot:             {png}")
    print(f"results:          {js}")
    print(f"view the curves:  tensorboard --logdir {args.out_dir}")
    return rows


if __name__ == "__main__":
    main()
