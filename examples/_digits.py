"""Shared pieces of the digits demo and its convergence test: data, model, optimizers and a training loop.

The data is scikit-learn's bundled copy of the UCI optical handwritten digits (``sklearn.datasets.load_digits``:
1797 greyscale 8x8 images, 10 classes), so nothing is downloaded. It is split once with
``train_test_split(test_size=0.25, random_state=0, stratify=y)`` and standardised per pixel with statistics of
the training split only.

Everything that consumes randomness takes an explicit seed (the model is initialised under ``torch.manual_seed``
with the global RNG state restored afterwards; the batch order comes from its own ``torch.Generator``), so two
runs with the same seed see identical initial weights and identical batches whichever optimizer they use.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kfac

__all__ = [
    "OPTIMIZERS", "DigitsData", "RunResult", "load_data", "make_model", "make_optimizer", "batch_indices",
    "evaluate", "train",
]

OPTIMIZERS = ("sgd", "kfac-eigen", "kfac-inverse", "ekfac")
"""Names accepted by :func:`make_optimizer`."""

KFAC_DEFAULTS: dict[str, Any] = {
    "factor_update_steps": 1,
    "inv_update_steps": 10,
    "damping": 0.3,
    "factor_decay": 0.95,
    "kl_clip": 1e-3,
}
"""K-FAC settings of the demo. The model is small, so factors are cheap to update every step. ``damping`` is large
because, as in KAISA, ``G`` is built from gradients of the batch-*mean* loss and so is ~``1/batch_size**2`` the
per-example Fisher scale; with ``kl_clip`` this keeps both methods stable over longer runs."""


@dataclass(frozen=True)
class DigitsData:
    """Standardised digits images as ``(N, 1, 8, 8)`` float32 tensors and int64 labels."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def n_train(self) -> int:
        return self.x_train.shape[0]


@dataclass
class RunResult:
    """What one training run produced."""

    name: str
    steps: int
    train_loss: float
    """Mean cross-entropy over the full training split after the last step (eval mode, no grad)."""
    test_loss: float
    test_accuracy: float
    wall_time_s: float
    """Time spent in the training loop (forward, backward, optimizer step); evaluation excluded."""
    step_losses: list[float] = field(default_factory=list)
    """Loss of each training mini-batch, before its step."""
    preconditioned: tuple[str, ...] = ()
    """Modules K-FAC preconditioned (empty for plain SGD)."""

    @property
    def time_per_step_ms(self) -> float:
        return 1e3 * self.wall_time_s / max(self.steps, 1)

    def as_dict(self) -> dict[str, Any]:
        return {"optimizer": self.name, "steps": self.steps, "train_loss": self.train_loss,
                "test_loss": self.test_loss, "test_accuracy": self.test_accuracy,
                "wall_time_s": self.wall_time_s, "time_per_step_ms": self.time_per_step_ms}


def load_data(*, test_size: float = 0.25, random_state: int = 0) -> DigitsData:
    """The fixed, standardised train/test split of ``sklearn.datasets.load_digits``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=random_state, stratify=y)
    scaler = StandardScaler().fit(x_tr)  # constant (always-zero) border pixels keep scale 1

    def images(a: Any) -> Tensor:
        return torch.as_tensor(scaler.transform(a), dtype=torch.float32).reshape(-1, 1, 8, 8)

    def labels(a: Any) -> Tensor:
        return torch.as_tensor(a, dtype=torch.int64)

    return DigitsData(images(x_tr), labels(y_tr), images(x_te), labels(y_te))


def make_model(seed: int) -> nn.Sequential:
    """A small CNN with two Conv2d and two Linear layers (all four are preconditioned by K-FAC)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),  # 8x8 -> 4x4
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
            nn.Linear(64, 10),
        )
    finally:
        torch.random.set_rng_state(gen_state)
    return model


def make_optimizer(name: str, model: nn.Module, *, lr: float, momentum: float = 0.9,
                   **kfac_kwargs: Any) -> torch.optim.Optimizer:
    """Plain SGD (``"sgd"``), or K-FAC (``"kfac-eigen"``, ``"kfac-inverse"``) / EK-FAC (``"ekfac"``) wrapping the
    same SGD."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    base = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    if name == "sgd":
        return base
    options = {**KFAC_DEFAULTS, **kfac_kwargs}
    if name == "ekfac":
        return kfac.EKFAC(model, base, **options)
    return kfac.KFAC(model, base, method=name.split("-", 1)[1], **options)


def batch_indices(n: int, batch_size: int, *, epochs: int, seed: int) -> Iterator[Tensor]:
    """Index tensors of the mini-batches of ``epochs`` shuffled passes (the last partial batch is dropped)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start:start + batch_size]


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)`` in one eval-mode pass."""
    was_training = model.training
    model.eval()
    try:
        logits = model(x)
        loss = F.cross_entropy(logits, y).item()
        acc = (logits.argmax(dim=1) == y).float().mean().item()
    finally:
        model.train(was_training)
    return loss, acc


def train(name: str, data: DigitsData, *, lr: float, epochs: int, batch_size: int = 64, seed: int = 0,
          max_steps: int | None = None, momentum: float = 0.9, **kfac_kwargs: Any) -> RunResult:
    """Train a fresh :func:`make_model` with optimizer ``name`` and report losses, accuracy and timing."""
    model = make_model(seed)
    opt = make_optimizer(name, model, lr=lr, momentum=momentum, **kfac_kwargs)
    model.train()
    step_losses: list[float] = []
    start = time.perf_counter()
    for idx in batch_indices(data.n_train, batch_size, epochs=epochs, seed=seed):
        if max_steps is not None and len(step_losses) >= max_steps:
            break
        opt.zero_grad()
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        loss.backward()
        opt.step()
        step_losses.append(loss.item())
    wall = time.perf_counter() - start
    train_loss, _ = evaluate(model, data.x_train, data.y_train)
    test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
    layers = tuple(opt.preconditioner.layers) if isinstance(opt, kfac.KFAC) else ()
    return RunResult(name=name, steps=len(step_losses), train_loss=train_loss, test_loss=test_loss,
                     test_accuracy=test_acc, wall_time_s=wall, step_losses=step_losses, preconditioned=layers)
