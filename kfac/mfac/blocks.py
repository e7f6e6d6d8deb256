"""M-FAC's block model: which parameters form a block, and how a block's gradient is read from and written to
``.grad``.

For an ``nn.Module`` (:func:`module_blocks`), one block per module with direct trainable, unshared parameters
(:func:`kfac.tracking.walk`), keyed by module name. Where K-FAC's adapter covers exactly those parameters the
block's gradient is the adapter's matrix ``(g_dim, a_dim)`` (bias as last column); otherwise the concatenation of
the parameters' flattened gradients, shape ``(d_b,)``. For an iterable of parameters or param groups
(:func:`param_blocks`), one block ``"param{i}"`` per parameter, in its shape. A missing ``.grad`` reads as zeros and
is never written.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..modules import ModuleAdapter, adapter_for
from ..tracking import SkipRules, walk

__all__ = ["Block", "module_blocks", "param_blocks", "read_grads", "window_placement"]


@dataclass(eq=False)
class Block:
    """One named block: its parameters and the layout of its gradient (adapter matrix or flat concatenation)."""

    name: str
    params: Sequence[Tensor]  # parameters, or plain leaf tensors from param_blocks
    adapter: ModuleAdapter | None
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        """``d_b = prod(shape)``."""
        return math.prod(self.shape)

    def grad(self) -> Tensor | None:
        """The gradient in the block's layout (missing ``.grad`` counted as zero), or ``None`` if none has one."""
        grads = [p.grad for p in self.params]
        return None if all(g is None for g in grads) else self.matrix_of(grads)

    def matrix_of(self, grads: Sequence[Tensor | None]) -> Tensor:
        """The block's gradient from per-parameter tensors shaped like :attr:`params` (zeros for ``None``, at least
        one given): its ``.grad`` tensors, or an FSDP2-sharded block's gathered whole (:mod:`kfac.distributed.fsdp`)."""
        ref = next(g for g in grads if g is not None)
        full = [torch.zeros(p.shape, dtype=ref.dtype, device=ref.device) if g is None else g
                for p, g in zip(self.params, grads)]
        if self.adapter is not None:
            mat = self.adapter.matrix_of(full)
            assert mat is not None  # every parameter has a tensor here
            return mat
        return torch.cat([g.reshape(-1) for g in full]).reshape(self.shape)

    def split(self, value: Tensor) -> list[Tensor]:
        """Inverse of :meth:`matrix_of`: per-parameter tensors shaped like :attr:`params`."""
        if self.adapter is not None:
            return self.adapter.split_matrix(value)
        flat, out, offset = value.reshape(-1), [], 0
        for p in self.params:
            out.append(flat[offset:offset + p.numel()].reshape(p.shape))
            offset += p.numel()
        return out

    def set_grad(self, value: Tensor) -> None:
        """Write ``value`` (block layout) into the existing ``.grad`` tensors (in place, cast to their dtype)."""
        for p, part in zip(self.params, self.split(value)):
            if p.grad is not None:
                p.grad.copy_(part)


def module_blocks(model: nn.Module, skip: list[str], skipped: list[tuple[str, str]]) -> list[Block]:
    """One block per module owning trainable, unshared parameters (:func:`kfac.tracking.walk`): in K-FAC's
    ``(g_dim, a_dim)`` layout where an adapter covers exactly those parameters, else flat. Skipped modules are
    appended to ``skipped`` as ``(name, reason)``; unmatched ``skip`` entries warn at the caller's caller."""
    rules = SkipRules(skip)
    out: list[Block] = []
    for c in walk(model, rules, skipped):
        adapter, _ = adapter_for(c.module)
        if adapter is not None and not c.partly_frozen and \
                [id(p) for p in adapter.parameters()] == [id(p) for p in c.params]:
            out.append(Block(c.name, c.params, adapter, (adapter.g_dim, adapter.a_dim)))
        else:
            out.append(Block(c.name, c.params, None, (sum(p.numel() for p in c.params),)))
    rules.warn_unmatched(stacklevel=4)
    return out


def param_blocks(params: Iterable[Any], skip: list[str], skipped: list[tuple[str, str]]) -> list[Block]:
    """One block ``"param{i}"`` per parameter of ``params`` (tensors or param groups, flattened in order), in the
    parameter's shape; skipped, frozen and repeated parameters are appended to ``skipped``."""
    if isinstance(params, Tensor):
        raise TypeError("pass an nn.Module or an iterable of parameters, not a single tensor")
    flat: list[Tensor] = []
    for item in params:
        if isinstance(item, Mapping):
            group = item["params"]
            flat.extend([group] if isinstance(group, Tensor) else list(group))
        else:
            flat.append(item)
    rules = SkipRules(skip)
    seen: set[int] = set()
    out: list[Block] = []
    for i, p in enumerate(flat):
        if not isinstance(p, Tensor):
            raise TypeError(f"parameter {i} is a {type(p).__name__}, not a tensor")
        name = f"param{i}"
        if rules.matches(name):
            skipped.append((name, "matched skip_layers"))
        elif not p.requires_grad:
            skipped.append((name, "does not require grad (frozen)"))
        elif id(p) in seen:
            skipped.append((name, "repeated parameter"))
        else:
            seen.add(id(p))
            out.append(Block(name, [p], None, tuple(p.shape)))
    return out


def window_placement(blocks: list[Block], dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """The device of the blocks' parameters (one device required) and the window dtype: ``dtype``, else the
    promoted dtype of the parameters (floating point required)."""
    params = [p for b in blocks for p in b.params]
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"M-FAC needs all tracked parameters on one device, got {sorted(map(str, devices))}")
    if dtype is None:
        dtype = params[0].dtype
        for p in params[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        if not dtype.is_floating_point:
            raise ValueError(f"parameters have non-floating dtype {dtype}; pass dtype=")
    return params[0].device, dtype


def read_grads(blocks: list[Block], *, dtype: torch.dtype, device: torch.device, what: str) -> dict[str, Tensor]:
    """``{block: gradient}`` (blocks without any ``.grad`` as zeros of ``dtype``); ``RuntimeError`` naming the
    calling method ``what`` if no block has a gradient."""
    grads = {b.name: b.grad() for b in blocks}
    if all(g is None for g in grads.values()):
        raise RuntimeError(f"MFACPreconditioner.{what}() was called before loss.backward(): no tracked "
                           "parameter has a gradient")
    return {b.name: g if g is not None else torch.zeros(b.shape, dtype=dtype, device=device)
            for b, g in zip(blocks, grads.values())}
