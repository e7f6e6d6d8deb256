"""Per-layer-type adapters and the registry that picks one for a module.

The registry is an ordered list of ``(match, adapter class)``; ``match`` is an ``nn.Module`` subclass or a predicate
on the module. :func:`register_adapter` puts a third party's adapter in front of the built-in ones (the first match
wins), so a library can teach K-FAC its own layer types without touching this package. Built in: ``nn.Linear``,
``nn.Conv1d`` / ``nn.Conv2d`` (grouped and depthwise ones with a shared ``A``), ``nn.Embedding``, ``nn.MultiheadAttention`` (its in-projection, with
:class:`CrossInProjectionAdapter` for cross-attention; its ``out_proj`` is adapted by
:func:`kfac.tracking.track_layers`, which knows the parent), and Hugging Face ``Conv1D``
(GPT-2's transposed linear layer, matched by its structure so that ``transformers`` is never imported),
normalisation layers (PyTorch's by formula, other libraries' ``*Norm`` modules by ``torch.func``), and an
embedding tied to an output layer (:class:`TiedEmbeddingAdapter`, chosen by
:func:`kfac.tracking.track_layers`, which sees both modules).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .attention import CrossInProjectionAdapter, InProjectionAdapter, OutProjectionAdapter
from .base import DiagonalAdapter, ModuleAdapter, Stat
from .conv import ConvAdapter, GroupedConvAdapter
from .embedding import EmbeddingAdapter
from .linear import LinearAdapter, TransposedLinearAdapter, is_transposed_linear
from .norm import NormAdapter, ScaleShiftAdapter, is_norm, is_scale_shift
from .tied import TiedEmbeddingAdapter, is_tied_head

__all__ = ["ModuleAdapter", "DiagonalAdapter", "Stat", "LinearAdapter", "TransposedLinearAdapter", "ConvAdapter", "GroupedConvAdapter", "EmbeddingAdapter",
           "InProjectionAdapter", "CrossInProjectionAdapter", "OutProjectionAdapter", "NormAdapter", "ScaleShiftAdapter", "TiedEmbeddingAdapter", "is_tied_head",
           "Registration", "adapter_for", "register_adapter"]

Match = type[nn.Module] | Callable[[nn.Module], bool]

_REGISTRY: list[tuple[Match, type[ModuleAdapter]]] = [
    (nn.Linear, LinearAdapter),
    (lambda m: isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups > 1, GroupedConvAdapter),
    (nn.Conv1d, ConvAdapter),
    (nn.Conv2d, ConvAdapter),
    (nn.Embedding, EmbeddingAdapter),
    (is_transposed_linear, TransposedLinearAdapter),
    (nn.MultiheadAttention, InProjectionAdapter),
    (is_norm, NormAdapter),
    (is_scale_shift, ScaleShiftAdapter),
]


class Registration:
    """What :func:`register_adapter` returns: ``remove()`` takes the adapter out of the registry again."""

    def __init__(self, entry: tuple[Match, type[ModuleAdapter]]) -> None:
        self.entry = entry

    def remove(self) -> None:
        if self.entry in _REGISTRY:
            _REGISTRY.remove(self.entry)


def register_adapter(match: Match, adapter: type[ModuleAdapter]) -> Registration:
    """Use ``adapter`` for modules matching ``match`` (an ``nn.Module`` subclass, or a predicate on the module),
    ahead of every adapter registered before it (preconditioners built afterwards use it). ``adapter`` subclasses
    :class:`ModuleAdapter`; it may define a static ``unsupported_reason(module) -> str | None`` to refuse some
    instances with a reason."""
    if not (isinstance(adapter, type) and issubclass(adapter, ModuleAdapter)):
        raise TypeError(f"adapter must be a ModuleAdapter subclass, got {adapter!r}")
    if isinstance(match, type) and not issubclass(match, nn.Module) or not callable(match):
        raise TypeError(f"match must be an nn.Module subclass or a predicate on modules, got {match!r}")
    entry = (match, adapter)
    _REGISTRY.insert(0, entry)
    return Registration(entry)


def _matches(match: Match, module: nn.Module) -> bool:
    if isinstance(match, type):
        return isinstance(module, match)
    return bool(match(module))


def adapter_for(module: nn.Module) -> tuple[ModuleAdapter | None, str | None]:
    """Return ``(adapter, None)`` for a supported module, else ``(None, reason)``."""
    for match, adapter_cls in _REGISTRY:
        if _matches(match, module):
            check = getattr(adapter_cls, "unsupported_reason", None)
            reason = check(module) if check is not None else None
            if reason is not None:
                return None, reason
            return adapter_cls(module), None
    return None, f"unsupported module type {type(module).__name__} (its gradients are left unpreconditioned)"
