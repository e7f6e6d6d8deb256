"""Checks that turn silent misuse into clear errors: tracked modules replaced after construction (their hooks would
never fire again), modules added after it (not preconditioned), and ``step()`` twice on the same gradients."""

from __future__ import annotations

import warnings
from collections.abc import MutableSet, Sequence

from torch import nn

from ..modules import adapter_for
from .hooks import LayerState

__all__ = ["check_modules", "grad_versions"]


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
