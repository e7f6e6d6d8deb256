"""What an influence query needs to know about a model and its data."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Task", "ClassificationTask"]


class Task:
    """Subclass it to describe per-example losses and measurements (kronfluence's ``Task``, in fewer methods).

    * :meth:`loss`: per-example training losses ``L(z_n)`` with the data's own labels, shape ``[B]``;
    * :meth:`measurement`: the per-query quantity ``f`` whose change we attribute, shape ``[B]`` (default: the loss);
    * :meth:`sampled_loss`: per-example losses on labels sampled from the model's predictive distribution (needed
      for ``fisher="mc"``, the default for fitting factors).
    """

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        raise NotImplementedError("Task.loss(model, batch) must return the per-example losses, shape [B]")

    def measurement(self, model: nn.Module, batch: Any) -> Tensor:
        return self.loss(model, batch)

    def sampled_loss(self, model: nn.Module, batch: Any, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} does not implement sampled_loss(), needed by fisher='mc'; implement it or fit "
            "with fisher='empirical'")


class ClassificationTask(Task):
    """Batches ``(inputs, labels)`` (a tuple/list, or a mapping with ``input_key``/``label_key``) and a model that
    returns logits; losses are cross-entropies."""

    def __init__(self, *, input_key: str = "input", label_key: str = "label") -> None:
        self.input_key, self.label_key = input_key, label_key

    def _split(self, batch: Any) -> tuple[Tensor, Tensor]:
        if isinstance(batch, dict):
            missing = [k for k in (self.input_key, self.label_key) if k not in batch]
            if missing:
                raise KeyError(f"ClassificationTask: batch has no field(s) {missing} (fields: {sorted(batch)})")
            return batch[self.input_key], batch[self.label_key]
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return batch[0], batch[1]
        raise TypeError(f"ClassificationTask expects (inputs, labels) batches, got {type(batch).__name__}")

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        x, y = self._split(batch)
        return F.cross_entropy(model(x), y, reduction="none")

    def sampled_loss(self, model: nn.Module, batch: Any, generator: torch.Generator | None = None) -> Tensor:
        x, _ = self._split(batch)
        logits = model(x)
        with torch.no_grad():
            probs = torch.softmax(logits.detach().float(), dim=-1)
            labels = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        return F.cross_entropy(logits, labels, reduction="none")
