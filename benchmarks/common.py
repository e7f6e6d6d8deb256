"""Pieces the benchmark scripts share: the model, synthetic data, schedule arithmetic, machine information and
how results are written (a compact summary JSON, the raw data only on request, a palette PNG).

Layout: ``benchmarks/cpu/`` holds the benchmarks that run (and were measured) on CPU, ``benchmarks/gpu/`` those
that need a CUDA device; each folder's ``results/`` holds what is committed from them. Every script runs as
``python benchmarks/<cpu|gpu>/<name>.py`` from anywhere (it puts the repository root on ``sys.path`` itself and
imports this module as ``benchmarks.common``), or as ``python -m benchmarks.<cpu|gpu>.<name>`` from the root. A
benchmark too large for one file keeps its pieces in a package beside its script (``cpu/ttr/`` for
``time_to_result.py`` and ``batch_scaling.py``, ``cpu/strategies/`` for ``distributed.py``, ``cpu/overhead/`` for
``step_overhead.py``, ``gpu/step/`` for ``gpu_step.py``); the script keeps the command line, the docstring (which
the JSON records) and the outputs.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import gc
import io
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

import kfac

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE = 32
NUM_CLASSES = 10
T = TypeVar("T")


def log(msg: str) -> None:
    """Print a progress line at once (benchmarks are often piped through ``tee``)."""
    print(msg, flush=True)


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """``(fn(), seconds it took)`` (wall clock)."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def rotated(items: Sequence[T], k: int) -> list[T]:
    """``items`` started at position ``k % len(items)``: the order of round ``k`` of interleaved timing windows, so
    that slow drifts of machine load hit every configuration alike."""
    k %= max(len(items), 1)
    return [*items[k:], *items[:k]]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """A full collection, then the garbage collector off for the block (timed windows)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def build_model(quick: bool, seed: int) -> nn.Module:
    """``resnet18(num_classes=10)`` (or, for ``--quick``, a tiny conv net) with deterministic weights."""
    torch.manual_seed(seed)
    if quick:
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(16, NUM_CLASSES),
        )
    import torchvision

    return torchvision.models.resnet18(num_classes=NUM_CLASSES)


def make_batches(n: int, batch: int, seed: int, image: int = IMAGE) -> list[tuple[Tensor, Tensor]]:
    """A pool of synthetic batches: ``image x image`` inputs ~ N(0, 1), labels uniform (timing only)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, image, image, generator=g), torch.randint(0, NUM_CLASSES, (batch,), generator=g))
            for _ in range(n)]


def count_events(start: int, steps: int, every: int) -> int:
    """How many step indices ``s`` in ``[start, start + steps)`` satisfy ``s % every == 0``."""
    return (start + steps - 1) // every - (start - 1) // every  # floor division, also right for start == 0


TRACKED_CODE = ("kfac", "benchmarks", "examples", "csrc", "setup.py", "pyproject.toml")
"""The paths whose local changes make a run's results untraceable (``benchmarks/*/results`` excluded: outputs)."""


def tree_state() -> dict[str, Any]:
    """``git_commit`` (HEAD), ``tree_clean`` (no local change, tracked or untracked, under :data:`TRACKED_CODE`)
    and the first ``changed_files``; ``None`` values outside a git checkout."""
    try:
        def git(*cmd: str) -> str:
            return subprocess.run(["git", *cmd], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
                                  check=True).stdout

        commit = git("rev-parse", "HEAD").strip() or None
        changed = [line[3:] for line in git("status", "--porcelain", "--", *TRACKED_CODE,
                                            ":(exclude)benchmarks/*/results/*").splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "tree_clean": None, "changed_files": None}
    return {"git_commit": commit, "tree_clean": not changed, "changed_files": changed[:10]}


AT_START = tree_state()
"""The tree when the benchmark started (imported first thing by every script); a dirty one is said loudly."""
if AT_START["tree_clean"] is False:
    print(f"\n{'!' * 100}\nWARNING: this benchmark runs on a DIRTY tree (changed files "
          f"under {', '.join(TRACKED_CODE)}: {', '.join(AT_START['changed_files'][:5])}).\nIts results cannot be "
          f"traced to commit {AT_START['git_commit']}; the JSON records tree_clean=false. Commit first to publish "
          f"them.\n{'!' * 100}\n", file=sys.stderr, flush=True)


def machine_info(**extra: Any) -> dict[str, Any]:
    """CPU, cores, library versions, date, and provenance: the git commit and whether the tree was clean (at the
    start of the run and now: a file changed mid-run makes it dirty; :func:`tree_state`); plus ``extra``."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    now = tree_state()
    clean = (None if now["tree_clean"] is None else
             bool(AT_START["tree_clean"] and now["tree_clean"] and now["git_commit"] == AT_START["git_commit"]))
    if clean is False:
        print("WARNING: results from a DIRTY tree (tree_clean=false): not traceable to a commit", file=sys.stderr)
    try:
        import torchvision

        tv = torchvision.__version__
    except ImportError:
        tv = None
    return {
        "cpu_model": cpu, "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__, "torchvision": tv,
        "kfac": kfac.__version__, "git_commit": AT_START["git_commit"], "tree_clean": clean,
        "changed_files": sorted(set(AT_START["changed_files"] or []) | set(now["changed_files"] or []))[:10],
        "python": platform.python_version(), "platform": platform.platform(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


# ----------------------------------------------------------------------------------------------------------
# outputs: a compact summary JSON (committed), the raw data only on request, a palette PNG
# ----------------------------------------------------------------------------------------------------------
RawKey = Sequence[str]
"""A path of keys to raw data inside a result record, ``"*"`` standing for every key of a dict / item of a list;
e.g. ``("report", "*", "seed_runs")``."""


def add_raw_argument(parser: Any, stem_help: str) -> None:
    """``--raw [PATH]``: also write the complete record (the summary plus the raw data) to PATH (default, for a
    bare ``--raw``: ``<out-dir>/<stem>.raw.json``, git-ignored like every ``*.raw.json``)."""
    parser.add_argument("--raw", nargs="?", const="auto", default=None, metavar="PATH",
                        help="also write the complete record, with the raw data the summary JSON leaves out "
                             f"(default PATH: <out-dir>/{stem_help}.raw.json; git-ignored). --quick outputs always "
                             "keep the raw data in their JSON")


def _drop(node: Any, path: Sequence[str]) -> None:
    if not path:
        return
    head, rest = path[0], path[1:]
    if head == "*":
        children: Iterable[Any] = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            _drop(child, rest)
    elif isinstance(node, dict) and head in node:
        if rest:
            _drop(node[head], rest)
        else:
            del node[head]


def summary_of(record: dict[str, Any], raw_keys: Iterable[RawKey]) -> dict[str, Any]:
    """A deep copy of ``record`` without the raw data at ``raw_keys``, noting what was left out and how to get it."""
    keys = [tuple(k) for k in raw_keys]
    out = copy.deepcopy(record)
    for k in keys:
        _drop(out, k)
    out["raw_data"] = {"omitted": [".".join(k) for k in keys],
                       "how": "rerun with --raw [PATH] to also write the complete record"}
    return out


def write_json(path: Path, data: Any, **dumps_kwargs: Any) -> Path:
    """Write ``data`` as JSON (plus a newline) atomically: a ``.tmp`` sibling, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, **dumps_kwargs) + "\n")
    os.replace(tmp, path)
    return path


def write_results(json_path: Path, record: dict[str, Any], raw_keys: Iterable[RawKey], *, raw: str | None,
                  embed_raw: bool, **dumps_kwargs: Any) -> dict[str, Any]:
    """Write the result JSON of a benchmark run and return what went into it.

    The JSON is the summary (``record`` less ``raw_keys``, see :func:`summary_of`) unless ``embed_raw`` (``--quick``
    smoke runs, never committed, whose raw data the tests check), when it is the complete record. ``raw`` (the
    ``--raw`` argument: None, ``"auto"`` or a path) also writes the complete record there."""
    keys = [tuple(k) for k in raw_keys]
    written = record if embed_raw or not keys else summary_of(record, keys)
    write_json(json_path, written, **dumps_kwargs)
    print(f"wrote {json_path}", flush=True)
    if raw is not None:
        raw_path = json_path.with_suffix(".raw.json") if raw == "auto" else Path(raw)
        write_json(raw_path, record, **dumps_kwargs)
        print(f"wrote {raw_path} (complete record, raw data included)", flush=True)
    return written


def save_png(fig: Any, path: Path, dpi: int) -> None:
    """``fig.savefig(path, dpi=dpi)``, stored as a 256-colour palette PNG (about a third of the bytes of matplotlib's
    RGBA, visually the same for these plots); plain ``savefig`` when Pillow is missing."""
    try:
        from PIL import Image
    except ImportError:
        fig.savefig(path, dpi=dpi)
        return
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    buf.seek(0)
    with Image.open(buf) as im:
        quantised = im.convert("RGB").quantize(colors=256, method=getattr(Image, "Quantize", Image).MEDIANCUT)
    quantised.save(path, format="PNG", optimize=True)
