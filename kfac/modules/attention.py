"""``nn.MultiheadAttention``'s projections, which its forward applies inside ``F.multi_head_attention_forward``
(module hooks on ``out_proj`` never fire, and ``in_proj_weight`` belongs to no ``nn.Linear``).

Only while an observer wants a forward use (K-FAC: a training forward with gradients on a step that collects
factor statistics or EK-FAC corrections; influence: every forward with gradients) does an :class:`AttentionCapture`
torch-function mode intercept the module's call of ``F.multi_head_attention_forward``; every other forward
(eval, ``no_grad``, training steps that collect nothing) is PyTorch's own, fused fast path included. A captured
call takes one projection out: the in-projection ``x W_in^T + b_in`` (or the output projection) is computed by
ordinary ``F.linear`` calls that K-FAC observes, and the rest of the attention is left to PyTorch with identity
weights in that projection's place (multiplying by the identity is exact in floating point), so masks, dropout,
``need_weights`` and every other option keep PyTorch's semantics. Price, per captured forward of ``L`` query and
``S`` key rows: the in-projection's q, k and v identities ``(L + 2S) E^2`` multiply-adds forward and as many
backward, ``out_proj``'s ``L E^2`` each way, i.e. ``4 + 4 = 8`` extra ``E x E`` products per row in self-attention.

Factor structure of the in-projection (``W_in`` of shape ``(3E, E[+1])``, rows ``q | k | v``):

* :class:`InProjectionAdapter`, self-attention (``query is key is value``): one block with a shared ``A`` (the
  rows of the common input) and ``G`` over the ``3E`` projected outputs, i.e. the Kronecker block of an
  ``nn.Linear(E, 3E)``; exact for one example of sequence length 1. Cross-attention calls (``query is not key``):
  K-FAC-expand over the ``L`` query, ``S`` key (and ``S`` value, when ``key is not value``) rows of the same
  block: ``A`` from all of them, ``G = blockdiag(G_q, G_k, G_v)`` (each projection's gradient rows, padded).
* :class:`CrossInProjectionAdapter` (chosen for ``nn.TransformerDecoderLayer.multihead_attn``, or with
  :func:`kfac.modules.register_adapter`): separate Kronecker blocks ``A_q ⊗ G_q`` (the query rows, ``W_q``) and
  ``A_kv ⊗ G_kv`` (the key rows, ``W_k`` and ``W_v``; when ``key is not value``, K-FAC-expand over the key and
  value rows, ``G_kv = blockdiag(G_k, G_v)``), each normalised by its own row count as an ``nn.Linear`` would
  be. Stored as one block-diagonal entry: ``A = blockdiag(A_q, A_kv)`` of size ``2(E[+1])``, ``G =
  blockdiag(G_q, G_kv)``, gradient matrix ``blockdiag(V_q, V_kv)`` (``3E x 2(E[+1])``), whose damped inverse
  is each block's own (the zero blocks stay zero). To keep one row count per entry the scale sits on ``A``:
  ``A_b = s_b sum_b a a^T / R`` with ``R = R_q + R_kv`` rows, ``s_b = R^2 / R_b^2`` (``units="kaisa"``, where
  ``G_b = sum_b g g^T / R``) or ``R / R_b`` (``"curvature"``); only ``A_b ⊗ G_b`` is the block's curvature.
* ``out_proj``: an ``nn.Linear(E, E)`` on the attention output.

Inside ``F.multi_head_attention_forward`` inputs are sequence-first, ``(L, N, E)`` (``batch_first`` is transposed
away before), so per-example rows (EK-FAC, influence) regroup the rows by example; a cross-attention call's rows
are the query's ``L`` then the key's (and value's) ``S`` per example.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .. import ext
from .base import Stat
from .linear import LinearAdapter

__all__ = ["AttentionCapture", "InProjectionAdapter", "CrossInProjectionAdapter", "OutProjectionAdapter",
           "wants_use"]

_SIGNATURE = inspect.signature(F.multi_head_attention_forward)

Hook = Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None]


def wants_use(callback: Hook) -> bool:
    """Whether the observer behind ``callback`` wants the next forward use: a callback may carry a ``wanted()``
    predicate (K-FAC's hooks do), asked by adapters whose observation has a price before they pay it."""
    wanted = getattr(callback, "wanted", None)
    return wanted is None or bool(wanted())


class AttentionCapture(TorchFunctionMode):
    """Takes ``adapter``'s projection (``"in"`` or ``"out"``) out of ``F.multi_head_attention_forward`` and calls
    ``report(input, output)`` with the rows that compute it (see the module docstring)."""

    def __init__(self, adapter: "AttentionProjectionAdapter", report: Callable[[Tensor, Tensor], None]) -> None:
        super().__init__()
        self.adapter, self.report = adapter, report

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.multi_head_attention_forward:
            return func(*args, **kwargs)
        bound = _SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        p = bound.arguments
        if self.adapter.which == "out":
            weight, bias = p["out_proj_weight"], p["out_proj_bias"]
            p["out_proj_weight"], p["out_proj_bias"] = self.adapter.eye(weight), None
            attn, weights = func(**p)
            out = F.linear(attn, weight, bias)
            self.report(attn, out)
            return out, weights
        if (p["use_separate_proj_weight"] or p["in_proj_weight"] is None or p["bias_k"] is not None
                or p["static_k"] is not None or p["static_v"] is not None):
            return func(**p)  # layouts the adapters refuse (separate weights, bias_kv, static k/v): not observed
        query, key, value = p["query"], p["key"], p["value"]
        weight, bias = p["in_proj_weight"], p["in_proj_bias"]
        if query is key is value and self.adapter.blocks == 1:  # one block, one shared input: exact
            proj = F.linear(query, weight, bias)
            self.report(query, proj)
            q, k, v = proj.chunk(3, dim=-1)
        else:
            q, k, v = self.split_projection(query, key, value, weight, bias)
        eye = self.adapter.eye(weight[: query.shape[-1]])
        p.update(query=q, key=k, value=v, use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye,
                 v_proj_weight=eye, in_proj_bias=None)
        return func(**p)

    def split_projection(self, query: Tensor, key: Tensor, value: Tensor, weight: Tensor, bias: Tensor | None,
                         ) -> tuple[Tensor, Tensor, Tensor]:
        """q, k and v projected separately, reported as one use: the inputs stacked along the sequence (query
        rows, then key, then value rows when ``key is not value``) and each projection padded to its rows of the
        ``3E`` outputs, so that every row's output gradient is zero outside its own projection."""
        e = weight.shape[1]
        uses = [(query, 0, e, 0)] + ([(key, e, 3 * e, 1)] if key is value else
                                     [(key, e, 2 * e, 1), (value, 2 * e, 3 * e, 1)])
        outs, rows = [], []
        for x, lo, hi, column in uses:
            y = F.linear(x, weight[lo:hi], None if bias is None else bias[lo:hi])
            outs.append(F.pad(y, (lo, 3 * e - hi)))
            rows.append(self.adapter.input_rows(x, column))
        out, inputs = torch.cat(outs, 0), torch.cat(rows, 0)
        length = query.shape[0]
        self.adapter.block_rows = (rows[0].numel() // rows[0].shape[-1],
                                   sum(r.numel() // r.shape[-1] for r in rows[1:]))
        self.report(inputs, out)
        rest = out[length:]
        if key is value:
            return out[:length, ..., :e], rest[..., e:2 * e], rest[..., 2 * e:]
        s = key.shape[0]
        return out[:length, ..., :e], rest[:s, ..., e:2 * e], rest[s:, ..., 2 * e:]


class AttentionProjectionAdapter(LinearAdapter):
    """A projection of ``parent`` (an ``nn.MultiheadAttention``) observed through :class:`AttentionCapture`."""

    which = "out"
    blocks = 1
    """Column blocks of the in-projection's ``A`` (1: shared by q, k and v; 2: ``A_q`` and ``A_kv``)."""

    def __init__(self, module: nn.Module, parent: nn.MultiheadAttention) -> None:
        super().__init__(module)
        self.parent = parent
        self.eyes: dict[Any, Tensor] = {}  # identities the capture puts in place of the projection
        self.block_rows = (0, 0)  # rows of each column block in the use being reported (read by a_stat)

    def observe(self, callback: Hook) -> list[Any]:
        modes: list[AttentionCapture | None] = []

        def enter(parent: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not (torch.is_grad_enabled() and wants_use(callback)):
                modes.append(None)  # PyTorch's own forward (its fused fast path in eval / no_grad)
                return
            mode = AttentionCapture(self, lambda x, out: callback(self.module, (x,), {}, out))
            mode.__enter__()
            modes.append(mode)

        def leave(parent: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            mode = modes.pop() if modes else None
            if mode is not None:
                mode.__exit__(None, None, None)

        return [self.parent.register_forward_pre_hook(enter, with_kwargs=True),
                self.parent.register_forward_hook(leave, with_kwargs=True, always_call=True)]

    def eye(self, weight: Tensor) -> Tensor:
        """The identity of ``weight``'s output dimension, in its dtype and device (made once, then reused)."""
        key = (weight.shape[0], weight.dtype, weight.device)
        if key not in self.eyes:
            self.eyes[key] = torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)
        return self.eyes[key]

    def input_rows(self, x: Tensor, column: int) -> Tensor:
        """What the capture reports as the input of a separately projected use (``column``: its block)."""
        return x

    def num_examples(self, x: Tensor) -> int:
        return x.shape[1] if x.dim() == 3 else 1

    def example_rows(self, x: Tensor, g: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Rows regrouped by example: inputs are sequence-first ``(L, N, E)`` (``(L, E)``: one example)."""
        length, n = (x.shape[0], x.shape[1]) if x.dim() == 3 else (x.shape[0], 1)
        a, rows = self.a_rows(x).to(dtype), self.g_rows(g).to(dtype)
        return (a.reshape(length, n, a.shape[-1]).transpose(0, 1),
                rows.reshape(length, n, rows.shape[-1]).transpose(0, 1))


class InProjectionAdapter(AttentionProjectionAdapter):
    """``in_proj_weight`` (``(3E, E)``) and ``in_proj_bias`` of an ``nn.MultiheadAttention`` as one block with a
    shared ``A`` (see the module docstring)."""

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


class CrossInProjectionAdapter(InProjectionAdapter):
    """The in-projection as separate Kronecker blocks for ``W_q`` (``A_q`` from the query) and ``W_k, W_v``
    (``A_kv`` from the key and value), stored block-diagonally (see the module docstring)."""

    blocks = 2

    @property
    def width(self) -> int:
        """Columns of one block: ``E`` (plus the bias column)."""
        return self.weight.shape[1] + int(self.has_bias)

    @property
    def a_dim(self) -> int:
        return 2 * self.width

    def input_rows(self, x: Tensor, column: int) -> Tensor:
        """``[x, 1]`` placed in block ``column`` of the ``2(E[+1])`` columns (zeros in the other block)."""
        if self.has_bias:
            x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
        return F.pad(x, (column * self.width, (1 - column) * self.width))

    def a_rows(self, x: Tensor) -> Tensor:
        return x.reshape(-1, self.a_dim)  # the capture's rows carry their bias column and block already

    def a_stat(self, x: Tensor, dtype: torch.dtype) -> Stat:
        """``blockdiag(s_q a_q^T a_q, s_kv a_kv^T a_kv)`` with ``R`` rows (the scales of the module docstring)."""
        rows, h = self.a_rows(x).to(dtype), self.width
        first, rest = self.block_rows
        total = first + rest
        assert total == rows.shape[0], "a_stat reads the row split of the use AttentionCapture reports"
        out = rows.new_zeros(self.a_dim, self.a_dim)
        for lo, n, part in ((0, first, rows[:first, :h]), (h, rest, rows[first:, h:])):
            if n:
                out[lo:lo + h, lo:lo + h] = ext.sym_outer_update(part, alpha=(total / n) ** (
                    2 if self.position_scaling else 1))
        return out, total

    def matrix_of(self, grads: Sequence[Tensor | None]) -> Tensor | None:
        """``blockdiag(V_q, V_kv)``: ``(3E, 2(E[+1]))`` with zeros off the blocks."""
        mat = super().matrix_of(grads)
        if mat is None:
            return None
        e, h = self.weight.shape[1], self.width
        out = mat.new_zeros(3 * e, 2 * h)
        out[:e, :h], out[e:, h:] = mat[:e], mat[e:]
        return out

    def split_matrix(self, mat: Tensor) -> list[Tensor]:
        e, h = self.weight.shape[1], self.width
        return super().split_matrix(torch.cat([mat[:e, :h], mat[e:, h:]], dim=0))


class OutProjectionAdapter(AttentionProjectionAdapter):
    """``out_proj`` of an ``nn.MultiheadAttention`` (an ``nn.Linear`` its parent applies functionally)."""
