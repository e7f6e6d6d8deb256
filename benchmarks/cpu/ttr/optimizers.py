"""The optimizers compared, their learning-rate grids and which of them this environment has.

* ``sgd``: ``torch.optim.SGD`` with momentum 0.9.
* ``adamw``: ``torch.optim.AdamW`` with weight decay 0.
* ``muon``: ``torch.optim.Muon`` (its defaults otherwise, weight decay 0.1 included) on the workload's
  ``matrices`` (every 2-d weight of the MLPs and the CNN, the output layer included, so the CNN's 4-d conv kernels are
  *not* Muon's; the LM's transformer-layer matrices, its embeddings and head excluded as Muon's docs recommend),
  ``AdamW(lr=1e-3, weight_decay=0)`` on the rest.
* ``soap``: ``pytorch_optimizer.SOAP`` (its default betas and preconditioning frequency, weight decay 0).
* ``kfac``: ``kfac.KFAC(model, SGD(lr, momentum=0.9))`` at the library's defaults.
* ``adaptive``: ``kfac.KFAC(model, SGD(lr=1.0), adaptive=AdaptiveConfig(loss=workload.adaptive_loss))``, untuned.

Every kind but ``adaptive`` has its learning rate chosen from ``GRIDS``: the same grid for every workload and batch
size, wide enough that the chosen lr was inside it in the sizing runs (tuning flags an lr at the edge), but for
K-FAC on the LM, where ``kl_clip`` makes every lr from 0.3 up nearly the same. ``make`` returns one optimizer or, for Muon, a list
of two; ``adaptive`` is stepped with the loss closure, the others after ``backward``.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

import kfac
from kfac.adaptive.controller import AdaptiveConfig

from .workloads import Workload

KINDS = ("sgd", "adamw", "muon", "soap", "kfac", "adaptive")
PEERS = ("sgd", "adamw", "muon", "soap")
"""The first-order optimizers whose best median final metric is the target."""

GRIDS: dict[str, list[float]] = {
    "sgd": [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0],
    "adamw": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
    "muon": [0.003, 0.01, 0.03, 0.1, 0.3, 1.0],
    "soap": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
    "kfac": [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0],
}
QUICK_GRIDS = {"sgd": [0.1, 1.0], "adamw": [1e-3, 1e-2], "muon": [0.03, 0.1], "soap": [1e-3, 1e-2],
               "kfac": [0.1, 1.0]}
"""``--quick``: two points per grid, in the middle of each."""


def make(kind: str, model: nn.Module, lr: float | None, wl: Workload) -> Any:
    """The optimizer ``kind`` for ``model`` at learning rate ``lr`` (None for ``adaptive``)."""
    if kind == "adaptive":
        return kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=1.0),
                         adaptive=AdaptiveConfig(loss=wl.adaptive_loss))
    if lr is None:
        raise ValueError(f"{kind} needs a learning rate")
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    if kind == "muon":
        mats = wl.matrices(model)
        ids = {id(p) for p in mats}
        rest = [p for p in model.parameters() if id(p) not in ids]
        return [torch.optim.Muon(mats, lr=lr), torch.optim.AdamW(rest, lr=1e-3, weight_decay=0.0)]
    if kind == "soap":
        from pytorch_optimizer import SOAP

        return SOAP(model.parameters(), lr=lr, weight_decay=0.0)
    if kind == "kfac":
        return kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
    raise ValueError(kind)


def available(kind: str) -> bool:
    """Muon needs torch >= 2.9; SOAP needs the ``benchmarks`` extra (``pip install -e '.[benchmarks]'``)."""
    if kind == "muon":
        return hasattr(torch.optim, "Muon")
    if kind == "soap" and importlib.util.find_spec("pytorch_optimizer") is None:
        print("note: SOAP skipped (pip install -e '.[benchmarks]' for pytorch-optimizer)")
        return False
    return True


def kinds() -> list[str]:
    """The optimizers this environment has, in ``KINDS`` order."""
    return [k for k in KINDS if available(k)]


def grid(kind: str, quick: bool = False) -> list[float] | None:
    """The lr grid of ``kind`` (None: untuned)."""
    if kind not in GRIDS:
        return None
    return QUICK_GRIDS[kind] if quick else GRIDS[kind]
