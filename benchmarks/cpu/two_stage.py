"""Two-stage influence queries (issue 24): TF-IDF candidates, then EK-FAC on those alone, against exhaustive EK-FAC.

Setting. A character-level GPT (``examples/gpt_influence.py``: 2 layers, width 48) trained by AdamW on the
docstrings of ~40 standard-library modules (text that ships with Python), cut into sequences of ``--seq-len``
characters; the last 2% of the sequences are held out and ``--queries`` of them are the queries (measurement: the
query's summed next-character loss, ``CausalLMTask``). ``InfluenceAnalyzer(method="ekfac")`` is fitted once on the
training sequences.

* Exhaustive: ``pairwise_scores(query, train)`` over every training sequence, the top 10 per query (the reference).
  Timed per query alone (each query needs one pass over the corpus) and for all queries in one pass (amortised).
* Two-stage: ``TextCandidates`` (scikit-learn TF-IDF on word 1-2-grams and on character 3-5-grams, each built once
  and timed) picks a fraction of the corpus per query; ``top_k(query, dataset, k=10, candidates=...)`` scores only those. Timed per query alone
  (selection + scoring). Recall@10 = the share of the exhaustive top 10 that the two-stage top 10 finds.

Writes ``benchmarks/cpu/results/two_stage.json`` and ``two_stage.png`` (``--quick``: a small corpus and model,
``two_stage_quick.*``). The full run takes about 10 minutes on 2 cores.

    python benchmarks/cpu/two_stage.py [--quick] [--fractions 0.01,0.02,0.05,0.1,0.2] [--queries 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "examples"))
from benchmarks.common import machine_info, save_png, timed, write_json  # noqa: E402
from gpt_influence import GPT, corpus, sequences, train  # noqa: E402

from kfac.influence import CausalLMTask, InfluenceAnalyzer, TextCandidates  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODULES = ("string", "textwrap", "json", "functools", "collections", "itertools", "pathlib", "argparse", "inspect",
           "os", "re", "random", "statistics", "datetime", "decimal", "fractions", "heapq", "bisect", "typing",
           "logging", "threading", "subprocess", "shutil", "tempfile", "csv", "zipfile", "tarfile", "socket",
           "email", "http.client", "urllib.parse", "unittest", "doctest", "pickle", "copy", "enum", "dataclasses",
           "contextlib", "abc", "asyncio")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small corpus and model; writes two_stage_quick.*")
    p.add_argument("--seq-len", type=int, default=32, help="characters per sequence")
    p.add_argument("--steps", type=int, default=None, help="AdamW steps (default 600, quick 30)")
    p.add_argument("--queries", type=int, default=None, help="held-out query sequences (default 20, quick 4)")
    p.add_argument("--fractions", default=None, help="candidate fractions (default 0.01,0.02,0.05,0.1,0.2)")
    p.add_argument("--k", type=int, default=10, help="top-k compared")
    p.add_argument("--batch-size", type=int, default=64, help="batch size of fitting and scoring")
    p.add_argument("--seed", type=int, default=0, help="initial weights, batches and query choice")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="where two_stage[_quick].{json,png} go")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    a = p.parse_args(argv)
    a.steps = a.steps or (30 if a.quick else 600)
    a.queries = a.queries or (4 if a.quick else 20)
    a.fractions = [float(f) for f in (a.fractions or ("0.05,0.2" if a.quick else "0.01,0.02,0.05,0.1,0.2")).split(",")]
    if not all(0 < f <= 1 for f in a.fractions) or a.queries < 1 or a.k < 1:
        p.error("fractions in (0, 1], positive --queries and --k")
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    text = corpus(MODULES[:9] if args.quick else MODULES)[: 12000 if args.quick else None]
    chars, data = sequences(text, args.seq_len)
    held = max(args.queries, len(data) // 50)
    train_ids, pool = data[:-held], data[-held:]
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(args.seed))[:args.queries]
    query_ids = pool[pick]
    decode = ("".join(chars[i] for i in row) for row in train_ids.tolist())
    train_texts, query_texts = list(decode), ["".join(chars[i] for i in row) for row in query_ids.tolist()]
    dim, layers = (32, 1) if args.quick else (48, 2)
    model = GPT(len(chars), args.seq_len, dim=dim, heads=4, layers=layers)
    losses, train_s = timed(lambda: train("adamw", model, train_ids, args.steps, 32, args.seed))
    print(f"corpus: {len(text)} characters, {len(train_ids)} training sequences of {args.seq_len}, "
          f"{len(query_ids)} queries; GPT {dim}x{layers}: loss {losses[0]:.2f} -> {losses[-1]:.2f} "
          f"({train_s:.0f}s)", flush=True)

    model.eval()
    with warnings.catch_warnings():  # the LayerNorms are not tracked (listed in an.skipped)
        warnings.simplefilter("ignore")
        an = InfluenceAnalyzer(model, CausalLMTask(), method="ekfac", progress=False)
    batches = [train_ids[i:i + args.batch_size] for i in range(0, len(train_ids), args.batch_size)]
    _, fit_s = timed(lambda: an.fit(batches))
    queries = [[query_ids[q:q + 1]] for q in range(len(query_ids))]
    exhaustive, alone = [], []
    for q in queries:
        top, seconds = timed(lambda: an.top_k(q, batches, k=args.k))
        exhaustive.append(set(top.indices[0].tolist()))
        alone.append(seconds)
    _, together = timed(lambda: an.top_k([query_ids], batches, k=args.k))
    print(f"EK-FAC fit {fit_s:.1f}s; exhaustive top-{args.k}: {statistics.median(alone):.2f}s per query alone, "
          f"{together / len(queries):.2f}s per query in one pass of {len(queries)}", flush=True)

    dataset = list(train_ids)
    rows, build_s = [], {}
    for generator, options in GENERATORS.items():
        tfidf, build_s[generator] = timed(lambda: TextCandidates(train_texts, **options))
        rows += two_stage_rows(args, an, tfidf, generator, queries, query_texts, exhaustive, dataset, alone, together)
    record = {"benchmark": "two_stage", "quick": args.quick,
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "machine": machine_info(threads=torch.get_num_threads()),
              "corpus": {"characters": len(text), "train_sequences": len(train_ids), "queries": len(query_ids),
                         "modules": len(MODULES[:9] if args.quick else MODULES)},
              "model": {"dim": dim, "layers": layers, "steps": args.steps, "loss_first": losses[0],
                        "loss_last": losses[-1], "train_s": train_s},
              "ekfac": {"fit_s": fit_s, "exhaustive_s_per_query_alone": statistics.median(alone),
                        "exhaustive_s_per_query_amortised": together / len(queries)},
              "tfidf_build_s": build_s, "generators": {g: str(o) for g, o in GENERATORS.items()}, "fractions": rows}
    out = args.out_dir / ("two_stage_quick.json" if args.quick else "two_stage.json")
    write_json(out, record, indent=1)
    if not args.no_plot:
        plot(record, out.with_suffix(".png"))
    return record


GENERATORS = {"words": {"analyzer": "word", "ngram_range": (1, 2)},
              "characters": {"analyzer": "char_wb", "ngram_range": (3, 5)}}
"""TF-IDF terms compared: word 1-2-grams, character 3-5-grams within words (``TextCandidates``' default)."""


def two_stage_rows(args: argparse.Namespace, an: InfluenceAnalyzer, tfidf: TextCandidates, generator: str,
                   queries: list, query_texts: list[str], exhaustive: list[set[int]], dataset: list,
                   alone: list[float], together: float) -> list[dict[str, Any]]:
    """Recall@k and time per query of two-stage queries at each candidate fraction."""
    rows = []
    for fraction in args.fractions:
        recalls, seconds = [], []
        for q, text_q, want in zip(queries, query_texts, exhaustive):
            def two_stage() -> Any:
                return an.top_k(q, dataset, k=args.k, candidates=tfidf.select([text_q], fraction),
                                batch_size=args.batch_size)
            top, s = timed(two_stage)
            recalls.append(len(want & set(top.indices[0].tolist())) / args.k)
            seconds.append(s)
        row = {"generator": generator, "fraction": fraction, "candidates": max(1, round(fraction * len(dataset))),
               "recall_at_k": statistics.mean(recalls), "recall_min": min(recalls),
               "seconds_per_query": statistics.median(seconds),
               "speedup_vs_alone": statistics.median(alone) / statistics.median(seconds),
               "speedup_vs_amortised": together / len(queries) / statistics.median(seconds)}
        rows.append(row)
        print(f"  {generator:<10} fraction {fraction:<5} ({row['candidates']:>5} candidates): recall@{args.k} "
              f"{row['recall_at_k']:.3f} (min {row['recall_min']:.1f}), {row['seconds_per_query']:.3f}s per query, "
              f"{row['speedup_vs_alone']:.1f}x faster than exhaustive alone, "
              f"{row['speedup_vs_amortised']:.1f}x than amortised", flush=True)

    return rows


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    for generator in record["generators"]:
        rows = [r for r in record["fractions"] if r["generator"] == generator]
        x = [100 * r["fraction"] for r in rows]
        a.plot(x, [r["recall_at_k"] for r in rows], "o-", label=f"TF-IDF on {generator}")
        b.plot(x, [r["speedup_vs_alone"] for r in rows], "o-", label=f"{generator}: vs exhaustive, one query")
        b.plot(x, [r["speedup_vs_amortised"] for r in rows], "s--", label=f"{generator}: vs exhaustive, amortised")
    a.axhline(0.9, color="grey", ls=":", label="goal 0.9")
    a.set(xlabel="candidates (% of corpus)", ylabel=f"recall@{record['config']['k']} of exhaustive EK-FAC",
          ylim=(0, 1.05), xscale="log")
    a.legend(fontsize=7)
    b.axhline(10, color="grey", ls=":", label="goal 10x")
    b.set(xlabel="candidates (% of corpus)", ylabel="speed-up per query", xscale="log", yscale="log")
    b.legend(fontsize=7)
    fig.suptitle(f"Two-stage queries: {record['corpus']['train_sequences']} sequences, "
                 f"{record['corpus']['queries']} queries ({record['machine'].get('cpu_model', '')[:40]})", fontsize=9)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
