"""Checks that turn silent misuse into clear errors: tracked modules replaced after construction (their hooks would
never fire again), modules added after it (not preconditioned), and ``step()`` twice on the same gradients."""

from __future__ import annotations

import warnings
from collections.abc import MutableSet, Sequence

from torch import nn

from ..modules import adapter_for
from .layer import LayerState

__all__ = ["check_modules", "check_some_layer_ran", "grad_versions", "warn_fallback", "warn_unused"]


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


def grad_versions(layers: Sequence[LayerState]) -> tuple[tuple[int, int], ...]:
    """``(id, version counter)`` of every tracked ``.grad``: unchanged iff no backward pass (or other in-place
    write) touched the gradients since they were taken."""
    return tuple((id(p.grad), p.grad._version) for layer in layers for p in layer.adapter.parameters()
                 if p.grad is not None)


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
