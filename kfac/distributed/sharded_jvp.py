"""Jacobian-vector products of the outputs of an FSDP2-sharded model, and parameter-space dot products of sharded
directions: the two pieces adaptive K-FAC's quadratic model (:mod:`kfac.adaptive.quadratic`) needs on a model
whose parameters are ``DTensor`` shards.

``J v`` (forward-mode AD): the model runs its ordinary forward pass under :mod:`torch.autograd.forward_ad`, and
each FSDP unit (every ``fully_shard`` module, and the root) turns its parameters into dual tensors
``(θ, v)`` while it runs: after FSDP2's pre-forward hook has all-gathered ``θ`` and before its post-forward hook
reshards it, the unit's direction ``v`` is all-gathered the same way (a transient whole tensor per unit, as FSDP2
holds ``θ``; never the whole model). Nothing else of the forward pass changes, so the product equals
``torch.func.jvp`` of the unsharded model.

Dot products ``v_i^T v_j`` sum each rank's local shard products over the mesh; a parameter that is not sharded
(identical on every rank) is counted once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad

from .comm import Communicator
from .fsdp import fsdp_units, is_sharded, local_shard, whole

__all__ = ["sharded_output_jvps", "sharded_gram"]


def sharded_output_jvps(model: nn.Module, run: Callable[[], Sequence[Tensor]], directions: Sequence[Mapping[str, Tensor]],
                        ) -> tuple[list[Tensor], list[list[Tensor]]]:
    """The outputs of ``run()`` (a forward pass of ``model`` returning its output tensors) and, for each
    direction ``{parameter name: tensor}`` (``DTensor`` shards like the parameters; names left out are zero),
    ``J v`` per output: one forward pass per direction, every rank in step (FSDP2's collectives)."""
    units = _unit_parameters(model)
    outputs: list[Tensor] = []
    products: list[list[Tensor]] = []
    for direction in directions:
        with forward_ad.dual_level(), _dual_parameters(units, direction), torch.no_grad():
            unpacked = [forward_ad.unpack_dual(z) for z in run()]
        outputs = [u.primal for u in unpacked]
        products.append([u.tangent if u.tangent is not None else torch.zeros_like(u.primal) for u in unpacked])
    if not directions:
        with torch.no_grad():
            outputs = list(run())
    return outputs, products


Slot = tuple[nn.Module, str, str]
"""A parameter's place: its module, the attribute there and its name in ``model.named_parameters()``."""


def _unit_parameters(model: nn.Module) -> list[tuple[nn.Module, list[Slot]]]:
    """Every FSDP unit of ``model`` (``model`` itself first) with the slots of the parameters it manages: those
    below it that no nested unit manages (a shared parameter under each of its names)."""
    units = [model] + [m for m in fsdp_units(model) if m is not model]
    owner: dict[int, nn.Module] = {}

    def walk(module: nn.Module, unit: nn.Module) -> None:
        unit = module if any(module is u for u in units) else unit
        owner[id(module)] = unit
        for child in module.children():
            walk(child, unit)

    walk(model, model)
    canonical = {id(p): n for n, p in model.named_parameters()}  # a tied parameter: its first name
    slots: dict[int, list[Slot]] = {id(u): [] for u in units}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for attr, p in module.named_parameters(recurse=False, remove_duplicate=False):
            if p is not None:
                slots[id(owner[id(module)])].append((module, attr, canonical[id(p)]))
    return [(u, slots[id(u)]) for u in units if slots[id(u)]]


@contextlib.contextmanager
def _dual_parameters(units: list[tuple[nn.Module, list[Slot]]], direction: Mapping[str, Tensor]) -> Iterator[None]:
    """While each unit runs forward, its parameters are dual tensors ``(θ, v)`` (see the module docstring)."""
    handles = []

    def before(slots: list[Slot], saved: list[tuple[nn.Module, str, Any]]) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            for m, attr, name in slots:
                p = m._parameters[attr]
                if p is None or name not in direction or forward_ad.unpack_dual(p).tangent is not None:
                    continue  # not along the direction, or a shared parameter already dual
                tangent = whole(direction[name]).to(device=p.device, dtype=p.dtype)
                saved.append((m, attr, p))
                m._parameters[attr] = forward_ad.make_dual(p.detach(), tangent)
        return hook

    def after(saved: list[tuple[nn.Module, str, Any]]) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            while saved:
                m, attr, p = saved.pop()
                m._parameters[attr] = p
        return hook

    try:
        for unit, slots in units:
            saved: list[tuple[nn.Module, str, Any]] = []
            handles.append(unit.register_forward_pre_hook(before(slots, saved)))          # after FSDP2's unshard
            handles.append(unit.register_forward_hook(after(saved), prepend=True, always_call=True))  # before reshard
        yield
    finally:
        for h in handles:
            h.remove()


def sharded_gram(vectors: Sequence[Mapping[str, Tensor]], comm: Communicator, shard_size: int) -> Tensor:
    """``G_ij = v_i^T v_j`` (float64) over the union of the vectors' parameters (absent: zero), from this rank's
    shards: local products all-reduced over ``comm``'s ranks, divided by the number of replicas of each shard
    (``comm.world_size / shard_size``); a plain (replicated) tensor's product is weighted ``1 / shard_size``."""
    names: dict[str, Tensor] = {}
    for v in vectors:
        for n, t in v.items():
            names.setdefault(n, t)
    rows = []
    for v in vectors:
        parts: list[Tensor] = []
        for n, ref in names.items():
            local = local_shard(v[n]).reshape(-1).to(torch.float64) if n in v else \
                torch.zeros(local_shard(ref).numel(), dtype=torch.float64, device=ref.device)
            parts.append(local if is_sharded(ref) else local * (1.0 / shard_size) ** 0.5)
        rows.append(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64))
    flat = torch.stack(rows)
    gram = flat @ flat.T
    if comm.enabled:
        gram = comm.all_reduce_sum([gram], category="adaptive", exact=True)[0] * (shard_size / comm.world_size)
    return gram.cpu()
