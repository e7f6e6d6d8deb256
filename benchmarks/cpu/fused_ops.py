"""Fused factor ops: the C++/CUDA extension (kfac.ext) against the PyTorch code path it replaces.

For each op and size, three implementations run interleaved (so that background load hits them alike); the median
of the repeats is reported (and the minimum, the better estimate on a busy machine):

* ``torch``: the current PyTorch path, as in ``kfac/comm.py`` and ``kfac/distributed.py``. For "factor update +
  pack": ``s = a.T @ a``; ``(s + s.T) * (0.5 / n)``; pack the upper triangle (a gather with fresh
  ``triu_indices``); ``torch.cat`` into the communication buffer;
* ``ext``: the extension (``kfac.ext`` under ``backend("extension")``);
* ``fallback``: ``kfac.ext``'s pure-PyTorch implementation (what runs when the extension is not loaded).

Sizes: ``d`` in {256, 1152, 2304, 4608} and ``rows`` in {256, 4096}, float32, CPU (and CUDA when available); then
small problems (``d`` in {64, 128, 192}, ``rows`` in {32, 256, 2048}) that locate the sizes from which
``kfac.ext.PREFERRED`` uses the extension.
Writes ``benchmarks/cpu/results/fused_ops.json`` (settings, machine, the median/min ms and ratios of every case, and
their summary per op; no per-repeat timings) and ``fused_ops.png`` (``--quick``: small sizes, ``fused_ops_quick.*``).

    python benchmarks/cpu/fused_ops.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing: `kfac` and `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))
from benchmarks.common import machine_info, save_png  # noqa: E402

from kfac import ext  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GOAL = 0.6  # issue 6: "factor update + pack" on CPU at <= 0.6x the PyTorch time
DAMPING = 1e-3


# ---- the PyTorch path (kfac.ext's fallbacks, as kfac/comm.py and kfac/reduction.py use them) ---------------------

def pack_symmetric(m: Tensor) -> Tensor:
    return ext.pack_symmetric_many_torch([m])


def unpack_symmetric(v: Tensor, d: int) -> Tensor:
    return ext.unpack_symmetric_many_torch(v, [d])[0]


def torch_update_pack(a: Tensor) -> Tensor:
    s = a.T @ a
    mean = torch.add(s, s.T).mul_(0.5 / a.shape[0])
    return torch.cat([pack_symmetric(mean)])


def ext_update_pack(a: Tensor) -> Tensor:
    d = a.shape[1]
    buffer = torch.empty(d * (d + 1) // 2, dtype=a.dtype, device=a.device)
    return ext.sym_outer_pack(a, buffer, alpha=1.0 / a.shape[0])


def fallback_update_pack(a: Tensor) -> Tensor:
    d = a.shape[1]
    buffer = torch.empty(d * (d + 1) // 2, dtype=a.dtype, device=a.device)
    return ext.sym_outer_pack_torch(a, buffer, alpha=1.0 / a.shape[0])


# ---- timing ---------------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, *, budget_s: float,
                     min_repeats: int, max_repeats: int) -> dict[str, list[float]]:
    """Wall times in ms of each fn over the repeats; the fns alternate within every repeat, so that background
    load falls on all of them alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up (allocator, first-touch pages, lazy init)
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for fn in fns.values():
        fn()
    _sync(device)
    once = max(time.perf_counter() - t0, 1e-6)
    repeats = int(min(max_repeats, max(min_repeats, budget_s / once)))
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - t) * 1e3)
    return times


def _max_rel_err(a: Tensor | list[Tensor], b: Tensor | list[Tensor]) -> float:
    a_all = torch.cat([t.reshape(-1) for t in a]) if isinstance(a, list) else a.reshape(-1)
    b_all = torch.cat([t.reshape(-1) for t in b]) if isinstance(b, list) else b.reshape(-1)
    scale = float(b_all.double().abs().max()) or 1.0
    return float((a_all.double() - b_all.double()).abs().max()) / scale


# ---- cases ----------------------------------------------------------------------------------------------------------

Case = tuple[dict[str, Callable[[], Any]], tuple[Callable[[], Any], Callable[[], Any]]]


def cases(d: int, rows: int | None, device: torch.device) -> dict[str, Case]:
    """op -> ({"torch", "ext", "fallback"} closures over fresh inputs, (ext result, reference result) closures)."""
    g = torch.Generator().manual_seed(d * 7 + (rows or 0))

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(device)

    out: dict[str, Case] = {}
    if rows is not None:
        a = randn(rows, d)
        out["update+pack"] = ({"torch": lambda: torch_update_pack(a), "ext": lambda: ext_update_pack(a),
                               "fallback": lambda: fallback_update_pack(a)},
                              (lambda: ext_update_pack(a), lambda: torch_update_pack(a)))
        acc_t, acc_e, acc_f = (torch.zeros(d, d, device=device) for _ in range(3))

        def torch_update() -> Tensor:  # "s += a.T @ a" across micro-batches
            return acc_t.add_(a.T @ a)

        out["sym_outer_update"] = ({"torch": torch_update, "ext": lambda: ext.sym_outer_update(a, acc_e),
                                    "fallback": lambda: ext.sym_outer_update_torch(a, acc_f)},
                                   (lambda: ext.sym_outer_update(a), lambda: a.T @ a))
        return out
    s1, s2 = randn(d, d), randn(d, d)
    mats, scales = [s1 + s1.T, s2 + s2.T], [0.5, 0.25]

    def torch_pack_many() -> Tensor:
        return torch.cat([pack_symmetric(m).mul_(s) for m, s in zip(mats, scales)])

    out["pack_symmetric_many"] = ({"torch": torch_pack_many, "ext": lambda: ext.pack_symmetric_many(mats, scales),
                                   "fallback": lambda: ext.pack_symmetric_many_torch(mats, scales)},
                                  (lambda: ext.pack_symmetric_many(mats, scales), torch_pack_many))
    flat, n = torch_pack_many(), d * (d + 1) // 2

    def torch_unpack_many() -> list[Tensor]:
        return [unpack_symmetric(flat[k * n:(k + 1) * n], d) for k in range(2)]

    out["unpack_symmetric_many"] = ({"torch": torch_unpack_many, "ext": lambda: ext.unpack_symmetric_many(flat, [d, d]),
                                     "fallback": lambda: ext.unpack_symmetric_many_torch(flat, [d, d])},
                                    (lambda: ext.unpack_symmetric_many(flat, [d, d]), torch_unpack_many))
    v = randn(d, d)
    d_g, d_a = randn(d).abs(), randn(d).abs()

    def torch_scale() -> Tensor:
        return v / (torch.outer(d_g, d_a) + DAMPING)

    out["eigen_scale"] = ({"torch": torch_scale, "ext": lambda: ext.eigen_scale(v, d_g, d_a, DAMPING),
                           "fallback": lambda: ext.eigen_scale_torch(v, d_g, d_a, DAMPING)},
                          (lambda: ext.eigen_scale(v, d_g, d_a, DAMPING), torch_scale))
    acc_t, acc_e, acc_f = (torch.zeros(d, d, device=device) for _ in range(3))

    def torch_scale_acc() -> Tensor:  # "acc += V**2" as a second pass
        r = v / (torch.outer(d_g, d_a) + DAMPING)
        acc_t.add_(v ** 2)
        return r

    out["eigen_scale+acc"] = ({"torch": torch_scale_acc, "ext": lambda: ext.eigen_scale(v, d_g, d_a, DAMPING, acc=acc_e),
                               "fallback": lambda: ext.eigen_scale_torch(v, d_g, d_a, DAMPING, acc=acc_f)},
                              (lambda: ext.eigen_scale(v, d_g, d_a, DAMPING, acc=torch.zeros_like(v)), torch_scale))
    return out


def run(device: torch.device, dims: list[int], rows_list: list[int], args: argparse.Namespace) -> list[dict]:
    records = []
    sizes = [(d, r) for d in dims for r in rows_list] + [(d, None) for d in dims]
    for d, rows in sizes:
        for op, (fns, (got, want)) in cases(d, rows, device).items():
            with ext.backend("extension"):
                err = _max_rel_err(got(), want())
                timing = time_interleaved(fns, device, budget_s=args.budget, min_repeats=args.min_repeats,
                                          max_repeats=args.max_repeats)
            rec: dict[str, Any] = {"op": op, "device": device.type, "d": d, "rows": rows, "dtype": "float32"}
            rec.update({f"{k}_ms": statistics.median(v) for k, v in timing.items()})
            rec.update({f"{k}_min_ms": min(v) for k, v in timing.items()})
            paired = [e / t for e, t in zip(timing["ext"], timing["torch"])]
            rec.update(repeats=len(paired), max_rel_err=err, ratio=rec["ext_ms"] / rec["torch_ms"],
                       ratio_of_min=rec["ext_min_ms"] / rec["torch_min_ms"], paired_ratio=statistics.median(paired),
                       ratio_vs_fallback=rec["ext_ms"] / rec["fallback_ms"])
            records.append(rec)
            print(f"{op:22s} {device.type:4s} d={d:5d} rows={rows if rows is not None else '-':>5} "
                  f"torch={rec['torch_ms']:9.3f} ms  ext={rec['ext_ms']:9.3f} ms  fallback={rec['fallback_ms']:9.3f}"
                  f" ms  ext/torch={rec['ratio']:.2f} (of minima {rec['ratio_of_min']:.2f})  (err {err:.1e}, "
                  f"{rec['repeats']} reps)", flush=True)
    return records


# ---- report ---------------------------------------------------------------------------------------------------------

def _geomean(xs: list[float]) -> float:
    return float(torch.tensor(xs, dtype=torch.float64).log().mean().exp())


def summary(records: list[dict]) -> dict[str, dict[str, Any]]:
    """Per (device, op): geometric-mean and worst ext/torch ratio, and whether the extension wins at every size."""
    out: dict[str, dict[str, Any]] = {}
    for key in sorted({(r["device"], r["op"]) for r in records}):
        ratios = [r["ratio"] for r in records if (r["device"], r["op"]) == key]
        of_min = [r["ratio_of_min"] for r in records if (r["device"], r["op"]) == key]
        out[f"{key[0]}/{key[1]}"] = {"geomean_ratio": _geomean(ratios), "worst_ratio": max(ratios),
                                     "best_ratio": min(ratios), "geomean_ratio_of_min": _geomean(of_min),
                                     "ext_faster_everywhere": max(ratios) < 1.0}
    return out


def table(records: list[dict]) -> str:
    head = (f"{'op':22s} {'dev':4s} {'d':>5s} {'rows':>5s} {'torch ms':>10s} {'ext ms':>10s} {'fallback ms':>11s} "
            f"{'ext/torch':>9s} {'(minima)':>8s}")
    lines = [head, "-" * len(head)]
    for r in records:
        rows = str(r["rows"]) if r["rows"] is not None else "-"
        lines.append(f"{r['op']:22s} {r['device']:4s} {r['d']:5d} {rows:>5s} {r['torch_ms']:10.3f} {r['ext_ms']:10.3f} "
                     f"{r['fallback_ms']:11.3f} {r['ratio']:9.2f} {r['ratio_of_min']:8.2f}")
    return "\n".join(lines)


def plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r["op"] for r in records))
    ncols = 3
    nrows = (len(ops) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), sharey=True, squeeze=False)
    for ax in axes.flat[len(ops):]:
        ax.set_visible(False)
    for ax, op in zip(axes.flat, ops):
        series = sorted({(r["device"], r["rows"]) for r in records if r["op"] == op}, key=str)
        for device, rows in series:
            pts = sorted((r["d"], r["ratio"]) for r in records
                         if r["op"] == op and r["device"] == device and r["rows"] == rows)
            label = device + (f", rows={rows}" if rows is not None else "")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.axhline(1.0, color="grey", lw=1)
        ax.axhline(GOAL, color="tab:red", lw=1, ls="--", label=f"goal {GOAL}x")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(op)
        ax.set_xlabel("d")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for row in axes:
        row[0].set_ylabel("ext / PyTorch time (lower is better)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, fused_ops_quick.*")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timing per case and implementation")
    parser.add_argument("--min-repeats", type=int, default=None)
    parser.add_argument("--max-repeats", type=int, default=None)
    parser.add_argument("--no-cuda", action="store_true", help="skip CUDA even when it is available")
    args = parser.parse_args(argv)
    args.budget = args.budget if args.budget is not None else (0.1 if args.quick else 1.0)
    args.min_repeats = args.min_repeats if args.min_repeats is not None else (3 if args.quick else 5)
    args.max_repeats = args.max_repeats if args.max_repeats is not None else (10 if args.quick else 40)
    dims, rows_list = ([64, 200], [32, 128]) if args.quick else ([256, 1152, 2304, 4608], [256, 4096])
    small_dims, small_rows = ([], []) if args.quick else ([64, 128, 192], [32, 256, 2048])  # where the defaults switch

    torch.set_num_threads(args.threads)
    use_cuda = torch.cuda.is_available() and not args.no_cuda
    if not ext.load(cuda=use_cuda):
        print(f"the extension could not be built: {ext.info()['error']}", file=sys.stderr)
        return 1
    devices = [torch.device("cpu")]
    if use_cuda and ext.info()["cuda_kernels"]:
        devices.append(torch.device("cuda"))

    load_start = os.getloadavg()
    records, small = [], []
    for device in devices:
        records += run(device, dims, rows_list, args)
        if small_dims:
            small += run(device, small_dims, small_rows, args)
    print()
    print(table(records))
    if small:
        print("\nsmall problems (where kfac.ext.PREFERRED switches to the extension):")
        print(table(small))
    summ = summary(records)
    print()
    for key, s in summ.items():
        print(f"{key:30s} geomean ext/torch {s['geomean_ratio']:.2f} (of minima {s['geomean_ratio_of_min']:.2f})  "
              f"worst {s['worst_ratio']:.2f}  best {s['best_ratio']:.2f}")

    info = ext.info()
    extra = {"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
             "parallel_info": torch.__config__.parallel_info(), "ext_build_info": info["build_info"],
             "cuda_device": torch.cuda.get_device_name(0) if use_cuda else None,
             "cuda_version": torch.version.cuda if use_cuda else None,
             "loadavg_1_5_15min_at_start": load_start, "loadavg_1_5_15min_at_end": os.getloadavg()}
    payload = {"benchmark": "fused_ops", "quick": args.quick, "goal_ratio_update_pack_cpu": GOAL,
               "machine": machine_info(**extra),
               "config": {"dims": dims, "rows": rows_list, "dtype": "float32", "damping": DAMPING,
                          "budget_s": args.budget, "min_repeats": args.min_repeats, "max_repeats": args.max_repeats,
                          "statistic": "median of interleaved repeats (min also recorded)"},
               "preferred_default": info["preferred"], "summary": summ, "results": records,
               "small_results": small}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "fused_ops_quick" if args.quick else "fused_ops"
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    cpu = payload["machine"]["cpu_model"]
    plot(records, RESULTS / f"{stem}.png",
         f"kfac.ext fused ops vs PyTorch: {cpu}, {args.threads} threads, torch {torch.__version__}"
         + (f", {extra['cuda_device']}" if extra["cuda_device"] else ""))
    print(f"\nwrote {RESULTS / (stem + '.json')} and {RESULTS / (stem + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
