"""Per-layer-type adapters and the registry that picks one for a module."""

from __future__ import annotations

from torch import nn

from .base import ModuleAdapter, Stat
from .conv import Conv2dAdapter
from .embedding import EmbeddingAdapter
from .linear import LinearAdapter

__all__ = ["ModuleAdapter", "Stat", "LinearAdapter", "Conv2dAdapter", "EmbeddingAdapter", "adapter_for"]

_REGISTRY: list[tuple[type[nn.Module], type[ModuleAdapter]]] = [
    (nn.Linear, LinearAdapter),
    (nn.Conv2d, Conv2dAdapter),
    (nn.Embedding, EmbeddingAdapter),
]


def adapter_for(module: nn.Module) -> tuple[ModuleAdapter | None, str | None]:
    """Return ``(adapter, None)`` for a supported module, else ``(None, reason)``."""
    for cls, adapter_cls in _REGISTRY:
        if isinstance(module, cls):
            check = getattr(adapter_cls, "unsupported_reason", None)
            reason = check(module) if check is not None else None
            if reason is not None:
                return None, reason
            return adapter_cls(module), None
    return None, f"unsupported module type {type(module).__name__} (its gradients are left unpreconditioned)"
