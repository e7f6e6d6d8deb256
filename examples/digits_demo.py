"""SGD vs. K-FAC on scikit-learn's digits: a CPU demo that runs in seconds (``make demo``).

Trains the same small CNN (Conv2d -> Conv2d -> Linear -> Linear, all four preconditioned by K-FAC) three times
from the same initial weights, on the same mini-batches in the same order, for the same number of epochs:

* ``sgd``:          ``torch.optim.SGD(lr=--lr-sgd, momentum=0.9)``
* ``kfac-eigen``:   ``kfac.KFAC(model, SGD(lr=--lr-kfac, momentum=0.9), method="eigen", ...)``
* ``kfac-inverse``: the same with ``method="inverse"``

and prints one row per optimizer: the mean cross-entropy over the whole training split after the last step,
the test accuracy, the training wall time and the time per optimizer step. The data is
``sklearn.datasets.load_digits`` (1797 8x8 greyscale images of handwritten digits, shipped with scikit-learn;
nothing is downloaded), split 75/25 (stratified, ``random_state=0``) and standardised per pixel.

Usage::

    python examples/digits_demo.py [--epochs 5] [--batch-size 64] [--seed 0] [--lr-sgd 0.05] [--lr-kfac 0.05]
                                   [--threads 1] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _digits import KFAC_DEFAULTS, OPTIMIZERS, RunResult, load_data, train  # noqa: E402
from training.cli import HelpFormatter  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--epochs", type=int, default=5, help="passes over the training split")
    parser.add_argument("--batch-size", type=int, default=64, help="mini-batch size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batch order")
    parser.add_argument("--lr-sgd", type=float, default=0.05, help="learning rate of plain SGD")
    parser.add_argument("--lr-kfac", type=float, default=0.05, help="learning rate of the SGD inside K-FAC")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (the model is tiny: more threads mostly add overhead)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.threads < 1:
        parser.error("--epochs, --batch-size and --threads must be positive")
    return args


def format_table(results: list[RunResult], lrs: dict[str, float]) -> str:
    header = f"{'optimizer':<14}{'lr':>7}{'train loss':>12}{'test acc':>10}{'wall time':>11}{'time/step':>11}"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.name:<14}{lrs[r.name]:>7g}{r.train_loss:>12.4f}{100 * r.test_accuracy:>9.2f}%"
                     f"{r.wall_time_s:>10.2f}s{r.time_per_step_ms:>9.2f}ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[RunResult]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_data()
    if args.batch_size > data.n_train:
        raise SystemExit(f"--batch-size must be at most the {data.n_train} training examples")
    steps_per_epoch = data.n_train // args.batch_size
    lrs = {name: args.lr_sgd if name == "sgd" else args.lr_kfac for name in OPTIMIZERS}
    kfac_settings = ", ".join(f"{k}={v:g}" for k, v in KFAC_DEFAULTS.items())

    print("Data:  sklearn.datasets.load_digits (1797 8x8 greyscale handwritten digits, 10 classes; bundled "
          "with scikit-learn, no download)")
    print(f"       train/test {data.n_train}/{data.x_test.shape[0]} (stratified train_test_split, test_size=0.25, "
          f"random_state=0), standardised per pixel with training-split statistics")
    print("Model: Conv2d(1,16,3,p=1)-ReLU-Conv2d(16,32,3,p=1,s=2)-ReLU-Linear(512,64)-ReLU-Linear(64,10)")
    print(f"Run:   {args.epochs} epochs x {steps_per_epoch} steps, batch {args.batch_size}, seed {args.seed}, "
          f"float32, {torch.get_num_threads()} CPU thread(s); same init and batch order for every optimizer")
    print(f"       SGD momentum=0.9; K-FAC wraps that SGD with {kfac_settings}")
    print()

    for name in OPTIMIZERS:  # warm-up: keep one-time start-up costs (allocator, LAPACK) out of the timings
        train(name, data, lr=lrs[name], epochs=1, batch_size=args.batch_size, seed=args.seed, max_steps=3)
    results = []
    for name in OPTIMIZERS:
        results.append(train(name, data, lr=lrs[name], epochs=args.epochs, batch_size=args.batch_size,
                             seed=args.seed))
    print(format_table(results, lrs))
    print("\ntrain loss: mean cross-entropy over the full training split after the last step; "
          "wall time: training loop only")

    if args.json is not None:
        payload: dict[str, Any] = {
            "dataset": "sklearn.datasets.load_digits",
            "split": {"train": data.n_train, "test": int(data.x_test.shape[0]), "random_state": 0},
            "epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed,
            "momentum": 0.9, "kfac": KFAC_DEFAULTS,
            "results": [{**r.as_dict(), "lr": lrs[r.name]} for r in results],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
