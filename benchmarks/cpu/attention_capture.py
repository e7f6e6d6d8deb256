"""``nn.MultiheadAttention`` with K-FAC attached: eval forward time, and what the capture of its projections costs.

* Eval forward (``model.eval()`` under ``torch.no_grad()``) of a self-attention block with and without a K-FAC
  preconditioner attached, interleaved repeats (median and minimum ms): with K-FAC the forward is PyTorch's own
  (its fused ``torch._native_multi_head_attention``), so the two should agree within noise.
* The capture's price in ``E x E`` products per row: matrix-multiply FLOPs (``torch.utils.flop_counter``) of one
  forward + backward with the capture of both projections observed by a no-op callback, minus those of the plain
  module, divided by ``2 E^2`` (one multiply-add per entry of an ``E x E`` product) and by the query rows ``L N``;
  for self- and cross-attention (``S`` key rows, ``key is value`` and not). K-FAC pays it only on steps that
  collect statistics; the factor statistics themselves (``a^T a``, ``g^T g``) come on top and are not counted.

Writes ``benchmarks/cpu/results/attention_capture.json`` (``--quick``: ``attention_capture_quick.json``).

    python benchmarks/cpu/attention_capture.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing: `kfac` and `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))
from benchmarks.common import gc_paused, log, machine_info, rotated, write_json  # noqa: E402

import kfac  # noqa: E402
from kfac.modules import CrossInProjectionAdapter, InProjectionAdapter, OutProjectionAdapter  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class Block(nn.Module):
    def __init__(self, e: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(e, heads, batch_first=True)
        self.head = nn.Linear(e, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0])


def eval_forward(e: int, heads: int, n: int, length: int, repeats: int, inner: int) -> dict[str, Any]:
    torch.manual_seed(0)
    plain, attached = Block(e, heads), Block(e, heads)
    attached.load_state_dict(plain.state_dict())
    kfac.KFACPreconditioner(attached)
    x = torch.randn(n, length, e)
    models = {"without_kfac": plain.eval(), "with_kfac": attached.eval()}
    with torch.no_grad():
        assert torch.equal(plain(x), attached(x))
        times: dict[str, list[float]] = {k: [] for k in models}
        for k in models:  # warm-up
            models[k](x)
        with gc_paused():
            for r in range(repeats):
                for name in rotated(list(models), r):
                    t = time.perf_counter()
                    for _ in range(inner):
                        models[name](x)
                    times[name].append((time.perf_counter() - t) / inner * 1e3)
    out: dict[str, Any] = {k: {"median_ms": statistics.median(v), "min_ms": min(v)} for k, v in times.items()}
    for stat in ("median", "min"):
        out[f"ratio_{stat}"] = out["with_kfac"][f"{stat}_ms"] / out["without_kfac"][f"{stat}_ms"]
    return out


def matmul_flops(mha: nn.MultiheadAttention, q: torch.Tensor, kv: torch.Tensor, v: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        mha(q, kv, v, need_weights=False)[0].sum().backward()
    return int(counter.get_total_flops())


def capture_cost(e: int, heads: int, n: int, length: int, source: int, kind: str) -> dict[str, Any]:
    """Extra ``E x E`` products per query row of one captured forward + backward (see the module docstring)."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(e, heads, batch_first=True)
    q = torch.randn(n, length, e)
    kv = q if kind == "self" else torch.randn(n, source, e)
    v = kv if kind != "cross, key is not value" else torch.randn(n, source, e)
    plain = matmul_flops(mha, q, kv, v)
    results = {}
    for name, in_adapter in (("InProjectionAdapter", InProjectionAdapter(mha)),
                             ("CrossInProjectionAdapter", CrossInProjectionAdapter(mha))):
        handles = in_adapter.observe(lambda *args: None) + OutProjectionAdapter(mha.out_proj, mha).observe(
            lambda *args: None)
        captured = matmul_flops(mha, q, kv, v)
        for h in handles:
            h.remove()
        results[name] = (captured - plain) / (2 * e * e) / (n * length)
    return {"attention": kind, "L": length, "S": length if kind == "self" else source, **{
        f"extra_ExE_per_query_row[{k}]": round(val, 3) for k, val in results.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1: steady on a shared VM)")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (smoke test)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    e, heads, n, length = (32, 2, 2, 8) if args.quick else (256, 4, 8, 128)
    repeats, inner = (3, 2) if args.quick else (40, 10)
    log(f"eval forward: E={e}, heads={heads}, batch {n} x {length} tokens, {repeats} x {inner} repeats")
    ev = eval_forward(e, heads, n, length, repeats, inner)
    print(f"{'model':<14}{'median ms':>12}{'min ms':>10}")
    for k in ("without_kfac", "with_kfac"):
        print(f"{k:<14}{ev[k]['median_ms']:>12.3f}{ev[k]['min_ms']:>10.3f}")
    print(f"with / without K-FAC: median {ev['ratio_median']:.3f}, min {ev['ratio_min']:.3f}")
    costs = [capture_cost(e, heads, n, length, length // 2, kind)
             for kind in ("self", "cross, key is value", "cross, key is not value")]
    print(f"\n{'attention':<26}{'L':>5}{'S':>5}{'packed: E x E/row':>20}{'cross: E x E/row':>20}")
    for c in costs:
        print(f"{c['attention']:<26}{c['L']:>5}{c['S']:>5}"
              f"{c['extra_ExE_per_query_row[InProjectionAdapter]']:>20.3f}"
              f"{c['extra_ExE_per_query_row[CrossInProjectionAdapter]']:>20.3f}")
    record = {"benchmark": "attention_capture", "machine": machine_info(threads=args.threads),
              "settings": {"E": e, "heads": heads, "batch": n, "L": length, "repeats": repeats, "inner": inner},
              "eval_forward": ev, "capture_cost": costs}
    path = args.out_dir / ("attention_capture_quick.json" if args.quick else "attention_capture.json")
    write_json(path, record)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
