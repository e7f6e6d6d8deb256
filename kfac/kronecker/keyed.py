"""K-FAC's state keyed by layer, in fixed-shape pieces, for ``torch.distributed.checkpoint`` (DCP).

DCP saves an optimizer's ``state`` (keyed by parameter) and ``param_groups`` only, treats a key every rank writes as
replicated (one copy kept), and loads into a state dict built by a *fresh* optimizer, whose every key must be in the
checkpoint with its shape. So each field of a layer is written by exactly one rank, the owner of its factor under
the plan (:meth:`kfac.planner.Plan.owner`): the running factor, its decomposition and, for ``A``, EK-FAC's
eigenvalues ``Lambda`` -- with a zero placeholder and a presence flag where the field does not exist yet (before
the first update or refresh), so a fresh optimizer asks for exactly the keys a trained one writes, at any world size.
Loading sums every field over the ranks (owners send the value, others zeros: exact), which gives every rank the
complete state; each then keeps what it holds under its own plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..distributed.comm import Communicator
from ..planner import Plan
from .store import FactorEntry

__all__ = ["fields_of", "write", "gather", "sum_by_dtype"]


def fields_of(entry: FactorEntry, method: Any, factor: str) -> list[tuple[str, tuple[int, ...]]]:
    """``(field, shape)`` of everything kept for ``factor`` of ``entry``: the running factor, its decomposition,
    and for ``A`` EK-FAC's eigenvalues (layers whose ``A`` is not diagonal)."""
    shape = entry.shape_of(factor)
    assert shape is not None  # "A" and "G" always have one
    out = [(factor, shape), *((name, tuple(s)) for name, s, _ in method.fields(entry, factor))]
    if factor == "A" and method.corrects and not entry.a_diagonal:
        out.append(("Lambda", (entry.g_dim, entry.a_dim)))
    return out


def _pieces(entry: FactorEntry, method: Any) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(factor, key, shape)`` of every piece :func:`write` writes for ``entry`` (on the owner of ``factor``)."""
    out = []
    for factor in ("A", "G"):
        for field, shape in fields_of(entry, method, factor):
            out += [(factor, field, shape), (factor, f"{field}.present", ())]
        if factor == "A":
            out.append(("A", "num_updates", ()))
    return out


def _get(entry: FactorEntry, field: str) -> Tensor | None:
    return entry.extras.get(field) if field == "Lambda" else getattr(entry, field)


def write(entry: FactorEntry, method: Any, plan: Plan, rank: int, *, dtype: torch.dtype,
          device: torch.device) -> dict[str, Tensor]:
    """The pieces of ``entry`` this rank writes: ``{field: tensor, field + ".present": 0/1}`` for the fields of the
    factors it owns (references where they exist, zeros otherwise), and the layer's update count with ``A``."""
    out: dict[str, Tensor] = {}
    for factor in ("A", "G"):
        if plan.owner(entry.name, factor) != rank:
            continue
        for field, shape in fields_of(entry, method, factor):
            t = _get(entry, field)
            out[field] = t if t is not None else torch.zeros(shape, dtype=dtype, device=device)
            out[f"{field}.present"] = torch.tensor(t is not None, dtype=torch.uint8)
        if factor == "A":
            out["num_updates"] = torch.tensor(entry.num_updates, dtype=torch.int64)
    return out


def gather(entries: Mapping[str, FactorEntry], method: Any, plan: Plan, comm: Communicator,
           pieces: Mapping[str, Mapping[str, Tensor]], *, dtype: torch.dtype,
           devices: Mapping[str, torch.device]) -> dict[str, Any]:
    """A complete :class:`~kfac.kronecker.store.FactorStore` state dict on every rank (a collective) from the pieces
    each rank loaded (what :func:`write` writes under ``plan``, for this rank); a clear error if one is missing."""
    values: list[Tensor] = []
    slots: list[tuple[str, str]] = []
    for name, entry in entries.items():
        mine = pieces.get(name, {})
        for factor, key, shape in _pieces(entry, method):
            owned = plan.owner(name, factor) == comm.rank
            if owned and key not in mine:
                raise ValueError(f"kfac: the checkpoint has no {key!r} for layer {name!r}")
            t = mine[key] if owned else torch.zeros(shape)
            if tuple(t.shape) != shape:
                raise ValueError(f"kfac: layer {name!r} field {key!r} has shape {tuple(t.shape)} in the checkpoint, "
                                 f"{shape} here")
            exact = key.endswith(".present") or key == "num_updates"  # flags and counts: float64 sums stay exact
            values.append(t.to(device=devices[name], dtype=torch.float64 if exact else dtype))
            slots.append((name, key))
    if comm.enabled:
        values = sum_by_dtype(comm, values)
    store: dict[str, Any] = {}
    got = dict(zip(slots, values))
    for name, entry in entries.items():
        tensors = {}
        for factor in ("A", "G"):
            for field, _ in fields_of(entry, method, factor):
                if float(got[(name, f"{field}.present")]) > 0.5:
                    tensors["extras.Lambda" if field == "Lambda" else field] = got[(name, field)]
        store[name] = {"meta": {"a_dim": entry.a_dim, "g_dim": entry.g_dim, "a_diagonal": entry.a_diagonal,
                                "owner": None, "num_updates": int(got[(name, "num_updates")])},
                       "tensors": tensors}
    return {"format": "kfac.FactorStore", "version": 1, "entries": store}


def sum_by_dtype(comm: Communicator, values: list[Tensor]) -> list[Tensor]:
    """Element-wise sums over ranks, one exact all-reduce per dtype (float64 for flags and counts), the dtypes in
    order of name: the same order on every rank (a set of dtypes iterates in an order that differs between
    processes, which paired one rank's float32 reduction with another's float64 one)."""
    out = list(values)
    for dtype in sorted({t.dtype for t in values}, key=str):
        idx = [i for i, t in enumerate(values) if t.dtype == dtype]
        for i, t in zip(idx, comm.all_reduce_sum([values[i] for i in idx], category="state", exact=True)):
            out[i] = t
    return out
