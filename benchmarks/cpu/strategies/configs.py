"""The configurations the distributed benchmark compares, and the hyperparameters they share."""

from __future__ import annotations

from typing import Any

SGD_KWARGS: dict[str, float] = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
KFAC_KWARGS: dict[str, float] = {"damping": 1e-3}  # factor_decay, kl_clip: kfac defaults (0.95, 1e-3)
# label -> KFAC keyword arguments (None: plain SGD baseline)
CONFIGS: dict[str, dict[str, Any] | None] = {
    "sgd": None,
    "comm-opt": {"strategy": "comm-opt"},
    "mem-opt": {"strategy": "mem-opt"},
    "hybrid-0.5": {"strategy": "hybrid", "grad_worker_fraction": 0.5},
    "dp-kfac": {"strategy": "dp-kfac"},
}
PLAN_CATEGORIES: dict[str, str] = {  # bytes_sent category -> Plan.comm field
    "factors": "factor_reduction", "decompositions": "decomposition_broadcast", "gradients": "gradient_broadcast"}
