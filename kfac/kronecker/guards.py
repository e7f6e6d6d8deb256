"""Checks that turn silent misuse into clear errors: tracked modules replaced after construction (their hooks would
never fire again), modules added after it (not preconditioned), and ``step()`` twice on the same gradients."""

from __future__ import annotations

import weakref

import logging
import warnings
from collections.abc import Mapping, MutableSet, Sequence
from typing import Any

from torch import nn

from ..modules import ModuleAdapter, adapter_for
from .layer import LayerState

logger = logging.getLogger("kfac")

__all__ = ["check_modules", "check_some_layer_ran", "grad_versions", "same_gradients", "warn_fallback", "warn_unused", "warn_no_corrections",
           "StatisticsHealth"]


def check_modules(model: nn.Module, layers: Sequence[LayerState], at_start: MutableSet[nn.Module] | set[nn.Module],
                  reported: set[str]) -> None:
    """Raise if a tracked layer's module is no longer ``model``'s module of that name; warn once about supported
    modules with parameters that were not in ``model`` at construction (``reported`` remembers them)."""
    current = dict(model.named_modules())
    replaced = [layer.name for layer in layers if current.get(layer.name) is not layer.module]
    if replaced:
        raise RuntimeError(f"kfac: tracked modules {replaced} were replaced or removed after the preconditioner "
                           "was built, so they are no longer preconditioned: build kfac.KFAC after the model is "
                           "final (or remove() this one and build a new one)")
    added = [n for n, m in current.items() if m not in at_start and n not in reported
             and any(True for _ in m.parameters(recurse=False)) and adapter_for(m)[0] is not None]
    if added:
        reported.update(added)
        warnings.warn(f"kfac: modules {added} were added to the model after the preconditioner was built and are "
                      "not preconditioned: build kfac.KFAC after the model is final", stacklevel=5)


def grad_versions(layers: Sequence[LayerState]) -> tuple[tuple[Any, int], ...]:
    """``(weak reference, version counter)`` of every tracked ``.grad``: see :func:`same_gradients`."""
    return tuple((weakref.ref(p.grad), p.grad._version) for layer in layers for p in layer.adapter.parameters()
                 if p.grad is not None)


def same_gradients(before: Sequence[tuple[Any, int]], now: Sequence[tuple[Any, int]]) -> bool:
    """Whether two :func:`grad_versions` are of the same, unwritten ``.grad`` tensors (no backward pass or other
    in-place write since). Objects are compared through weak references, not ``id()``, which Python reuses for a
    new gradient once the old one is freed (FSDP2 replaces its ``DTensor`` gradients every step)."""
    return len(before) == len(now) and all(
        a() is not None and a() is b() and u == v for (a, u), (b, v) in zip(before, now))


def check_some_layer_ran(layers: Sequence[LayerState]) -> None:
    """At the first step: a clear error if no tracked layer ran (e.g. a model left in eval mode)."""
    if not any(layer.forward_calls > 0 for layer in layers):
        raise RuntimeError("no tracked layer ran forward() in training mode with gradients enabled since the "
                           "preconditioner was created: call model.train() and run the forward pass before step()")


def warn_unused(unused: Sequence[str]) -> None:
    """After the first factor update (decided from globally reduced counts, so on every rank alike): the tracked
    layers that ran on no rank yet."""
    if unused:
        warnings.warn(f"kfac: tracked layers {list(unused)} ran no forward pass in training mode on any rank before "
                      "the first factor update (a branch not taken yet, or a module called functionally); "
                      "their gradients are used as they are until they run and their factors are refreshed",
                      stacklevel=6)


def warn_fallback(name: str, step: int, warned: set[str]) -> None:
    """Layer ``name`` keeps its plain gradient at ``step`` (non-finite preconditioned gradient): warned once per
    refresh (``warned`` is cleared at each refresh)."""
    if name not in warned:
        warned.add(name)
        warnings.warn(f"kfac: non-finite preconditioned gradient for layer {name!r} at step {step} (its factors "
                      "are too ill-conditioned for the damping, or its decompositions are not finite); it uses its "
                      "plain gradient (warned once per refresh; counted in fallbacks)", stacklevel=6)


class StatisticsHealth:
    """One layer's bad statistics never switch K-FAC off for the others: a layer whose reduced batch factors are
    non-finite keeps its factors that update (warned once, naming it); after ``limit`` such updates in a row it is
    untracked (its gradient is used as it is), with a warning giving the adapter's own diagnosis when it has one
    (``ModuleAdapter.refusal``, e.g. a normalisation module that couples the examples of a batch)."""

    def __init__(self, limit: int = 3) -> None:
        self.limit = limit
        self.streak: dict[str, int] = {}

    def record(self, names: Sequence[str], bad: Sequence[bool], step: int,
               adapters: Mapping[str, ModuleAdapter]) -> dict[str, str]:
        """Given each layer's verdict (agreed by every rank), the layers to untrack, with the reason."""
        out = {}
        for name, is_bad in zip(names, bad):
            if not is_bad:
                self.streak.pop(name, None)
                continue
            refusal = getattr(adapters[name], "refusal", None)  # the adapter's diagnosis: untracked at once
            self.streak[name] = self.limit if refusal else self.streak.get(name, 0) + 1
            why = refusal or "non-finite factor statistics"
            if self.streak[name] == 1 and self.limit > 1:
                warnings.warn(f"kfac: layer {name!r}: {why} at step {step}; its factors are not updated (the other "
                              f"layers' are); untracked after {self.limit} such updates in a row", stacklevel=5)
            if self.streak[name] >= self.limit:
                out[name] = (f"{why} (found at step {step})" if refusal else
                             f"{why} at {self.limit} factor updates in a row (last: step {step})")
                warnings.warn(f"kfac: layer {name!r} untracked: {out[name]}; its gradient is used as it is",
                              stacklevel=5)
        return out


def warn_no_corrections(method: Any, hparams: Any) -> None:
    """At the first ``step()``: EK-FAC whose correction schedule only hits refresh steps never applies a correction
    in ``step()`` (a refresh starts new eigenbases; corrections in the old ones are dropped)."""
    iu, cu = hparams.inv_update_steps, hparams.correction_update_steps
    if method.corrects and isinstance(iu, int) and isinstance(cu, int) and cu % iu == 0:
        logger.warning("kfac: method=%r with correction_update_steps=%d and inv_update_steps=%d: step() never applies "
                       "a correction (refresh steps drop them; update() and refresh() called directly apply them)",
                       method.name, cu, iu)
