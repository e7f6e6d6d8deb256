"""The optimizer state dict's DCP layout: K-FAC's state inside ``state`` (keyed by parameter) and ``param_groups``.

``torch.distributed.checkpoint``'s ``get_optimizer_state_dict`` keeps an optimizer state dict's ``state`` (keyed by
parameter name) and ``param_groups`` and drops every other key, so :meth:`kfac.KFAC.state_dict` also writes K-FAC's
state there: each layer's pieces (:mod:`kfac.kronecker.keyed`) under ``"kfac.<field>"`` in the state of the layer's
first parameter, per-parameter extras (adaptive K-FAC's last direction) under their parameter, and the scalars as
one JSON string ``param_groups[0]["kfac"]``. ``torch.save`` users keep the top-level ``"kfac"`` entry, which
takes precedence when both are there; the embedded pieces reference the same tensors (saved once by ``torch.save``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["PREFIX", "embed", "split", "by_layer"]

PREFIX = "kfac."


def _params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def embed(state: dict[str, Any], optimizer: torch.optim.Optimizer, parameters_of: Mapping[str, Sequence[Tensor]],
          pieces: Mapping[str, Mapping[str, Tensor]], per_param: Mapping[int, Mapping[str, Tensor]],
          meta: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` (the base optimizer's ``state_dict()``) with the layers' ``pieces`` under each layer's first
    parameter in ``optimizer``, the ``per_param`` tensors (by parameter ``id``) under theirs, and ``meta`` in the
    first param group. The base optimizer's own state dicts are copied, never modified."""
    index = {id(p): i for i, p in enumerate(_params(optimizer))}
    extra: dict[int, dict[str, Tensor]] = {}
    for layer, params in parameters_of.items():
        anchor = next((index[id(p)] for p in params if id(p) in index), None)
        if anchor is not None and layer in pieces:
            extra.setdefault(anchor, {}).update({PREFIX + k: v for k, v in pieces[layer].items()})
    for pid, tensors in per_param.items():
        if pid in index:
            extra.setdefault(index[pid], {}).update({PREFIX + k: v for k, v in tensors.items()})
    out = dict(state)
    out["state"] = dict(state["state"])
    for i, tensors in extra.items():
        out["state"][i] = {**out["state"].get(i, {}), **tensors}
    out["param_groups"] = [dict(g) for g in state["param_groups"]]
    if out["param_groups"]:
        out["param_groups"][0]["kfac"] = json.dumps(dict(meta), sort_keys=True)
    return out


def split(state: Mapping[str, Any], optimizer: torch.optim.Optimizer,
          ) -> tuple[dict[str, Any], dict[int, dict[str, Tensor]], dict[str, Any] | None]:
    """Undo :func:`embed`: the base optimizer's state dict, K-FAC's tensors by parameter ``id`` of ``optimizer``
    (matched by position in the param groups, as ``Optimizer.load_state_dict`` does: keys may be indices or DCP's
    parameter names), and the scalars (``None`` if there are none)."""
    groups = [dict(g) for g in state["param_groups"]]
    raw = [g.pop("kfac", None) for g in groups]
    meta = next((json.loads(m) for m in raw if m is not None), None)
    keys = [k for g in groups for k in g["params"]]
    by_key = dict(zip(keys, _params(optimizer)))
    base: dict[Any, Any] = {}
    per_param: dict[int, dict[str, Tensor]] = {}
    for key, values in state["state"].items():
        own = {k[len(PREFIX):]: v for k, v in values.items() if isinstance(k, str) and k.startswith(PREFIX)}
        base[key] = {k: v for k, v in values.items() if not (isinstance(k, str) and k.startswith(PREFIX))}
        if own and key in by_key:
            per_param[id(by_key[key])] = own
    return {**state, "state": base, "param_groups": groups}, per_param, meta


def by_layer(per_param: Mapping[int, Mapping[str, Tensor]], optimizer: torch.optim.Optimizer,
             parameters_of: Mapping[str, Sequence[Tensor]]) -> dict[str, dict[str, Tensor]]:
    """Each layer's pieces, from its first parameter in ``optimizer`` (the inverse of :func:`embed`'s placement);
    keys of other kinds (per-parameter extras) are left out."""
    stepped = {id(p) for p in _params(optimizer)}
    out = {}
    for layer, params in parameters_of.items():
        anchor = next((p for p in params if id(p) in stepped), None)
        if anchor is not None:
            out[layer] = {k: v for k, v in per_param.get(id(anchor), {}).items() if not k.startswith("adaptive.")}
    return out
