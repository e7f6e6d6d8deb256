"""The distribution options of a K-FAC preconditioner, typed and validated once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DistributedConfig", "FACTOR_REDUCTIONS"]

FACTOR_REDUCTIONS = ("global", "local")


@dataclass(frozen=True)
class DistributedConfig:
    """How K-FAC shares its work between ranks (see the README's distributed guide).

    Attributes:
        strategy: ``"comm-opt"``, ``"mem-opt"``, ``"hybrid"`` or ``"dp-kfac"``; ``None`` lets the planner choose by
            world size (``comm-opt`` up to 8 ranks).
        grad_worker_fraction: fraction of ranks that precondition each layer (``"hybrid"`` only).
        factor_reduction: ``"global"`` (factors over the global batch) or ``"local"`` (``dp-kfac`` owners use their
            own batch: no factor traffic, a different estimate).
        comm_dtype: floating dtype on the wire for factors, decompositions and gradients (``None``: their own).
        process_group: the ``torch.distributed`` group K-FAC works in (``None``: the default group).
        cost_model: the planner's :class:`kfac.planner.CostModel` (``None``: defaults with this run's element
            sizes).
        memory_cap: bytes of factors and decompositions per rank the planner may use (``None``: no cap).
        split_factors: allow a layer's ``A`` and ``G`` on different ranks (``None``: by predicted time).
        bucket_cap_mb: size of the factor-reduction buckets launched during the backward pass.
        step_timeout: seconds a rank waits in ``step()`` for the others before a clear error naming the step and
            the ranks that did not arrive (one tiny all-gather per step on a gloo side group, beside NCCL too);
            ``None``: no check (a rank that skips ``step()`` then hangs every rank until the process-group timeout).
    """

    strategy: str | None = None
    grad_worker_fraction: float | None = None
    factor_reduction: str = "global"
    comm_dtype: torch.dtype | None = None
    process_group: Any | None = None
    cost_model: Any | None = None
    memory_cap: int | None = None
    split_factors: bool | None = None
    bucket_cap_mb: float = 25.0
    step_timeout: float | None = 300.0

    def __post_init__(self) -> None:
        if self.factor_reduction not in FACTOR_REDUCTIONS:
            raise ValueError(f"factor_reduction must be one of {FACTOR_REDUCTIONS}, got {self.factor_reduction!r}")
        if self.comm_dtype is not None and not (isinstance(self.comm_dtype, torch.dtype)
                                                and self.comm_dtype.is_floating_point):
            raise ValueError(f"comm_dtype must be a floating point torch.dtype (e.g. torch.bfloat16), got "
                             f"{self.comm_dtype!r}: integer dtypes would truncate factors and decompositions on the "
                             "wire")
        if isinstance(self.bucket_cap_mb, bool) or not isinstance(self.bucket_cap_mb, (int, float)) \
                or not self.bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be positive, got {self.bucket_cap_mb!r}")
        if self.step_timeout is not None and (isinstance(self.step_timeout, bool) or not isinstance(
                self.step_timeout, (int, float)) or not 0 < self.step_timeout < float("inf")):
            raise ValueError(f"step_timeout must be a positive number of seconds or None, got {self.step_timeout!r}")

    @property
    def bucket_cap_bytes(self) -> int:
        return int(self.bucket_cap_mb * 2**20)

    def comparable(self) -> dict[str, Any]:
        """The options every rank must share, JSON-comparable (the process group and cost model aside)."""
        return {"strategy": self.strategy, "grad_worker_fraction": self.grad_worker_fraction,
                "factor_reduction": self.factor_reduction,
                "comm_dtype": None if self.comm_dtype is None else str(self.comm_dtype),
                "memory_cap": self.memory_cap, "split_factors": self.split_factors,
                "bucket_cap_mb": self.bucket_cap_mb, "step_timeout": self.step_timeout}
