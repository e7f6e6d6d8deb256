"""The flags both ResNet examples share. The second-order options default to the package's own defaults, read from
``kfac`` (:func:`package_defaults`), unless a script takes them from a published recipe (:class:`Recipe`), which
``--help`` then says, next to the package's value."""

from __future__ import annotations

import argparse
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kfac
from kfac.optimizer import DEFAULTS as KFAC_WRAPPER_DEFAULTS
from training.cli import HelpFormatter

OPTIMIZERS = ("sgd", "kfac", "ekfac", "mfac")
KFAC_OPTIONS = ("factor_update_steps", "inv_update_steps", "damping", "factor_decay", "kl_clip")
"""The K-FAC / EK-FAC options (``kfac.KFAC`` / ``kfac.EKFAC`` keyword arguments) the examples expose."""
MFAC_OPTIONS = ("num_grads", "damping", "kl_clip")
"""The M-FAC options (``kfac.MFAC`` keyword arguments) the examples expose."""


def _signature_defaults(cls: type) -> dict[str, Any]:
    return {k: v.default for k, v in inspect.signature(cls).parameters.items()
            if v.default is not inspect.Parameter.empty}


def package_defaults() -> dict[str, dict[str, Any]]:
    """The package's defaults of the options the examples share: ``kfac`` (what ``kfac.KFAC`` uses when an option is
    not passed: its :data:`kfac.optimizer.DEFAULTS` over :class:`kfac.KFACPreconditioner`'s signature; ``kfac.EKFAC``
    the same) and ``mfac`` (:class:`kfac.MFACPreconditioner`'s signature)."""
    kfac_defaults = {**_signature_defaults(kfac.KFACPreconditioner), **KFAC_WRAPPER_DEFAULTS}
    mfac_defaults = _signature_defaults(kfac.MFACPreconditioner)
    return {"kfac": {k: kfac_defaults[k] for k in KFAC_OPTIONS}, "mfac": {k: mfac_defaults[k] for k in MFAC_OPTIONS}}


def _value(v: Any) -> str:
    return "off" if v is None else f"{v:g}"


@dataclass(frozen=True)
class Recipe:
    """K-FAC/EK-FAC settings (``KFAC_OPTIONS``) a script takes from a published recipe instead of the package's
    defaults; ``source`` names the recipe, the reason ``--help`` gives for each value that differs."""

    source: str
    values: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.values) - set(KFAC_OPTIONS))
        if unknown:
            raise ValueError(f"Recipe: unknown K-FAC options {unknown}; choose from {KFAC_OPTIONS}")

    def note(self, name: str, pkg: dict[str, dict[str, Any]], *, bare: bool = False) -> str:
        """What ``--help`` says of option ``name``'s default: the package's, or this recipe's and why."""
        ours, theirs = self.values.get(name, pkg["kfac"][name]), pkg["kfac"][name]
        text = ", the package's" if ours == theirs else f", {self.source}; the package's default is {_value(theirs)}"
        return text if bare else " (default: %(default)s" + text + ")"


def _milestones(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()] if text else []


def make_parser(description: str, *, recipe: Recipe | None = None, **defaults: Any) -> argparse.ArgumentParser:
    """The flags both examples share; ``defaults`` overrides their defaults (per-script hyperparameters),
    ``recipe`` the K-FAC/EK-FAC settings that the script takes from a published recipe instead of the package's
    defaults (which ``--help`` names with the package's value). Every other second-order option defaults to the
    package's own default (:func:`package_defaults`)."""
    fixed = sorted(set(defaults) & {*KFAC_OPTIONS, *MFAC_OPTIONS, "kfac_damping", "mfac_damping"})
    if fixed:
        raise ValueError(f"K-FAC options {fixed}: pass them as a Recipe (a stated reason), not as plain defaults")
    recipe = recipe or Recipe("")
    pkg = package_defaults()
    ours = {**pkg["kfac"], **recipe.values}
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", type=Path, default=None, help="data set root (see the script's docstring); "
                   "without it the script's offline default is used and announced")
    g.add_argument("--workers", type=int, default=None, help="data loader workers per process "
                   "(default: 0 for in-memory data, 4 otherwise)")
    g.add_argument("--test-batch-size", type=int, default=256, help="evaluation batch per process")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=100, help="length of the run and of the LR schedule")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps in total (the schedule still spans --epochs)")
    g.add_argument("--batch-size", type=int, default=128,
                   help="GLOBAL batch per step (divided evenly among the processes)")
    g.add_argument("--lr", type=float, default=0.1, help="peak learning rate (for the global batch)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--nesterov", action="store_true")
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--warmup-epochs", type=float, default=5.0, help="linear warm-up from lr/warmup_steps to lr")
    g.add_argument("--lr-schedule", choices=("cosine", "multistep", "constant"), default="multistep")
    g.add_argument("--lr-milestones", type=_milestones, default="35,75,90",
                   help="multistep: comma-separated epochs at which the lr is multiplied by --lr-decay")
    g.add_argument("--lr-decay", type=float, default=0.1)
    g.add_argument("--seed", type=int, default=42, help="initial weights, data order and augmentation")
    g.add_argument("--amp", action="store_true",
                   help="CUDA only: float16 autocast + GradScaler (passed to K-FAC as grad_scaler=)")
    g.add_argument("--sync-bn", action="store_true", help="CUDA only: SyncBatchNorm across processes")
    g.add_argument("--norm", choices=("batch", "group"), default="batch", help="normalisation layers")
    g.add_argument("--no-cuda", action="store_true", help="run on the CPU (gloo) even if CUDA is available")
    g.add_argument("--deterministic", action="store_true", help="deterministic (slower) CUDA kernels")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    g.add_argument("--dist-timeout", type=float, default=1800.0, help="seconds before a stuck collective fails")
    g = p.add_argument_group("second-order optimizer (wraps SGD with --lr/--momentum/--weight-decay)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="kfac",
                   help="sgd alone, or K-FAC / EK-FAC / M-FAC preconditioning it")
    g.add_argument("--kfac-method", choices=("eigen", "inverse"), default="eigen", help="--optimizer kfac only")
    g.add_argument("--factor-update-steps", type=int, default=ours["factor_update_steps"],
                   help="steps between K-FAC/EK-FAC factor updates" + recipe.note("factor_update_steps", pkg))
    g.add_argument("--inv-update-steps", type=int, default=ours["inv_update_steps"],
                   help="steps between K-FAC decomposition refreshes (EK-FAC: eigenbasis refreshes)"
                        + recipe.note("inv_update_steps", pkg))
    g.add_argument("--damping", type=float, default=None,
                   help=f"K-FAC/EK-FAC/M-FAC damping (default: {ours['damping']:g} for K-FAC and EK-FAC"
                        + recipe.note("damping", pkg, bare=True)
                        + f"; {pkg['mfac']['damping']:g} for M-FAC, the package's)")
    g.add_argument("--factor-decay", type=float, default=ours["factor_decay"],
                   help="running-average decay of the K-FAC factors" + recipe.note("factor_decay", pkg))
    mfac_clip = pkg["mfac"]["kl_clip"]
    g.add_argument("--kl-clip", type=float, default=ours["kl_clip"],
                   help="trust-region bound on the preconditioned step, for every second-order optimizer; 0 disables "
                        "it" + recipe.note("kl_clip", pkg)[:-1]
                        + ("" if mfac_clip == ours["kl_clip"] else
                           f"; M-FAC's package default is {_value(mfac_clip)}: kept here, so that --lr bounds "
                           "M-FAC's step as it bounds K-FAC's") + ")")
    g.add_argument("--strategy", choices=("comm-opt", "mem-opt", "hybrid", "dp-kfac"), default=None,
                   help="distributed K-FAC strategy (default: the library's choice by world size; comm-opt "
                        "for EK-FAC)")
    g.add_argument("--grad-worker-fraction", type=float, default=None, help="hybrid strategy only")
    g.add_argument("--skip-layers", nargs="*", default=[], help="module names/classes/regexes K-FAC leaves alone")
    g.add_argument("--num-grads", type=int, default=pkg["mfac"]["num_grads"],
                   help="M-FAC gradient window (default: %(default)s, the package's)")
    g.add_argument("--mfac-blocks", choices=("global", "per_layer"), default="global",
                   help="M-FAC: one Fisher over the whole model or one per layer")
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="save every epoch (and --checkpoint-every steps); resume from the latest checkpoint here")
    g.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (0: off)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="how many to keep (0: all)")
    g.add_argument("--log-dir", type=Path, default=None, help="TensorBoard event files (rank 0)")
    g.add_argument("--log-interval", type=int, default=10, help="steps between train scalars")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.set_defaults(kfac_damping=ours["damping"], mfac_damping=pkg["mfac"]["damping"], **defaults)
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size", "test_batch_size", "factor_update_steps", "inv_update_steps",
                 "num_grads", "log_interval"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_steps is not None and args.max_steps < 0:
        p.error("--max-steps must be >= 0")
    if args.checkpoint_every < 0 or args.keep_checkpoints < 0 or (args.workers or 0) < 0:
        p.error("--checkpoint-every, --keep-checkpoints and --workers must be >= 0")
    if args.warmup_epochs < 0 or not 0 <= args.label_smoothing < 1:
        p.error("--warmup-epochs must be >= 0 and --label-smoothing in [0, 1)")

