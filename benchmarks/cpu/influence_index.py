"""The training-gradient index (issue 24): what its compression costs in LDS, and how fast it answers queries on a
large corpus, against exhaustive EK-FAC scoring.

1. LDS (``benchmarks/cpu/influence.py``'s setting: the digits MLP 64-128-10 trained to convergence by L-BFGS,
   ``--subsets`` models retrained on random halves, the same queries). EK-FAC scores exhaustively and through
   indexes of projection size ``k`` (each side of each layer; float16): LDS +- standard error, the paired
   difference to exhaustive scoring (mean +- SE over queries), stored bytes per example against the raw float32
   per-example gradients (``sum g_dim * a_dim * 4``).
2. Speed (synthetic, clearly labelled: random token ids and a randomly initialised GPT, width 128, 2 layers, 16
   tokens per sequence; timing only): an
   index of ``--corpus`` training sequences (default 100 000) is built once; then ``--queries`` queries are
   answered (top-10) through the index and exhaustively (``top_k(queries, train_batches)``: one pass over the
   corpus). Queries per second both ways, the build time (itself one pass), bytes per example.

kronfluence has no index: each of its queries re-scores the corpus (its cost is the exhaustive column).

Writes ``benchmarks/cpu/results/influence_index.json`` and ``.png`` (``--quick``: 8 subsets, a 3 000-sequence
corpus, ``influence_index_quick.*``). The full run takes about 10 minutes on 2 cores.

    python benchmarks/cpu/influence_index.py [--quick] [--dims 8,16,32,64] [--corpus 100000]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "examples"))
from benchmarks.common import machine_info, save_png, timed, write_json  # noqa: E402
from benchmarks.cpu.influence import (batches, choose_queries, lds_per_query, make_model, per_example_loss,  # noqa: E402
                                      summarise, train_lbfgs)
from _digits import load_data  # noqa: E402
from gpt_influence import GPT  # noqa: E402

from kfac.influence import CausalLMTask, ClassificationTask, InfluenceAnalyzer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few subsets, a small corpus; influence_index_quick.*")
    p.add_argument("--dims", default="8,16,32,64,256",
                   help="projection sizes k (each side of each layer; 256 covers every dimension: exact)")
    p.add_argument("--subsets", type=int, default=None, help="LDS subset models (default 100, quick 8)")
    p.add_argument("--queries", type=int, default=None, help="LDS test queries (default 100, quick 10)")
    p.add_argument("--corpus", type=int, default=None, help="synthetic training sequences (default 100000, quick 3000)")
    p.add_argument("--speed-queries", type=int, default=8, help="queries answered in the speed part")
    p.add_argument("--speed-dims", type=int, default=16, help="projection size of the speed part's index")
    p.add_argument("--speed-width", type=int, default=None, help="the speed part's GPT width (default 128, quick 32)")
    p.add_argument("--speed-layers", type=int, default=2, help="the speed part's GPT layers")
    p.add_argument("--seed", type=int, default=0, help="initial weights, subsets, queries, synthetic data")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="where influence_index[_quick].{json,png} go")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    a = p.parse_args(argv)
    a.dims = [int(d) for d in a.dims.split(",")]
    a.subsets = a.subsets or (8 if a.quick else 100)
    a.queries = a.queries or (10 if a.quick else 100)
    a.corpus = a.corpus or (3000 if a.quick else 100_000)
    a.speed_width = a.speed_width or (32 if a.quick else 128)
    if a.subsets < 3 or min(a.dims) < 1 or a.corpus < 100:
        p.error("need --subsets >= 3, positive --dims and --corpus >= 100")
    return a


def lds_part(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    data = load_data()
    x, y, xt, yt = data.x_train, data.y_train, data.x_test, data.y_test
    kw = {"weight_decay": 1e-3, "max_iter": 1000}
    model = make_model("mlp", args.seed)
    train_lbfgs(model, x, y, **kw)
    with torch.no_grad():
        pred = model.eval()(xt).argmax(1)
    q_idx, n_wrong = choose_queries(pred, yt, args.queries, args.seed)
    train, queries = batches(x, y, 128), batches(xt[q_idx], yt[q_idx], 128)
    gen = torch.Generator().manual_seed(args.seed + 1)
    masks = torch.zeros(args.subsets, len(x), dtype=torch.bool)
    losses = torch.empty(args.subsets, len(q_idx), dtype=torch.float64)
    for k in range(args.subsets):
        masks[k, torch.randperm(len(x), generator=gen)[:len(x) // 2]] = True
        m = make_model("mlp", args.seed)
        train_lbfgs(m, x[masks[k]], y[masks[k]], **kw)
        losses[k] = per_example_loss(m, xt[q_idx], yt[q_idx]).double()
    an = InfluenceAnalyzer(model, ClassificationTask(), method="ekfac", seed=args.seed, progress=False).fit(train)
    raw_bytes = sum(g * a for g, a in an._pre.block_shapes().values()) * 4
    exact_scores, exact_s = timed(lambda: an.pairwise_scores(queries, train))
    exact = lds_per_query(exact_scores, masks, losses)
    rows = [{"scoring": "exhaustive", "k": None, "bytes_per_example": raw_bytes, "compression": 1.0,
             "score_s": exact_s, **summarise(exact, n_wrong)}]
    for k in args.dims:
        index, build_s = timed(lambda: an.build_index(folder / f"digits_k{k}", train, dims=k, seed=args.seed))
        scores, score_s = timed(lambda: an.pairwise_scores(queries, index))
        corr = lds_per_query(scores, masks, losses)
        diff = (corr - exact)[~(corr - exact).isnan()]
        rows.append({"scoring": "index", "k": k, "bytes_per_example": index.bytes_per_example,
                     "compression": raw_bytes / index.bytes_per_example, "build_s": build_s, "score_s": score_s,
                     **summarise(corr, n_wrong), "lds_change": float(diff.mean()),
                     "lds_change_se": float(diff.std() / math.sqrt(len(diff)))})
        r = rows[-1]
        print(f"  k={k:<3} {r['bytes_per_example']:>6} B/example ({r['compression']:.1f}x smaller): LDS "
              f"{r['lds']:.3f} +- {r['lds_se']:.3f}, change {r['lds_change']:+.3f} +- {r['lds_change_se']:.3f}",
              flush=True)
    print(f"  exhaustive: LDS {rows[0]['lds']:.3f} +- {rows[0]['lds_se']:.3f} ({raw_bytes} B of raw gradients "
          "per example)", flush=True)
    return {"model": "digits MLP 64-128-10 (L-BFGS to convergence)", "subsets": args.subsets,
            "queries": len(q_idx), "n_train": len(x), "rows": rows}


def speed_part(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    seq, vocab, batch = 16, 64, 500
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (args.corpus, seq), generator=g)
    queries = [torch.randint(0, vocab, (args.speed_queries, seq), generator=g)]
    torch.manual_seed(args.seed)
    model = GPT(vocab, seq, dim=args.speed_width, heads=4, layers=args.speed_layers).eval()
    train = [ids[i:i + batch] for i in range(0, len(ids), batch)]
    with warnings.catch_warnings():  # LayerNorms are not tracked
        warnings.simplefilter("ignore")
        an = InfluenceAnalyzer(model, CausalLMTask(), method="ekfac", progress=False)
    an.fit(train[:10])  # the curvature of a sample: its cost is not part of either answer
    index, build_s = timed(lambda: an.build_index(folder / "synthetic", train, dims=args.speed_dims))
    via_index, index_s = timed(lambda: an.top_k(queries, index, k=10))
    alone = statistics.median(timed(lambda: an.top_k([queries[0][i:i + 1]], index, k=10))[1] for i in range(3))
    exhaustive, exhaustive_s = timed(lambda: an.top_k(queries, train, k=10))
    overlap = statistics.mean(len(set(a.tolist()) & set(b.tolist())) / 10
                              for a, b in zip(via_index.indices, exhaustive.indices))
    raw = sum(g * a for g, a in an._pre.block_shapes().values()) * 4
    out = {"corpus": args.corpus, "sequence_length": seq, "vocab": vocab,
           "model": f"GPT width {args.speed_width}, {args.speed_layers} layer(s), random init (synthetic: timing only)",
           "parameters": sum(p.numel() for p in model.parameters()), "queries": args.speed_queries, "k": args.speed_dims,
           "build_s": build_s, "index_s": index_s, "index_query_alone_s": alone, "exhaustive_s": exhaustive_s,
           "qps_index": args.speed_queries / index_s, "qps_exhaustive": args.speed_queries / exhaustive_s,
           "qps_index_alone": 1 / alone, "qps_exhaustive_alone": 1 / exhaustive_s,
           "speedup": exhaustive_s / index_s, "speedup_alone": exhaustive_s / alone,
           "bytes_per_example": index.bytes_per_example, "raw_bytes_per_example": raw,
           "compression": raw / index.bytes_per_example, "top10_overlap_with_exhaustive": overlap,
           "index_bytes_on_disk": sum(p.stat().st_size for p in (folder / "synthetic").iterdir())}
    print(f"  {args.corpus} sequences: build {build_s:.1f}s; {args.speed_queries} queries: index {index_s:.2f}s "
          f"({out['qps_index']:.1f} q/s), exhaustive {exhaustive_s:.1f}s ({out['qps_exhaustive']:.2f} q/s): "
          f"{out['speedup']:.0f}x (one query alone: {out['speedup_alone']:.0f}x); {index.bytes_per_example} B/example "
          f"vs {raw} raw ({out['compression']:.0f}x); top-10 overlap {overlap:.2f}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        print("LDS of exhaustive and indexed EK-FAC scores:", flush=True)
        lds = lds_part(args, Path(tmp))
        print("Speed on a synthetic corpus:", flush=True)
        speed = speed_part(args, Path(tmp))
    record = {"benchmark": "influence_index", "quick": args.quick,
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "machine": machine_info(threads=torch.get_num_threads()), "lds": lds, "speed": speed}
    out = args.out_dir / ("influence_index_quick.json" if args.quick else "influence_index.json")
    write_json(out, record, indent=1)
    if not args.no_plot:
        plot(record, out.with_suffix(".png"))
    return record


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["lds"]["rows"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    idx = [r for r in rows if r["scoring"] == "index"]
    a.errorbar([r["compression"] for r in idx], [r["lds"] for r in idx], yerr=[r["lds_se"] for r in idx], fmt="o-",
               label="index (k per side)")
    for r in idx:
        a.annotate(f"k={r['k']}", (r["compression"], r["lds"]), fontsize=7, textcoords="offset points", xytext=(3, 3))
    a.axhline(rows[0]["lds"], color="k", ls="--", label=f"exhaustive {rows[0]['lds']:.3f}")
    a.set(xscale="log", xlabel="storage vs raw float32 gradients (x smaller)", ylabel="LDS (digits MLP, EK-FAC)")
    a.legend(fontsize=7)
    s = record["speed"]
    b.bar(["exhaustive", "index"], [s["qps_exhaustive"], s["qps_index"]])
    b.set(yscale="log", ylabel="queries per second",
          title=f"{s['corpus']} synthetic sequences: {s['speedup']:.0f}x", )
    fig.suptitle(f"Training-gradient index ({record['machine'].get('cpu_model', '')[:40]})", fontsize=9)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
