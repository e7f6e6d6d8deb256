"""What the GPU step-time benchmark times: the goal, the configurations, their hyperparameters, the model setups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GOAL = 1.25
ALL_CONFIGS: tuple[str, ...] = ("sgd", "kfac-eigen", "kfac-inverse", "ekfac", "mfac")
DEFAULT_CONFIGS: tuple[str, ...] = ("sgd", "kfac-eigen", "kfac-inverse", "ekfac")
SGD_KWARGS: dict[str, float] = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-5}
KFAC_KWARGS: dict[str, float] = {"damping": 1e-3, "kl_clip": 1e-3}
MFAC_KWARGS: dict[str, Any] = {"num_grads": 32, "damping": 1e-4, "kl_clip": 1e-3}


@dataclass(frozen=True)
class Setup:
    model: str
    num_classes: int
    image: int
    batch: int
    schedule: tuple[int, int]
    skip_layers: tuple[str, ...] = ()
    mfac_num_grads: int = 32


FULL = Setup("torchvision resnet50(weights=None), 1000 classes", 1000, 224, 64, (10, 100))
QUICK = Setup("torchvision resnet18(num_classes=10) (quick smoke test; layer3/layer4 not preconditioned)",
              10, 32, 8, (2, 4), skip_layers=("layer3", "layer4"), mfac_num_grads=4)


