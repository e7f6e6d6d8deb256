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
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing: `kfac` and `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import log, machine_info, write_json  # noqa: E402
from benchmarks.gpu.step.configs import (ALL_CONFIGS, DEFAULT_CONFIGS, FULL, GOAL, KFAC_KWARGS,  # noqa: E402
                                         MFAC_KWARGS, QUICK, SGD_KWARGS)
from benchmarks.gpu.step.machine import ext_info, gpu_info  # noqa: E402
from benchmarks.gpu.step.plot import plot  # noqa: E402
from benchmarks.gpu.step.runners import build_and_warm_up, make_batches  # noqa: E402
from benchmarks.gpu.step.timing import format_table, run_benchmark, summarise  # noqa: E402


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
    runners, failed = build_and_warm_up(names, setup, batches, device=device, amp=amp,
                                        channels_last=args.channels_last, seed=args.seed, quick=args.quick,
                                        warmup=args.warmup)

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
