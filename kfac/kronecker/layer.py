"""A tracked layer's state between steps: its module, adapter and factor entry, and the statistics its hooks have
summed since the last step (the one record that statistics collection, the corrections and the guards share)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ..distributed.reduction import PendingStats
from ..modules import ModuleAdapter
from .store import FactorEntry

__all__ = ["LayerState"]


@dataclass(eq=False)
class LayerState:
    """A tracked layer and its statistics pending since the last step."""

    name: str
    module: nn.Module
    adapter: ModuleAdapter
    entry: FactorEntry
    input_name: str | None = None  # forward()'s first parameter, for inputs passed by keyword
    handles: list[Any] = field(default_factory=list)
    a_sum: Tensor | None = None
    a_count: int = 0
    g_sum: Tensor | None = None
    g_count: int = 0
    g_expected: int = 0  # forward uses since the last step whose output gradient feeds G
    g_received: int = 0  # ... and how many of those gradients arrived
    g_calls: int = 0     # backward passes that delivered the gradients of every use so far
    forward_calls: int = 0
    corr_sum: Tensor | None = None  # EK-FAC: sum over examples of (QG^T V_n QA)^2 / T_n, and the example count
    corr_count: int = 0
    sampled_outputs: list[Tensor] = field(default_factory=list)  # fisher="mc": outputs awaiting sampled_backward

    def discard_pending(self) -> None:
        self.a_sum = self.g_sum = None
        self.a_count = self.g_count = self.g_calls = self.g_expected = self.g_received = 0
        self.corr_sum = None
        self.corr_count = 0
        self.sampled_outputs.clear()

    def pending(self) -> PendingStats:
        """The statistics to reduce (none unless both factors saw rows)."""
        if not (self.a_count and self.g_count):
            return PendingStats(None, 0, None, 0)
        return PendingStats(self.a_sum, self.a_count, self.g_sum, self.g_count)
