"""GPU step time of K-FAC / EK-FAC (/ M-FAC) vs SGD: torchvision ResNet-50, ImageNet shapes (issue 7).

Goal (issue 7): at (factor_update_steps, inv_update_steps) = (10, 100), the amortised per-step time of
``kfac.KFAC`` should be <= 1.25x that of plain SGD.

What a GPU session should run (one H100/H200; each command stays well under 10 minutes)::

    python benchmarks/gpu/gpu_step.py                  # float32 (TF32 convolutions: PyTorch defaults)
    python benchmarks/gpu/gpu_step.py --amp            # bf16 autocast
    python benchmarks/gpu/gpu_step.py --amp --ext      # (optional) also K-FAC with kfac.ext forced off ("torch")
    python benchmarks/gpu/gpu_step.py --amp --amp-dtype fp16 --out-dir /tmp/x   # (optional) fp16 + GradScaler

Each run writes ``benchmarks/gpu/results/gpu_step.json`` and ``gpu_step.png`` (``gpu_step_amp.*`` with ``--amp``,
``gpu_step_amp_fp16.*`` with fp16, ``_cl`` appended with ``--channels-last``), so run both and keep both. The JSON
keeps the per-step times of the timed windows (``raw``: ``repeats x periods x inv_update_steps`` numbers per
configuration, a few KB) next to the summary.
What to copy into the README: the table printed at the end of each run (columns: config, amortised ms/step,
ratio vs SGD, goal <= 1.25x met?, ms of a plain step, of a factor-update step, of a refresh step, peak memory)
together with the line "GPU: <name>, driver <x>, CUDA <y>, torch <z>" printed above it, and the PNG.

What is measured
    Complete training steps (``zero_grad``, forward, cross-entropy, backward, optimizer ``step``) of
    ``torchvision.models.resnet50(weights=None)`` (1000 classes) on SYNTHETIC data: a small pool (``--pool``) of
    random 224x224 batches of 64 (inputs ~ N(0, 1), uniform labels) that lives on the device and is cycled.
    Configurations (``--configs``; default all but ``mfac``):

    * ``sgd``: ``torch.optim.SGD(lr=0.1, momentum=0.9, weight_decay=5e-5)``;
    * ``kfac-eigen`` / ``kfac-inverse``: ``kfac.KFAC(model, sgd, factor_update_steps=10, inv_update_steps=100,
      damping=1e-3, kl_clip=1e-3, method="eigen" | "inverse")``;
    * ``ekfac``: ``kfac.EKFAC`` with the same arguments;
    * ``mfac`` (opt-in): ``kfac.MFAC(model, sgd, num_grads=32, damping=1e-4, kl_clip=1e-3)`` (no schedule).

    With ``--amp``: ``torch.autocast`` in bf16 (default) or fp16; with fp16 every configuration gets its own
    ``torch.amp.GradScaler`` (passed to K-FAC as ``grad_scaler=``; stepped with ``scaler.step(opt)``).
    With ``--ext`` and the compiled extension available (``kfac.ext.available()``), every K-FAC configuration is
    timed twice: under ``kfac.ext.backend("auto")`` (the default) and as ``<name>[torch]`` under
    ``kfac.ext.backend("torch")`` (extension off).

How
    All configurations live in one process, each with an identically initialised model. Each is warmed up
    (``--warmup`` steps; this includes step 0, which performs K-FAC's initial factor update and decomposition,
    and cuDNN autotuning). Then, for each repeat, every configuration in turn (the order rotates between
    repeats, so drifts hit all alike) runs one timed window of ``--periods`` whole schedule periods
    (``periods * inv_update_steps`` = 100 steps per period: 10 factor updates + 1 refresh), so window time / steps
    is the amortised per-step cost including the refresh. Times come from CUDA events recorded around every
    step (the window total from the first to the last event, after ``torch.cuda.synchronize()``); the
    per-step events also give the median plain step (no factor update, no refresh), the median factor-update
    step and the refresh step. Reported: medians over repeats, ratio of medians vs SGD, the median of
    per-repeat paired ratios, and the peak CUDA memory attributable to each configuration (its persistent
    state after warm-up plus its peak above that during its windows; the shared data pool excluded).

    Caveat: a short warm-up leaves K-FAC's running factors near their identity initialisation; decomposition
    time depends somewhat on the spectra, so the refresh cost of a long run can differ a little.

``--quick``: a smoke run for the tests (resnet18 with 10 classes, 32x32, batch 8, schedule (2, 4), a few steps,
``layer3``/``layer4`` not preconditioned to keep CPU decompositions cheap, M-FAC with ``num_grads=4``); allowed on
CPU; writes ``gpu_step_quick.{json,png}``. Without CUDA the full benchmark refuses to run unless
``--allow-cpu`` is given (CPU timings of ResNet-50 say nothing about the GPU goal).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing: `kfac` and `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import machine_info, save_png, write_json  # noqa: E402

import kfac  # noqa: E402

GOAL = 1.25
ALL_CONFIGS: tuple[str, ...] = ("sgd", "kfac-eigen", "kfac-inverse", "ekfac", "mfac")
DEFAULT_CONFIGS: tuple[str, ...] = ("sgd", "kfac-eigen", "kfac-inverse", "ekfac")
SGD_KWARGS: dict[str, float] = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-5}
KFAC_KWARGS: dict[str, float] = {"damping": 1e-3, "kl_clip": 1e-3}
MFAC_KWARGS: dict[str, Any] = {"num_grads": 32, "damping": 1e-4, "kl_clip": 1e-3}


@dataclass(frozen=True)
class Setup:
    model: str
    num_classes: int
    image: int
    batch: int
    schedule: tuple[int, int]
    skip_layers: tuple[str, ...] = ()
    mfac_num_grads: int = 32


FULL = Setup("torchvision resnet50(weights=None), 1000 classes", 1000, 224, 64, (10, 100))
QUICK = Setup("torchvision resnet18(num_classes=10) (quick smoke test; layer3/layer4 not preconditioned)",
              10, 32, 8, (2, 4), skip_layers=("layer3", "layer4"), mfac_num_grads=4)


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------------------
# timing on CUDA (events) or CPU (perf_counter)
# ----------------------------------------------------------------------------------------------------------
class StepClock:
    """Marks between steps; ``elapsed_ms()`` gives the per-step times (CUDA events: no host sync per step)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def elapsed_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [1e3 * (b - a) for a, b in zip(self.marks, self.marks[1:])]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Runner:
    name: str
    kind: str  # sgd | kfac-eigen | kfac-inverse | ekfac | mfac
    backend: str | None  # kfac.ext backend to run under (None: leave the process default)
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: list[tuple[Tensor, Tensor]]
    autocast: torch.dtype | None
    scaler: Any | None
    channels_last: bool
    schedule: tuple[int, int] | None
    cursor: int = 0
    steps: int = 0
    state_bytes: int = 0
    peaks_above_start: list[int] = field(default_factory=list)

    @property
    def preconditioner(self) -> Any | None:
        return getattr(self.optimizer, "preconditioner", None)

    def step_index(self) -> int:
        pre = self.preconditioner
        return pre.steps if pre is not None and hasattr(pre, "steps") else self.steps

    def context(self) -> contextlib.AbstractContextManager[Any]:
        return kfac.ext.backend(self.backend) if self.backend is not None else contextlib.nullcontext()

    def step(self) -> None:
        x, y = self.batches[self.cursor]
        self.cursor = (self.cursor + 1) % len(self.batches)
        self.optimizer.zero_grad(set_to_none=True)
        if self.autocast is not None:
            with torch.autocast(device_type=x.device.type, dtype=self.autocast):
                loss = F.cross_entropy(self.model(x), y)
        else:
            loss = F.cross_entropy(self.model(x), y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.steps += 1

    def kind_of_step(self, index: int) -> str:
        """``refresh``, ``factor_update`` or ``plain`` for the step with this preconditioner step index."""
        if self.schedule is None:
            return "plain"
        fus, ius = self.schedule
        if index % ius == 0:
            return "refresh"
        return "factor_update" if index % fus == 0 else "plain"


def build_model(setup: Setup, seed: int, quick: bool) -> nn.Module:
    import torchvision

    torch.manual_seed(seed)
    if quick:
        return torchvision.models.resnet18(num_classes=setup.num_classes)
    return torchvision.models.resnet50(weights=None)


def make_batches(setup: Setup, n: int, seed: int, device: torch.device, channels_last: bool
                 ) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(setup.batch, 3, setup.image, setup.image, generator=g).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append((x, torch.randint(0, setup.num_classes, (setup.batch,), generator=g).to(device)))
    return out


def make_runner(name: str, kind: str, backend: str | None, setup: Setup, batches: list[tuple[Tensor, Tensor]], *,
                device: torch.device, amp: str | None, channels_last: bool, seed: int, quick: bool) -> Runner:
    model = build_model(setup, seed, quick).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[amp]
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    base = torch.optim.SGD(model.parameters(), **SGD_KWARGS)
    schedule: tuple[int, int] | None = None
    if kind == "sgd":
        opt: torch.optim.Optimizer = base
    elif kind in ("kfac-eigen", "kfac-inverse", "ekfac"):
        fus, ius = setup.schedule
        schedule = setup.schedule
        kw: dict[str, Any] = dict(factor_update_steps=fus, inv_update_steps=ius, grad_scaler=scaler,
                                  skip_layers=list(setup.skip_layers), **KFAC_KWARGS)
        if kind == "ekfac":
            opt = kfac.EKFAC(model, base, **kw)
        else:
            opt = kfac.KFAC(model, base, method=kind.split("-", 1)[1], **kw)
    elif kind == "mfac":
        opt = kfac.MFAC(model, base, **{**MFAC_KWARGS, "num_grads": setup.mfac_num_grads},
                        skip_layers=list(setup.skip_layers))
    else:
        raise ValueError(f"unknown configuration {kind!r}")
    return Runner(name=name, kind=kind, backend=backend, model=model, optimizer=opt, batches=batches,
                  autocast=autocast, scaler=scaler, channels_last=channels_last, schedule=schedule)


# ----------------------------------------------------------------------------------------------------------
# benchmark
# ----------------------------------------------------------------------------------------------------------
def time_window(r: Runner, steps: int, device: torch.device) -> dict[str, Any]:
    cuda = device.type == "cuda"
    first = r.step_index()
    skipped_before = getattr(r.preconditioner, "skipped_steps", 0)
    kinds = []
    clock = StepClock(device)
    gc.collect()
    sync(device)
    if cuda:
        start_alloc = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    gc.disable()
    try:
        with r.context():
            t0 = time.perf_counter()
            clock.mark()
            for _ in range(steps):
                kinds.append(r.kind_of_step(r.step_index()))
                r.step()
                clock.mark()
            sync(device)
            wall = time.perf_counter() - t0
    finally:
        gc.enable()
    per_step = clock.elapsed_ms()
    total_ms = sum(per_step)
    rec: dict[str, Any] = {
        "steps": steps, "first_step": first, "ms_total": total_ms, "ms_per_step": total_ms / steps,
        "wall_ms_per_step": 1e3 * wall / steps,
        "skipped_steps": getattr(r.preconditioner, "skipped_steps", 0) - skipped_before,
        "step_ms": {k: [t for t, kk in zip(per_step, kinds) if kk == k] for k in ("plain", "factor_update", "refresh")},
    }
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - start_alloc
        rec["peak_bytes_above_start"] = peak
        r.peaks_above_start.append(peak)
    return rec


def run_benchmark(runners: list[Runner], *, device: torch.device, repeats: int, periods: int, period_steps: int,
                  failed: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """Interleaved timed windows of ``periods * period_steps`` steps (every config, SGD included)."""
    t_start = time.perf_counter()
    raw: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rep in range(repeats):
        order = runners[rep % len(runners):] + runners[:rep % len(runners)]
        for r in order:
            steps = periods * period_steps
            if r.name in failed:
                continue
            try:
                rec = time_window(r, steps, device)
            except Exception as exc:  # noqa: BLE001 - record and go on with the other configurations
                failed[r.name] = f"timed window: {type(exc).__name__}: {exc}"
                log(f"FAILED {r.name}: {failed[r.name]}")
                continue
            rec["repeat"] = rep
            raw[r.name].append(rec)
            if rec["skipped_steps"]:
                log(f"WARNING: {r.name}: {rec['skipped_steps']} steps skipped (non-finite gradients) in the window")
            log(f"repeat {rep + 1}/{repeats} {r.name:<20s} {rec['ms_per_step']:9.2f} ms/step ({steps} steps; "
                f"elapsed {time.perf_counter() - t_start:.0f} s)")
    return dict(raw)


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarise(runners: list[Runner], raw: dict[str, list[dict[str, Any]]], *, cuda: bool) -> list[dict[str, Any]]:
    sgd_by_rep = {rec["repeat"]: rec["ms_per_step"] for rec in raw.get("sgd", [])}
    sgd_median = statistics.median(sgd_by_rep.values()) if sgd_by_rep else None
    rows = []
    for r in runners:
        recs = raw[r.name]
        times = [rec["ms_per_step"] for rec in recs]
        med = statistics.median(times)
        paired = [rec["ms_per_step"] / sgd_by_rep[rec["repeat"]] for rec in recs if rec["repeat"] in sgd_by_rep]
        step_ms = {k: [t for rec in recs for t in rec["step_ms"][k]] for k in ("plain", "factor_update", "refresh")}
        ratio = med / sgd_median if sgd_median else None
        row: dict[str, Any] = {
            "config": r.name, "kind": r.kind, "ext_backend": r.backend,
            "schedule": list(r.schedule) if r.schedule else None,
            "ms_per_step_median": med, "ms_per_step_min": min(times), "ms_per_step_max": max(times),
            "wall_ms_per_step_median": statistics.median(rec["wall_ms_per_step"] for rec in recs),
            "ratio_vs_sgd": ratio,
            "ratio_vs_sgd_paired_median": _median(paired), "ratio_vs_sgd_paired_min": min(paired) if paired else None,
            "ratio_vs_sgd_paired_max": max(paired) if paired else None,
            "goal_met": (ratio <= GOAL) if (ratio is not None and r.kind != "sgd") else None,
            "plain_step_ms_median": _median(step_ms["plain"]),
            "factor_update_step_ms_median": _median(step_ms["factor_update"]),
            "refresh_step_ms_median": _median(step_ms["refresh"]),
            "refresh_steps_timed": len(step_ms["refresh"]),
            "repeats": len(times), "skipped_steps": sum(rec["skipped_steps"] for rec in recs),
        }
        if cuda:
            row["state_bytes"] = r.state_bytes
            row["peak_bytes"] = r.state_bytes + max(r.peaks_above_start)
        rows.append(row)
    return rows


def _fmt(v: float | None, spec: str = "8.1f") -> str:
    return format(v, spec) if v is not None else format("-", ">" + spec.split(".")[0])


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'config':<20s} {'ms/step':>8s} {'vs SGD':>7s} {'<=1.25x':>7s} {'plain':>8s} {'fac.upd':>8s} "
            f"{'refresh':>9s} {'peak GiB':>8s}")
    lines = [head, "-" * len(head)]
    for row in rows:
        ratio = f"{row['ratio_vs_sgd']:6.2f}x" if row["ratio_vs_sgd"] is not None else f"{'-':>7s}"
        goal = {True: "yes", False: "NO", None: "-"}[row["goal_met"]]
        peak = row["peak_bytes"] / 2**30 if "peak_bytes" in row else None
        lines.append(f"{row['config']:<20s} {row['ms_per_step_median']:8.2f} {ratio} {goal:>7s} "
                     f"{_fmt(row['plain_step_ms_median'], '8.2f')} {_fmt(row['factor_update_step_ms_median'], '8.2f')} "
                     f"{_fmt(row['refresh_step_ms_median'], '9.1f')} {_fmt(peak, '8.2f')}")
    lines.append("(ms/step: amortised over whole schedule periods incl. the refresh, median over repeats; plain / "
                 "fac.upd / refresh: median ms of single steps without factor update or refresh / with a factor "
                 "update / with the refresh)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# machine, outputs
# ----------------------------------------------------------------------------------------------------------
def gpu_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if device.type != "cuda":
        return info
    props = torch.cuda.get_device_properties(device)
    info.update({"gpu_name": props.name, "gpu_total_memory_bytes": props.total_memory,
                 "gpu_capability": f"{props.major}.{props.minor}", "gpu_sm_count": props.multi_processor_count,
                 "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
                 "cudnn_benchmark": torch.backends.cudnn.benchmark})
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20,
                             check=False).stdout.strip()
        info["nvidia_smi"] = out or None
        info["driver"] = out.split(",")[0].strip() if out else None
    except (OSError, subprocess.SubprocessError):
        info["driver"] = None
    return info


def ext_info() -> dict[str, Any]:
    try:
        info = kfac.ext.info()
        return {k: info.get(k) for k in ("available", "disabled", "error", "cuda_kernels", "backend", "build_info")}
    except Exception as exc:  # noqa: BLE001 - informational only
        return {"available": False, "error": repr(exc)}


def plot(rows: list[dict[str, Any]], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["ratio_vs_sgd"] is not None]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.5))
    xs = range(len(rows))
    ys = [r["ratio_vs_sgd"] for r in rows]
    lo = [max(r["ratio_vs_sgd"] - (r["ratio_vs_sgd_paired_min"] or r["ratio_vs_sgd"]), 0) for r in rows]
    hi = [max((r["ratio_vs_sgd_paired_max"] or r["ratio_vs_sgd"]) - r["ratio_vs_sgd"], 0) for r in rows]
    colors = ["gray" if r["kind"] == "sgd" else ("tab:green" if r["goal_met"] else "tab:red") for r in rows]
    ax.bar(xs, ys, 0.6, yerr=[lo, hi], capsize=3, color=colors)
    for x, r in zip(xs, rows):
        ax.annotate(f"{r['ratio_vs_sgd']:.2f}x\n{r['ms_per_step_median']:.1f} ms", (x, r["ratio_vs_sgd"]),
                    textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8)
    ax.axhline(GOAL, color="crimson", ls="--", lw=1.2, label=f"goal <= {GOAL}x SGD")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(list(xs), [r["config"] for r in rows], fontsize=8)
    ax.set_ylabel("amortised ms/step relative to SGD (median)")
    ax.set_ylim(0, max(ys + [GOAL] + [r["ratio_vs_sgd_paired_max"] or 0 for r in rows]) * 1.25)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    save_png(fig, path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=None,
                   help=f"comma-separated subset of {','.join(ALL_CONFIGS)} (default: {','.join(DEFAULT_CONFIGS)}; "
                        "with --quick all); sgd is always added")
    p.add_argument("--mfac", action="store_true", help="add the mfac configuration")
    p.add_argument("--amp", action="store_true", help="autocast (bf16 unless --amp-dtype fp16)")
    p.add_argument("--amp-dtype", choices=("bf16", "fp16"), default="bf16",
                   help="autocast dtype; fp16 uses a GradScaler (passed to K-FAC as grad_scaler=)")
    p.add_argument("--channels-last", action="store_true", help="model and inputs in channels_last")
    p.add_argument("--matmul-precision", choices=("highest", "high"), default="high",
                   help="torch.set_float32_matmul_precision for every configuration (default high: TF32 float32 "
                        "matmuls, PyTorch's recommended setting for training on Ampere/Hopper; cuDNN convolutions "
                        "use TF32 by default either way)")
    p.add_argument("--ext", action="store_true",
                   help="if kfac.ext is available, also time every K-FAC config under kfac.ext.backend('torch')")
    p.add_argument("--repeats", type=int, default=None, help="timed windows per configuration (default 3; quick 2)")
    p.add_argument("--periods", type=int, default=1, help="schedule periods per timed window (default 1)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps per configuration, incl. step 0's initial refresh (default 20; quick 1)")
    p.add_argument("--pool", type=int, default=4, help="synthetic batches kept on the device (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (allowed on CPU); writes gpu_step_quick.*")
    p.add_argument("--allow-cpu", action="store_true", help="run the full benchmark on CPU when there is no CUDA")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    if args.warmup is None:
        args.warmup = 1 if args.quick else 20
    if args.repeats < 1 or args.periods < 1 or args.pool < 1 or args.warmup < 1:
        p.error("--repeats, --periods, --pool and --warmup must be >= 1 (warm-up includes step 0's refresh)")
    if args.configs is None:
        configs = list(ALL_CONFIGS if args.quick else DEFAULT_CONFIGS)
    else:
        configs = [c.strip() for c in args.configs.split(",") if c.strip()]
        bad = [c for c in configs if c not in ALL_CONFIGS]
        if bad:
            p.error(f"unknown configuration(s) {bad}; choose from {ALL_CONFIGS}")
    if args.mfac and "mfac" not in configs:
        configs.append("mfac")
    args.config_list = ["sgd"] + [c for c in dict.fromkeys(configs) if c != "sgd"]
    return args


def output_stem(args: argparse.Namespace) -> str:
    if args.quick:
        return "gpu_step_quick"
    stem = "gpu_step"
    if args.amp:
        stem += "_amp" if args.amp_dtype == "bf16" else "_amp_fp16"
    if args.matmul_precision == "highest":
        stem += "_fp32mm"
    if args.channels_last:
        stem += "_cl"
    return stem


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_run = time.perf_counter()
    if torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision(args.matmul_precision)
    elif args.quick or args.allow_cpu:
        device = torch.device("cpu")
        log("NOTE: no CUDA device; running on CPU (timings say nothing about the GPU goal)")
    else:
        log("ERROR: benchmarks/gpu/gpu_step.py needs a CUDA device (none found: torch.cuda.is_available() is False).\n"
            "Run it in a session with a GPU, or pass --quick (smoke test) or --allow-cpu (full benchmark on CPU).")
        return 2
    setup = QUICK if args.quick else FULL
    amp = args.amp_dtype if args.amp else None
    if amp == "bf16" and device.type == "cpu":
        log("NOTE: bf16 autocast on CPU")
    stem = output_stem(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    ext = ext_info()
    names: list[tuple[str, str, str | None]] = [(c, c, None) for c in args.config_list]
    if args.ext:
        if ext.get("available"):
            names = [(c, c, "auto") if c != "sgd" else (c, c, None) for c in args.config_list]
            names += [(f"{c}[torch]", c, "torch") for c in args.config_list if c not in ("sgd", "mfac")]
        else:
            log(f"NOTE: --ext: kfac.ext is not available ({ext.get('error') or 'not built'}); timing the default "
                "backend only")

    machine = machine_info(torch_threads=torch.get_num_threads(), **gpu_info(device))
    gpu_line = (f"GPU: {machine.get('gpu_name')}, driver {machine.get('driver')}, CUDA {machine.get('torch_cuda')}, "
                f"torch {machine['torch']}" if device.type == "cuda" else f"CPU: {machine['cpu_model']}, "
                f"{torch.get_num_threads()} threads, torch {machine['torch']}")
    log(gpu_line)
    log(f"{setup.model}, batch {setup.batch}, {setup.image}x{setup.image}, "
        f"{'autocast ' + amp if amp else 'float32'}{', channels_last' if args.channels_last else ''}, "
        f"float32 matmul precision {torch.get_float32_matmul_precision()}, "
        f"schedule {setup.schedule}, SYNTHETIC data; configs: {', '.join(n for n, _, _ in names)}")

    batches = make_batches(setup, args.pool, args.seed, device, args.channels_last)
    runners: list[Runner] = []
    failed: dict[str, str] = {}
    for name, kind, backend in names:
        gc.collect()
        sync(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        r = make_runner(name, kind, backend, setup, batches, device=device, amp=amp,
                        channels_last=args.channels_last, seed=args.seed, quick=args.quick)
        t0 = time.perf_counter()
        try:
            with r.context():
                for _ in range(args.warmup):
                    r.step()
            sync(device)
        except Exception as exc:  # noqa: BLE001 - record and go on with the other configurations
            failed[name] = f"warm-up: {type(exc).__name__}: {exc}"
            log(f"FAILED {name}: {failed[name]}")
            del r
            gc.collect()
            continue
        gc.collect()
        if device.type == "cuda":
            r.state_bytes = torch.cuda.memory_allocated(device) - before
        log(f"warm-up {name:<20s} {args.warmup} steps in {time.perf_counter() - t0:6.1f} s")
        runners.append(r)

    raw = run_benchmark(runners, device=device, repeats=args.repeats, periods=args.periods,
                        period_steps=setup.schedule[1], failed=failed)
    runners = [r for r in runners if r.name not in failed]
    rows = summarise(runners, raw, cuda=device.type == "cuda")
    log("\n" + gpu_line)
    log(format_table(rows))
    for name, err in failed.items():
        log(f"FAILED {name}: {err}")
    for row in rows:
        if row["goal_met"] is not None and row["schedule"] == list(setup.schedule):
            log(f"{row['config']}: {row['ratio_vs_sgd']:.2f}x SGD -> goal <= {GOAL}x "
                f"{'MET' if row['goal_met'] else 'NOT met'}")

    result: dict[str, Any] = {
        "benchmark": "gpu step time vs SGD (issue 7)", "description": __doc__, "argv": sys.argv[1:] if argv is None
        else argv, "goal_ratio_vs_sgd": GOAL,
        "data": "SYNTHETIC: random N(0,1) inputs, uniform random labels, pool cycled on the device (timing only)",
        "model": setup.model, "batch_size": setup.batch, "image_size": setup.image, "num_classes": setup.num_classes,
        "device": str(device), "amp": amp, "channels_last": args.channels_last,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "schedule": {"factor_update_steps": setup.schedule[0], "inv_update_steps": setup.schedule[1]},
        "sgd": SGD_KWARGS, "kfac": {**KFAC_KWARGS, "skip_layers": list(setup.skip_layers)},
        "mfac": {**MFAC_KWARGS, "num_grads": setup.mfac_num_grads},
        "settings": {"repeats": args.repeats, "periods": args.periods, "warmup": args.warmup, "pool": args.pool,
                     "seed": args.seed, "quick": args.quick, "ext": args.ext, "configs": [n for n, _, _ in names]},
        "timing": "CUDA events around every step, window total after torch.cuda.synchronize()"
        if device.type == "cuda" else "time.perf_counter around every step (CPU)",
        "ext": ext, "machine": machine, "summary": rows, "failed": failed,
        "raw": {k: v for k, v in raw.items() if k not in failed},
        "runtime_s": time.perf_counter() - t_run,
    }
    json_path = args.out_dir / f"{stem}.json"
    write_json(json_path, result, indent=2, default=str, allow_nan=False)
    log(f"\nwrote {json_path}")
    png_path = args.out_dir / f"{stem}.png"
    where = (f"{machine.get('gpu_name')}, CUDA {machine.get('torch_cuda')}" if device.type == "cuda"
             else f"CPU {machine['cpu_model']}")
    plot(rows, png_path, title=f"step time / SGD: {setup.model}\nbatch {setup.batch}, {setup.image}x{setup.image}, "
                               f"{amp or 'fp32'}, schedule {setup.schedule}, {where}, torch {machine['torch']}, "
                               f"median of {args.repeats} x {args.periods} period(s)")
    log(f"wrote {png_path}")
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
