"""Statistics collection: the forward/backward hooks that sum each tracked layer's factor statistics.

Per layer and step, the forward hook adds ``a^T a`` of the input rows (and counts them) and registers a hook on the
output; that hook adds ``g^T g`` of the output-gradient rows (undoing an AMP loss scale). A layer applied ``k``
times per forward collects all ``k`` uses; its statistics are *final* once the gradients of every use of the last
accumulated micro-batch have arrived, and only then may its bucket's reduction start (:mod:`kfac.distributed`).
Forwards re-run inside a backward pass (activation checkpointing) are not new uses. EK-FAC's per-example
projections ride on the same output hook (:mod:`kfac.kronecker.corrections`).
"""

from __future__ import annotations

import functools
import inspect
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .._tensor import functorch_active, in_backward, statistics_mode
from . import corrections, sampling
from .layer import LayerState

__all__ = ["LayerState", "Schedule", "StatisticsHooks", "first_input"]

logger = logging.getLogger("kfac")

# Modules whose forward hooks belong to a live K-FAC preconditioner (two would both collect statistics).
_HOOKED: "weakref.WeakKeyDictionary[nn.Module, weakref.ref[StatisticsHooks]]" = weakref.WeakKeyDictionary()


class Schedule(Protocol):
    """What the hooks ask of the preconditioner's schedule for the step in flight."""

    def capturing(self) -> bool: ...

    def correcting(self) -> bool: ...


class StatisticsHooks:
    """The hooks of one preconditioner over ``layers`` (the preconditioner's own list: untracking a layer removes
    it here too)."""

    def __init__(self, *, layers: list[LayerState], factor_dtype: torch.dtype, fisher: str, accumulation_steps: int,
                 grad_scaler: Any | None, schedule: Schedule, method: Any,
                 mark_final: Callable[[str], None]) -> None:
        self.layers = layers
        self.factor_dtype, self.fisher, self.accumulation_steps = factor_dtype, fisher, accumulation_steps
        self.grad_scaler, self.schedule, self.method, self.mark_final = grad_scaler, schedule, method, mark_final
        self.in_mc_backward = False
        self.paused = False  # backward passes of the caller's own (e.g. loss derivatives) are not statistics
        self.warned_accumulation = False

    # -- installation --------------------------------------------------------------------------------------
    def install(self) -> None:
        """Register the forward hooks (clear error if another live preconditioner already hooks a layer)."""
        for layer in self.layers:
            owner = _HOOKED.get(layer.module)
            other = owner() if owner is not None else None
            if other is not None and other is not self and other.hooks_on(layer.module):
                raise ValueError(f"layer {layer.name!r} is already tracked by another live K-FAC preconditioner "
                                 "(kfac.KFAC built twice on one model?): both would collect statistics; call "
                                 "remove() on the old one (opt.preconditioner.remove()) first")
        for layer in self.layers:
            hook = functools.partial(self.forward_hook, layer)
            setattr(hook, "wanted", functools.partial(self.wanted, layer))  # see kfac.modules.attention.wants_use
            layer.handles += layer.adapter.observe(hook)
            _HOOKED[layer.module] = weakref.ref(self)

    def hooks_on(self, module: nn.Module) -> bool:
        return any(layer.module is module and layer.handles for layer in self.layers)

    def unhook(self, layer: LayerState) -> None:
        """Remove ``layer``'s hooks and drop its pending statistics."""
        for h in layer.handles:
            h.remove()
        layer.handles.clear()
        layer.discard_pending()
        owner = _HOOKED.get(layer.module)
        if owner is not None and owner() is self:
            del _HOOKED[layer.module]

    # -- hooks ---------------------------------------------------------------------------------------------
    def wanted(self, layer: LayerState) -> bool:
        """Whether ``layer``'s next forward collects anything (asked before a costly observation, e.g. attention's
        capture); a training use on a step that collects nothing is counted here, as :meth:`forward_hook` would."""
        if not (layer.module.training and torch.is_grad_enabled()) or functorch_active():
            return False
        if self.schedule.capturing() or self.schedule.correcting():
            return True
        layer.forward_calls += 1
        return False

    def forward_hook(self, layer: LayerState, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                     output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()) or functorch_active():
            return
        x = args[0] if args else kwargs.get(layer.input_name) if layer.input_name is not None else None
        if not isinstance(x, Tensor):
            return
        layer.forward_calls += 1
        capture, correct = self.schedule.capturing(), self.schedule.correcting()
        if not (capture or correct):
            return
        backward_only = layer.adapter.stats_from_backward
        if capture and not backward_only:
            with statistics_mode(x):
                stat, n = layer.adapter.a_stat(x.detach(), self.factor_dtype)
            layer.a_sum, layer.a_count = _add(layer.a_sum, stat), layer.a_count + n
        x_corr = x.detach() if correct and self.method.ready(layer.entry) else None
        x_stat = x.detach() if capture and backward_only else None
        if isinstance(output, Tensor) and output.requires_grad:
            # a forward re-run inside a backward pass (activation checkpointing) is not a new use: its gradient
            # arrives in a nested backward (reentrant) or never (non-reentrant, whose first run already counted)
            if capture and not in_backward():
                layer.g_expected += 1
                if self.fisher == "mc":
                    layer.sampled_outputs.append(output)
            output.register_hook(functools.partial(self.grad_hook, layer, capture, x_corr, x_stat))

    def grad_hook(self, layer: LayerState, capture: bool, x: Tensor | None, x_stat: Tensor | None,
                  grad: Tensor) -> None:
        if not layer.handles or self.paused:
            return
        if x is not None and not self.in_mc_backward:  # EK-FAC corrections use the data's own labels
            with statistics_mode(grad):
                corrections.add(layer, self.method, x, grad, self.grad_scale(), self.factor_dtype)
        if not capture or (self.fisher == "mc") != self.in_mc_backward:
            return
        with statistics_mode(grad):
            if x_stat is not None:  # both statistics from per-example gradients (see ModuleAdapter.backward_stats)
                (a_stat, a_n), (stat, n) = layer.adapter.backward_stats(x_stat, grad.detach(), self.factor_dtype,
                                                                       scale=self.grad_scale())
                layer.a_sum, layer.a_count = _add(layer.a_sum, a_stat), layer.a_count + a_n
            else:
                stat, n = layer.adapter.g_stat(grad.detach(), self.factor_dtype, scale=self.grad_scale())
        layer.g_sum, layer.g_count = _add(layer.g_sum, stat), layer.g_count + n
        layer.g_received += 1
        if layer.g_received < layer.g_expected:
            return  # a layer applied several times per forward: the gradients of its other uses are still to come
        layer.g_calls += 1
        if layer.g_calls == self.accumulation_steps and layer.a_count:
            self.mark_final(layer.name)  # last micro-batch: its reduction may start during this backward

    def check_collected(self) -> None:
        """Before a factor update: ``fisher="mc"`` needs sampled-label statistics (clear error), and a number of
        backward passes other than ``accumulation_steps`` is logged once."""
        if self.layers and not any(layer.g_received for layer in self.layers) and self.fisher == "mc":
            raise RuntimeError("fisher='mc' needs mc_backward(outputs) after the forward pass of every "
                               "factor-update step; no sampled-label statistics were collected")
        calls = [layer.g_calls for layer in self.layers if layer.a_count and layer.g_count]
        if calls and min(calls) != self.accumulation_steps and not self.warned_accumulation:
            self.warned_accumulation = True
            logger.warning("kfac: saw %d backward pass(es) before step() but accumulation_steps=%d",
                           min(calls), self.accumulation_steps)

    def grad_scale(self) -> Tensor | float | None:
        """The loss scale of the backward pass in flight (the scaler's live tensor: no host sync, never stale)."""
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return None
        scale = getattr(scaler, "_scale", None)
        return scale if isinstance(scale, Tensor) else float(scaler.get_scale())

    def mc_backward(self, outputs: Tensor, *, loss: str, reduction: str, generator: torch.Generator | None) -> None:
        """Backward of a loss on labels sampled from ``outputs`` through the hooked layers only (``G`` of the
        Monte-Carlo Fisher); parameter gradients are not touched."""
        sampled = sampling.sampled_loss(outputs, loss=loss, reduction=reduction, generator=generator)
        if self.accumulation_steps > 1:
            sampled = sampled / self.accumulation_steps
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            sampled = self.grad_scaler.scale(sampled)
        self.sampled_backward([sampled], [torch.ones_like(sampled)])

    def sampled_backward(self, outputs: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        """Back-propagate ``grads`` (Monte-Carlo samples, already scaled as the caller's loss is) from ``outputs``
        through the hooked layers only, as the ``G`` statistics of ``fisher="mc"``: the derivatives are taken with
        respect to the outputs of the layers' forward uses since the last sample (not their weights, which an
        FSDP2-sharded layer swaps out after its forward pass; a layer without recorded uses, through its weight); parameter gradients are not touched (frozen layers
        are left out)."""
        targets = []
        for layer in self.layers:
            if layer.handles and layer.adapter.weight.requires_grad:
                outs = [t for t in layer.sampled_outputs if t.requires_grad]
                targets += outs or [layer.adapter.weight]
        for layer in self.layers:
            layer.sampled_outputs.clear()
        if not targets:
            return
        self.in_mc_backward = True
        try:
            torch.autograd.grad(list(outputs), targets, grad_outputs=list(grads), retain_graph=True, allow_unused=True)
        finally:
            self.in_mc_backward = False


def first_input(module: nn.Module) -> str | None:
    """The name of ``module.forward``'s first parameter (to find an input passed by keyword)."""
    try:
        params: Sequence[inspect.Parameter] = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):  # pragma: no cover (builtins without a signature)
        return None
    first = next((p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)), None)
    return first.name if first is not None else None


def _add(total: Tensor | None, value: Tensor) -> Tensor:
    return value if total is None else total.add_(value)
