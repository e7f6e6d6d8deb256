"""Where K-FAC's time goes on a GPU: torch.profiler and the CUDA sync detector around single steps.

The companion of ``benchmarks/gpu/gpu_step.py`` (same model, data and K-FAC settings): it warms up a ResNet-50 with
``kfac.KFAC(method=...)`` at schedule (10, 100), then profiles one plain step, one factor-update step and one
refresh step, and for each prints

* the GPU time of the step (CUDA events) and the host time of ``optimizer.step()`` alone;
* every host-device synchronisation that K-FAC code triggers (``torch.cuda.set_sync_debug_mode``), by location;
* the operators and kernels with the most GPU time (self), and the first K-FAC frame that synchronises.

The report goes to ``--out-dir`` as ``gpu_profile_<method>.txt`` (a few KB; the committed ones are
``benchmarks/gpu/results/gpu_profile_<method>_h100.txt``), the full profiler table of each step as
``gpu_profile_<method>_<kind>.txt`` (raw: not committed)::

    python benchmarks/gpu/gpu_profile.py --method eigen --out-dir /tmp/prof
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT))
import kfac  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="eigen", choices=("eigen", "inverse", "ekfac"))
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--top", type=int, default=14)
    p.add_argument("--out-dir", type=Path, default=Path("."))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 2
    import torchvision

    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")  # as benchmarks/gpu/gpu_step.py
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = torchvision.models.resnet50().to(dev)
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-5)
    cls = kfac.EKFAC if args.method == "ekfac" else kfac.KFAC
    kw = {} if args.method == "ekfac" else {"method": args.method}
    opt = cls(model, base, factor_update_steps=10, inv_update_steps=100, damping=1e-3, kl_clip=1e-3, **kw)
    x = torch.randn(args.batch, 3, 224, 224, device=dev)
    y = torch.randint(0, 1000, (args.batch,), device=dev)

    def fwd_bwd() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()

    def full_step() -> None:
        fwd_bwd()
        opt.step()

    for _ in range(12):  # refresh at 0, factor updates at 0 and 10
        full_step()
    torch.cuda.synchronize()
    pre = opt.preconditioner
    lines = [f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, method {args.method}, "
             f"{'bf16 autocast' if args.amp else 'fp32'}, {len(pre.layers)} layers"]

    def until(kind: str) -> None:
        while True:
            s = pre.steps
            k = "refresh" if s % 100 == 0 else "update" if s % 10 == 0 else "plain"
            if k == kind:
                return
            full_step()

    report = []
    for kind in ("plain", "update", "refresh"):
        until(kind)
        torch.cuda.synchronize()
        # 1. timings: GPU time of the whole step; host time of optimizer.step()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fwd_bwd()
        torch.cuda.synchronize()
        h0 = time.perf_counter()
        opt.step()
        h1 = time.perf_counter()
        e1.record()
        torch.cuda.synchronize()
        host_ms = 1e3 * (h1 - h0)
        gpu_ms = e0.elapsed_time(e1)
        until(kind)
        # 2. synchronisations
        syncs: collections.Counter[str] = collections.Counter()
        fwd_bwd()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        # warnings carry no stack: re-run with an error mode to find the first location
        for w in caught:
            if "synchroniz" in str(w.message):  # not the mode's own "prototype feature" notice
                syncs[str(w.message)[:60]] += 1
        first_sync = ""
        if caught:
            until(kind)
            fwd_bwd()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
            except RuntimeError:
                tb = traceback.extract_tb(sys.exc_info()[2])
                inner = [f"{f.filename.split('/kfac/', 1)[-1]}:{f.lineno} {f.name}" for f in tb
                         if "/kfac/" in f.filename]
                first_sync = " <- ".join(reversed(inner[-4:]))
            finally:
                torch.cuda.set_sync_debug_mode(0)
            # that step was aborted half-way: finish a clean one so the state stays consistent
            opt.zero_grad()
        until(kind)
        # 3. profile
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fwd_bwd()
            opt.step()
            torch.cuda.synchronize()
        avgs = prof.key_averages()
        (args.out_dir / f"gpu_profile_{args.method}_{kind}.txt").write_text(
            avgs.table(sort_by="self_cuda_time_total", row_limit=60))

        def dev_time(a) -> float:
            return float(getattr(a, "self_device_time_total", None) or getattr(a, "self_cuda_time_total", 0.0))

        top = sorted((a for a in avgs if dev_time(a) > 0), key=dev_time, reverse=True)[:args.top]
        report.append(f"\n== {kind} step: GPU {gpu_ms:.1f} ms (events, fwd+bwd+step), host optimizer.step() "
                      f"{host_ms:.1f} ms")
        report.append(f"   syncs in optimizer.step(): {sum(syncs.values())} {dict(syncs) if syncs else ''}")
        if first_sync:
            report.append(f"   first sync at: {first_sync}")
        for a in top:  # operators and kernels, by self GPU time (an op's kernels are also listed on their own)
            report.append(f"   {dev_time(a) / 1e3:8.2f} ms  x{a.count:<5d} {a.key[:60]}")
    out = "\n".join(lines + report)
    print(out)
    (args.out_dir / f"gpu_profile_{args.method}.txt").write_text(out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
