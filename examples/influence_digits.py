"""Which training digits helped, and which hurt, a misclassified test digit? EK-FAC influence on scikit-learn's digits.

1. Train the small CNN of ``examples/_digits.py`` (SGD with momentum, ``--epochs`` passes; seconds on a CPU).
2. Fit the curvature once on the training split: ``InfluenceAnalyzer(model, ClassificationTask(),
   method="ekfac").fit(train_batches)``.
3. Take the ``--num-queries`` misclassified test digits with the highest loss (padded with random correct ones if
   there are fewer) and score every training example against each:
   ``scores = analyzer.pairwise_scores(query_batches, train_batches)`` (``[n_query, n_train]``).

``score[q, j] = grad loss_q^T (C + damping I)^-1 grad loss_j``; positive means that upweighting training example
``j`` lowers query ``q``'s loss (on its *true* label): helpful. The most helpful examples of a misclassified digit
usually carry its true label; the most harmful ones usually carry the label the model wrongly predicted (or look
like the query but are labelled otherwise).

Prints a table (query, true/predicted label, the top helpful and top harmful training example with label and
score) and writes ``influence_digits.png`` (each row: the query, its ``--top-k`` most helpful and most harmful
training digits, 8x8 pixels shown enlarged) and ``influence_digits.json`` to ``--out-dir``. Offline, < 1 minute.

    python examples/influence_digits.py [--method ekfac] [--num-queries 4] [--top-k 3] [--out-dir examples/output]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _digits import batch_indices, evaluate, load_data, make_model, make_optimizer  # noqa: E402
from training.cli import HelpFormatter  # noqa: E402

from kfac.influence import ClassificationTask, InfluenceAnalyzer  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "output"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--method", choices=("ekfac", "kfac", "mfac", "identity"), default="ekfac",
                   help="curvature of the influence scores")
    p.add_argument("--num-queries", type=int, default=4, help="misclassified test digits to explain")
    p.add_argument("--top-k", type=int, default=3, help="helpful and harmful training digits shown per query")
    p.add_argument("--damping", type=float, default=None, help="fixed damping (default: the method's heuristic)")
    p.add_argument("--epochs", type=int, default=15, help="training passes (SGD, batch 64, lr 0.05, momentum 0.9)")
    p.add_argument("--seed", type=int, default=0, help="initial weights and batch order")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the model is tiny)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="where the PNG and JSON are written")
    a = p.parse_args(argv)
    if a.num_queries < 1 or a.top_k < 1 or a.epochs < 1 or a.threads < 1:
        p.error("--num-queries, --top-k, --epochs and --threads must be positive")
    return a


def raw_images() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The unstandardised 0..16 pixels of the same split as ``load_data()`` (same ``train_test_split`` call)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return (torch.as_tensor(x_tr).reshape(-1, 8, 8), torch.as_tensor(y_tr), torch.as_tensor(x_te).reshape(-1, 8, 8),
            torch.as_tensor(y_te))


def train_model(data: Any, *, epochs: int, seed: int) -> torch.nn.Module:
    model = make_model(seed)
    opt = make_optimizer("sgd", model, lr=0.05, momentum=0.9)
    model.train()
    for idx in batch_indices(data.n_train, 64, epochs=epochs, seed=seed):
        opt.zero_grad()
        F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
        opt.step()
    return model.eval()


def batches(x: Tensor, y: Tensor, size: int = 128) -> list[tuple[Tensor, Tensor]]:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def pick_queries(model: torch.nn.Module, x: Tensor, y: Tensor, count: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Misclassified test examples by decreasing loss, then random correct ones; returns (indices, preds, losses)."""
    with torch.no_grad():
        logits = model(x)
    pred = logits.argmax(1)
    loss = F.cross_entropy(logits, y, reduction="none")
    wrong = (pred != y).nonzero().flatten()
    wrong = wrong[loss[wrong].argsort(descending=True)][:count]
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).tolist()
    right = [i for i in order if bool(pred[i] == y[i])][: count - len(wrong)]
    idx = torch.cat([wrong, torch.tensor(right, dtype=torch.long)])
    return idx, pred[idx], loss[idx]


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'query':>6}{'true':>5}{'pred':>5}{'loss':>8}   {'top helpful (train idx, label, score)':<38}"
            f"{'top harmful (train idx, label, score)':<38}")
    lines = [head, "-" * len(head)]
    for r in rows:
        h, b = r["helpful"][0], r["harmful"][0]
        best, worst = (f"#{e['train_idx']}, {e['label']}, {e['score']:+.3e}" for e in (h, b))
        lines.append(f"{r['query']:>6}{r['true']:>5}{r['pred']:>5}{r['loss']:>8.3f}   {best:<38}{worst:<38}")
    return "\n".join(lines)


def plot_grid(rows: list[dict[str, Any]], images_train: Tensor, images_test: Tensor, k: int, method: str,
              path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 1 + 2 * k
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.55 * cols, 1.85 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        cells = [(images_test[row["query"]], f"test #{row['query']}\ntrue {row['true']} pred {row['pred']}", "k")]
        cells += [(images_train[h["train_idx"]], f"+ #{h['train_idx']} y={h['label']}\n{h['score']:+.2e}",
                   "tab:green") for h in row["helpful"]]
        cells += [(images_train[h["train_idx"]], f"- #{h['train_idx']} y={h['label']}\n{h['score']:+.2e}",
                   "tab:red") for h in row["harmful"]]
        for c, (img, title, color) in enumerate(cells):
            ax = axes[r, c]
            ax.imshow(img.numpy(), cmap="gray_r", interpolation="nearest", vmin=0, vmax=16)
            ax.set_title(title, fontsize=7.5, color=color)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(2 if c else 1)
    fig.suptitle(f"{method} influence on digits: query | {k} most helpful (green) | {k} most harmful (red)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = load_data()
    img_tr, lab_tr, img_te, lab_te = raw_images()
    assert torch.equal(lab_tr, data.y_train) and torch.equal(lab_te, data.y_test), "split mismatch"

    model = train_model(data, epochs=args.epochs, seed=args.seed)
    test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
    train_s = time.perf_counter() - start
    print(f"trained the digits CNN: {args.epochs} epochs in {train_s:.1f}s, test accuracy {100 * test_acc:.2f}% "
          f"({round((1 - test_acc) * len(data.y_test))} of {len(data.y_test)} test digits misclassified)")

    q_idx, q_pred, q_loss = pick_queries(model, data.x_test, data.y_test, args.num_queries, args.seed)
    train_batches = batches(data.x_train, data.y_train)
    query_batches = batches(data.x_test[q_idx], data.y_test[q_idx])

    t = time.perf_counter()
    analyzer = InfluenceAnalyzer(model, ClassificationTask(), method=args.method, damping=args.damping,
                                 seed=args.seed, progress=False).fit(train_batches)
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    scores = analyzer.pairwise_scores(query_batches, train_batches)  # [n_query, n_train]
    score_s = time.perf_counter() - t
    k = min(args.top_k, scores.shape[1])
    helpful, harmful = scores.topk(k, dim=1), (-scores).topk(k, dim=1)
    print(f"{args.method}: fit {fit_s:.2f}s, {len(q_idx)} x {scores.shape[1]} scores in {score_s:.2f}s "
          f"(tracked layers {analyzer.layers})")

    def entries(indices: Tensor, values: Tensor) -> list[dict[str, Any]]:
        return [{"train_idx": int(j), "label": int(data.y_train[j]), "score": float(s)}
                for j, s in zip(indices.tolist(), values.tolist())]

    rows = []
    for i, q in enumerate(q_idx.tolist()):
        rows.append({"query": q, "true": int(data.y_test[q]), "pred": int(q_pred[i]), "loss": float(q_loss[i]),
                     "misclassified": bool(q_pred[i] != data.y_test[q]),
                     "helpful": entries(helpful.indices[i], helpful.values[i]),
                     "harmful": entries(harmful.indices[i], -harmful.values[i])})
    table = format_table(rows)
    print()
    print(table)
    same_true = sum(h["label"] == r["true"] for r in rows for h in r["helpful"])
    same_pred = sum(h["label"] == r["pred"] for r in rows for h in r["harmful"] if r["misclassified"])
    n_wrong = sum(r["misclassified"] for r in rows)
    print(f"\n{same_true}/{k * len(rows)} top-{k} helpful examples share the query's true label; "
          f"{same_pred}/{k * n_wrong} top-{k} harmful examples of misclassified queries carry the predicted label "
          f"(chance ~1/10)")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    png, out_json = args.out_dir / "influence_digits.png", args.out_dir / "influence_digits.json"
    plot_grid(rows, img_tr, img_te, k, args.method, png)
    result = {"method": args.method, "epochs": args.epochs, "seed": args.seed, "test_accuracy": test_acc,
              "test_loss": test_loss, "damping": analyzer.damping, "fit_s": fit_s, "score_s": score_s,
              "helpful_same_true_label": same_true, "harmful_same_pred_label": same_pred, "top_k": k,
              "queries": rows, "table": table, "png": str(png)}
    out_json.write_text(json.dumps(result, indent=1))
    print(f"wrote {png} and {out_json.name} ({time.perf_counter() - start:.1f}s in all)")
    return result


if __name__ == "__main__":
    main()
