"""Tensor helpers shared across the package: fused finiteness checks and copies, the statistics context, autograd
state probes, and the trust-region math of ``kl_clip`` (public names; the module itself is internal)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["by_device_and_dtype", "foreach_mul_", "copy_all", "all_finite", "statistics_mode", "in_backward",
           "functorch_active", "update_dots", "kl_clip_scale", "differentiable_kernels"]


def by_device_and_dtype(tensors: Iterable[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
    """The tensors grouped as ``_foreach`` kernels take them: one list per device and dtype."""
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups


def foreach_mul_(tensors: list[Tensor], factor: Tensor) -> None:
    """``t *= factor`` (a 0-dim tensor) for every tensor, batched into one kernel per device and dtype."""
    for (device, _), ts in by_device_and_dtype(tensors).items():
        torch._foreach_mul_(ts, factor.to(device))


def copy_all(pairs: list[tuple[Tensor, Tensor]]) -> None:
    """``dst.copy_(src)`` for every pair (dtype conversion included), batched into one ``_foreach_copy_`` per
    device and dtype pair."""
    groups: dict[tuple[Any, ...], tuple[list[Tensor], list[Tensor]]] = {}
    for dst, src in pairs:
        dsts, srcs = groups.setdefault((dst.device, dst.dtype, src.device, src.dtype), ([], []))
        dsts.append(dst)
        srcs.append(src)
    for (dst_device, _, src_device, _), (dsts, srcs) in groups.items():
        if dst_device == src_device:
            torch._foreach_copy_(dsts, srcs)
        else:  # pragma: no cover (a model split over devices)
            for dst, src in zip(dsts, srcs):
                dst.copy_(src)


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """One host sync: the max-norm of a tensor is finite iff all its entries are (NaN propagates). The norms of
    all tensors of one device and dtype are taken by one fused ``_foreach_norm``."""
    groups = by_device_and_dtype(t.detach() if t.is_floating_point() else t.detach().float()
                                  for t in tensors if t.numel())
    norms: list[Tensor] = []
    for ts in groups.values():
        norms += [n.to(torch.float32) for n in torch._foreach_norm(ts, float("inf"))]
    if not norms:
        return True
    devices = {n.device for n in norms}
    if len(devices) > 1:
        norms = [n.cpu() for n in norms]
    return bool(torch.isfinite(torch.stack(norms)).all())


def finite_groups(groups: Sequence[Sequence[Tensor]]) -> list[bool]:
    """Per group of tensors, whether all its entries are finite; one host sync for all groups (each tensor's
    max-norm, stacked)."""
    flat = [(i, t) for i, ts in enumerate(groups) for t in ts if t.numel()]
    if not flat:
        return [True] * len(groups)
    norms = [torch.linalg.vector_norm(t.detach(), float("inf")).float() for _, t in flat]
    if len({n.device for n in norms}) > 1:
        norms = [n.cpu() for n in norms]
    ok = torch.isfinite(torch.stack(norms)).tolist()
    bad = {i for (i, _), fine in zip(flat, ok) if not fine}
    return [i not in bad for i in range(len(groups))]


@contextlib.contextmanager
def statistics_mode(t: Tensor) -> Iterator[None]:
    """No autograd and no autocast: statistics are computed in ``factor_dtype`` even inside an autocast region
    (hooks run in the forward pass, where autocast would turn ``a^T a`` into bfloat16/float16)."""
    with torch.no_grad(), torch.autocast(device_type=t.device.type, enabled=False):
        yield


def in_backward() -> bool:
    """Whether this runs inside an autograd backward pass (e.g. a checkpointed block's recomputation)."""
    probe = getattr(torch._C, "_current_graph_task_id", None)
    return probe is not None and probe() != -1


def functorch_active() -> bool:
    """Inside a ``torch.func`` transform (``vmap``/``grad``): tensors are not per-batch data, so no statistics."""
    probe = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(probe()) if probe is not None else False


def update_dots(updates: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """``<P(g), g>`` per block for ``(P(g), g)`` pairs, as one vector (no host sync). A dot is non-finite iff
    ``P(g)`` or ``g`` has a non-finite entry (``inf * 0`` is NaN and a non-finite term survives any sum) or the
    sum overflows, so this vector doubles as the finiteness check of the preconditioned gradients."""
    device = updates[0][0].device
    dtype = torch.float64 if any(v.dtype == torch.float64 for v, _ in updates) else torch.float32
    return torch.stack([torch.vdot(v.reshape(-1), g.to(v.dtype).reshape(-1)).to(device=device, dtype=dtype)
                        for v, g in updates])


def kl_clip_scale(dots: Tensor, lrs: Sequence[float], kl_clip: float) -> Tensor:
    """KAISA's trust region: ``nu = min(1, sqrt(kl_clip / |sum_blocks lr^2 <P(g), g>|))`` over the finite entries of
    ``dots`` (see :func:`update_dots`), as a 0-dim tensor (no host sync)."""
    lr2 = torch.tensor([lr * lr for lr in lrs], dtype=dots.dtype).to(dots.device, non_blocking=True)
    total = torch.where(torch.isfinite(dots), dots * lr2, torch.zeros((), dtype=dots.dtype, device=dots.device))
    return torch.clamp(torch.sqrt(kl_clip / total.sum().abs()), max=1.0)


@contextlib.contextmanager
def differentiable_kernels() -> Iterator[None]:
    """Attention through the composite kernel and CPU recurrent layers through the native one: both have
    forward-mode and double-backward derivatives; the fused CPU kernels have neither."""
    with contextlib.ExitStack() as stack:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        except ImportError:  # pragma: no cover (torch < 2.3)
            pass
        stack.enter_context(warnings.catch_warnings())  # torch's note on oneDNN TF32, raised by the flags
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        stack.enter_context(torch.backends.mkldnn.flags(enabled=False))
        yield
