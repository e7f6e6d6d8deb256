"""What an influence query needs to know about a model and its data."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Task", "ClassificationTask", "CausalLMTask"]


class Task:
    """Subclass it to describe per-example losses and measurements (kronfluence's ``Task``, in fewer methods).

    * :meth:`loss`: per-example training losses ``L(z_n)`` with the data's own labels, shape ``[B]``;
    * :meth:`measurement`: the per-query quantity ``f`` whose change we attribute, shape ``[B]`` (default: the loss);
    * :meth:`sampled_loss`: per-example losses on labels sampled from the model's predictive distribution (needed
      for ``fisher="mc"``, the default for fitting factors);
    * :meth:`positions`: which positions of each example count (``[B, T]``, e.g. an attention mask), or ``None``:
      rows of layers with ``T`` positions per example at positions that do not count are left out of ``A``,
      ``G`` and the row counts when fitting;
    * :meth:`outputs` and :meth:`output_loss`: the network's outputs ``z`` and the per-example losses as a function
      of them (``loss = output_loss(outputs(model, batch), batch)``), needed by ``solver="ggn"`` for the
      Gauss-Newton matrix ``J^T (d^2 L / dz^2) J``.
    """

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        raise NotImplementedError("Task.loss(model, batch) must return the per-example losses, shape [B]")

    def measurement(self, model: nn.Module, batch: Any) -> Tensor:
        return self.loss(model, batch)

    def positions(self, batch: Any) -> Tensor | None:
        return None

    def outputs(self, model: nn.Module, batch: Any) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not implement outputs(model, batch) and "
                                  "output_loss(outputs, batch), needed by solver='ggn'; or use solver='hessian'")

    def output_loss(self, outputs: Tensor, batch: Any) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not implement output_loss(outputs, batch), needed by "
                                  "solver='ggn'; or use solver='hessian'")

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
        return self.output_loss(self.outputs(model, batch), batch)

    def outputs(self, model: nn.Module, batch: Any) -> Tensor:
        return model(self._split(batch)[0])

    def output_loss(self, outputs: Tensor, batch: Any) -> Tensor:
        return F.cross_entropy(outputs, self._split(batch)[1], reduction="none")

    def sampled_loss(self, model: nn.Module, batch: Any, generator: torch.Generator | None = None) -> Tensor:
        x, _ = self._split(batch)
        logits = model(x)
        with torch.no_grad():
            probs = torch.softmax(logits.detach().float(), dim=-1)
            labels = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        return F.cross_entropy(logits, labels, reduction="none")


class CausalLMTask(Task):
    """Causal language models: batches are token ids ``(B, T)`` or a mapping with ``input_ids`` (and optionally
    ``attention_mask``, 1 for real tokens); the model maps ids to logits ``(B, T, V)`` (a tensor, or an output with
    ``.logits`` as Hugging Face models return). An example's loss is the *sum* of its next-token cross-entropies
    over the target positions whose mask is 1 (kronfluence's convention for language models)."""

    def __init__(self, *, input_key: str = "input_ids", mask_key: str = "attention_mask") -> None:
        self.input_key, self.mask_key = input_key, mask_key

    def _split(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        if isinstance(batch, Tensor):
            return batch, None
        if isinstance(batch, dict):
            if self.input_key not in batch:
                raise KeyError(f"CausalLMTask: batch has no field {self.input_key!r} (fields: {sorted(batch)})")
            return batch[self.input_key], batch.get(self.mask_key)
        raise TypeError(f"CausalLMTask expects a tensor of token ids or a mapping, got {type(batch).__name__}")

    def _logits(self, model: nn.Module, ids: Tensor, mask: Tensor | None) -> Tensor:
        out = model(ids) if mask is None else model(ids, attention_mask=mask)
        logits = getattr(out, "logits", out)
        if not isinstance(logits, Tensor) or logits.dim() != 3:
            raise TypeError("CausalLMTask: the model must return logits of shape (B, T, V) (or an output with .logits)")
        return logits[:, :-1]

    def _summed(self, logits: Tensor, targets: Tensor, mask: Tensor | None) -> Tensor:
        losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T-1)
        if mask is not None:
            losses = losses * mask[:, 1:].to(losses.dtype)
        return losses.sum(1)

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        return self.output_loss(self.outputs(model, batch), batch)

    def outputs(self, model: nn.Module, batch: Any) -> Tensor:
        """The logits that predict the next tokens, ``(B, T - 1, V)``."""
        ids, mask = self._split(batch)
        return self._logits(model, ids, mask)

    def output_loss(self, outputs: Tensor, batch: Any) -> Tensor:
        ids, mask = self._split(batch)
        return self._summed(outputs, ids[:, 1:], mask)

    def positions(self, batch: Any) -> Tensor | None:
        """The attention mask: padded tokens do not count."""
        return self._split(batch)[1]

    def sampled_loss(self, model: nn.Module, batch: Any, generator: torch.Generator | None = None) -> Tensor:
        ids, mask = self._split(batch)
        logits = self._logits(model, ids, mask)
        with torch.no_grad():
            probs = torch.softmax(logits.detach().float(), dim=-1)
            sampled = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
        return self._summed(logits, sampled.reshape(ids[:, 1:].shape), mask)
