"""``nn.MultiheadAttention``'s projections, which its forward applies inside ``F.multi_head_attention_forward``
(module hooks on ``out_proj`` never fire, and ``in_proj_weight`` belongs to no ``nn.Linear``).

While the attention module runs, an :class:`AttentionCapture` torch-function mode intercepts its call of
``F.multi_head_attention_forward`` and takes one projection out of it: the in-projection ``x W_in^T + b_in`` (or
the output projection) is computed by an ordinary ``F.linear`` that K-FAC observes like any linear layer, and the
rest of the attention is left to PyTorch itself with an identity weight in that projection's place (multiplying by
the identity is exact in floating point), so masks, dropout, ``need_weights`` and every other option keep PyTorch's
own semantics. The price is one extra ``E x E`` product per captured projection.

Factor structure:

* ``in_proj`` (self-attention, ``query is key is value``): q, k and v are one block ``W_in`` of shape
  ``(3E, E[+1])`` with a shared ``A`` (the rows of the common input) and ``G`` over the ``3E`` projected outputs,
  i.e. the Kronecker block of an ``nn.Linear(E, 3E)``; exact for one example of sequence length 1. Calls with
  different query/key/value inputs are left as they are: if the layer never sees self-attention it collects no
  statistics and keeps its plain gradient (listed in ``unused_layers``).
* ``out_proj``: an ``nn.Linear(E, E)`` on the attention output.

Inside ``F.multi_head_attention_forward`` inputs are sequence-first, ``(L, N, E)`` (``batch_first`` is transposed
away before), so per-example rows (EK-FAC, influence) regroup the ``L x N`` rows by example.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .linear import LinearAdapter

__all__ = ["AttentionCapture", "InProjectionAdapter", "OutProjectionAdapter"]

_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


class AttentionCapture(TorchFunctionMode):
    """Takes the ``"in"`` or ``"out"`` projection out of ``F.multi_head_attention_forward`` and calls
    ``report(input, output)`` with the ``F.linear`` that computes it (see the module docstring)."""

    def __init__(self, which: str, report: Callable[[Tensor, Tensor], None], eyes: dict[Any, Tensor]) -> None:
        super().__init__()
        self.which, self.report, self.eyes = which, report, eyes

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.multi_head_attention_forward:
            return func(*args, **kwargs)
        bound = _SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        p = bound.arguments
        if self.which == "out":
            weight, bias = p["out_proj_weight"], p["out_proj_bias"]
            p["out_proj_weight"], p["out_proj_bias"] = self.eye(weight), None
            attn, weights = func(**p)
            out = F.linear(attn, weight, bias)
            self.report(attn, out)
            return out, weights
        query = p["query"]
        if not (query is p["key"] is p["value"] and not p["use_separate_proj_weight"] and p["bias_k"] is None
                and p["static_k"] is None and p["static_v"] is None and p["in_proj_weight"] is not None):
            return func(**p)  # not self-attention with the packed projection: left as it is (not observed)
        proj = F.linear(query, p["in_proj_weight"], p["in_proj_bias"])
        self.report(query, proj)
        eye = self.eye(p["in_proj_weight"][: query.shape[-1]])
        p["query"], p["key"], p["value"] = proj.chunk(3, dim=-1)
        p.update(use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye,
                 in_proj_bias=None)
        return func(**p)

    def eye(self, weight: Tensor) -> Tensor:
        """The identity of ``weight``'s output dimension, in its dtype and device (made once, then reused)."""
        key = (weight.shape[0], weight.dtype, weight.device)
        if key not in self.eyes:
            self.eyes[key] = torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)
        return self.eyes[key]




class AttentionProjectionAdapter(LinearAdapter):
    """A projection of ``parent`` (an ``nn.MultiheadAttention``) observed through :class:`AttentionCapture`."""

    which = "out"

    def __init__(self, module: nn.Module, parent: nn.MultiheadAttention) -> None:
        super().__init__(module)
        self.parent = parent
        self.eyes: dict[Any, Tensor] = {}  # identities the capture puts in place of the projection

    def observe(self, callback: Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None]) -> list[Any]:
        modes: list[AttentionCapture] = []

        def enter(parent: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            mode = AttentionCapture(self.which, lambda x, out: callback(self.module, (x,), {}, out), self.eyes)
            mode.__enter__()
            modes.append(mode)

        def leave(parent: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if modes:
                modes.pop().__exit__(None, None, None)

        return [self.parent.register_forward_pre_hook(enter, with_kwargs=True),
                self.parent.register_forward_hook(leave, with_kwargs=True, always_call=True)]

    def num_examples(self, x: Tensor) -> int:
        return x.shape[1] if x.dim() == 3 else 1

    def example_rows(self, x: Tensor, g: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Rows regrouped by example: inputs are sequence-first ``(L, N, E)`` (``(L, E)``: one example)."""
        length, n = (x.shape[0], x.shape[1]) if x.dim() == 3 else (x.shape[0], 1)
        a, rows = self.a_rows(x).to(dtype), self.g_rows(g).to(dtype)
        return (a.reshape(length, n, a.shape[-1]).transpose(0, 1),
                rows.reshape(length, n, rows.shape[-1]).transpose(0, 1))


class InProjectionAdapter(AttentionProjectionAdapter):
    """``in_proj_weight`` (``(3E, E)``) and ``in_proj_bias`` of an ``nn.MultiheadAttention`` (see module docs)."""

    which = "in"

    def __init__(self, module: nn.Module) -> None:
        assert isinstance(module, nn.MultiheadAttention)
        super().__init__(module, module)

    @staticmethod
    def unsupported_reason(module: nn.MultiheadAttention) -> str | None:
        if module.in_proj_weight is None:
            return ("MultiheadAttention with kdim/vdim different from embed_dim (separate q/k/v projection weights) "
                    "is not supported")
        if module.bias_k is not None:
            return "MultiheadAttention with add_bias_kv=True is not supported"
        return None

    @property
    def has_bias(self) -> bool:
        return self.parent.in_proj_bias is not None

    @property
    def weight(self) -> nn.Parameter:
        return self.parent.in_proj_weight

    @property
    def bias(self) -> nn.Parameter:
        assert self.parent.in_proj_bias is not None  # only read when has_bias
        return self.parent.in_proj_bias

    @property
    def a_dim(self) -> int:
        return self.weight.shape[1] + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return self.weight.shape[0]


class OutProjectionAdapter(AttentionProjectionAdapter):
    """``out_proj`` of an ``nn.MultiheadAttention`` (an ``nn.Linear`` its parent applies functionally)."""
