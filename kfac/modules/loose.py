"""Loose parameters: parameters a container module uses directly in its own ``forward`` (a ViT's class token and
position embedding, ConvNeXt's layer scales, a language-model head's output bias), with the *exact diagonal* of
the Fisher from per-example gradients -- the block of the normalisation layers (:mod:`kfac.modules.norm`).

Example ``n``'s gradient w.r.t. the owner's own parameters ``θ`` (``recurse=False``: its children keep their own
blocks) is the vector-Jacobian product of the owner's forward on that example with the gradient ``g_n`` w.r.t. its
output, ``v_n = (∂f(x_n; θ)/∂θ)ᵀ g_n``: ``torch.func`` (``vmap`` over examples of a ``vjp`` of the recomputed
forward; the inputs are captured by a forward hook, ``g`` by the hook on the output). Examples lie along dim 0 of
the inputs and the output, or dim 1 inside a sequence-first container (``batch_first=False``, the owner's own
attribute first). The block has a diagonal ``A = Σ_n v_n² / N`` over the flattened parameters (gradients of the
back-propagated mean loss, as the other layers' statistics) and ``G = 1``, so K-FAC's update is
``grad / (A + damping)`` entrywise. A parameter that is a linear layer's or convolution's ``bias`` (a head's output
bias) needs no recomputation: ``v_n = Σ_t g_nt`` over example ``n``'s positions of that layer's output gradient.

Cost: one more forward and backward of the owner per statistics step (for a ViT's class token, the whole model).
Where per-example gradients cannot be taken (a forward that is not vmappable, takes no tensor input or returns no
single tensor, data-dependent control flow, batch norm's running statistics), the block reports non-finite
statistics at its first statistics step with :attr:`LooseAdapter.refusal` set, and the preconditioner untracks it
with a warning (:class:`kfac.kronecker.guards.StatisticsHealth`; listed in ``skipped``, gradients used as they are);
the other blocks are kept. Random ops (dropout) draw new masks, one per example (the forward's cannot be replayed;
an in-place draw into an unbatched tensor, as torchvision's stochastic depth, one for all examples: each example's
mask still has the forward's distribution). Not for EK-FAC or influence (no ``V_n = Σ_t g aᵀ`` rows).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._tensor import functorch_active
from .base import DiagonalAdapter, Stat
from .linear import is_transposed_linear

__all__ = ["LooseAdapter", "BiasAdapter", "loose_adapter", "head_bias_adapter"]

Hook = Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None]


class LooseAdapter(DiagonalAdapter):
    """The diagonal block of ``params``, the own parameters of container ``module`` (see the module docstring)."""

    shardable = False  # re-runs the module with its parameters (torch.func)

    absent_from_old_checkpoints = True  # untracked before: a checkpoint without these blocks loads

    def __init__(self, module: nn.Module, params: list[nn.Parameter]) -> None:
        super().__init__(module)
        self.params = list(params)
        names = {id(p): k for k, p in module.named_parameters(recurse=False)}
        self.names = [names.get(id(p), "?") for p in self.params]
        self.failure: str | None = None
        self.pending: tuple[tuple[Any, ...], dict[str, Any]] | None = None  # inputs of the use being back-propagated
        self.set_example_dim: int | None = None
        self.randomness = "different"  # vmap's: each example of the recomputation draws its own dropout mask
        try:
            first = next((p.name for p in inspect.signature(module.forward).parameters.values()
                          if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)), None)
        except (TypeError, ValueError):  # pragma: no cover (builtins without a signature)
            first = None
        self.input_name = first

    @property
    def example_dim(self) -> int:
        """The examples' dimension, from the first layout declared (``batch_first``; 1 where ``False``): by the
        owner itself, by its containers (set by :func:`kfac.tracking.track_layers`), or alike by every module
        inside it (the root of a model of sequence-first layers); else 0."""
        own = getattr(self.module, "batch_first", None)
        if isinstance(own, bool):
            return 0 if own else 1
        if self.set_example_dim is not None:
            return self.set_example_dim
        inside = {m.batch_first for m in self.module.modules() if isinstance(getattr(m, "batch_first", None), bool)}
        return 1 if inside == {False} else 0

    @example_dim.setter
    def example_dim(self, value: int) -> None:
        self.set_example_dim = value

    def describe(self) -> str:
        return f"loose parameters {self.names} of {type(self.module).__name__}"

    @property
    def refusal(self) -> str | None:
        """Why the block's per-example gradients cannot be taken (set at its first statistics step; the
        preconditioner then untracks it)."""
        return None if self.failure is None else f"{self.describe()}: {self.failure}"

    def fail(self, why: str) -> None:
        """From now on: non-finite statistics (the preconditioner untracks the block) and no gradient matrix."""
        if self.failure is None:
            self.failure = why

    @property
    def has_bias(self) -> bool:
        return False

    @property
    def weight(self) -> nn.Parameter:
        return self.params[0]

    @property
    def a_dim(self) -> int:
        return sum(p.numel() for p in self.params)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.params)

    # -- capture ---------------------------------------------------------------------------------------------
    def observe(self, callback: Hook) -> list[Any]:
        """The owner's forward uses, each with a hook on its output (registered before ``callback``'s, so it runs
        first) that makes that use's inputs :attr:`pending` when its gradient arrives."""
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if self.failure is None and module.training and torch.is_grad_enabled() and not functorch_active():
                args, kwargs, output = self.watch(args, kwargs, output)
            callback(module, args, kwargs, output)

        return [self.module.register_forward_hook(hook, with_kwargs=True)]

    def watch(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> tuple[Any, Any, Any]:
        """Capture one use; returns what the statistics hooks see: the first tensor input as ``args[0]`` and the
        output, or, for a forward without per-example gradients (:meth:`fail`), stand-ins that carry its
        non-finite statistics to the preconditioner."""
        leaves, spec = tree_flatten((args, kwargs))
        x = args[0] if args else kwargs.get(self.input_name) if self.input_name is not None else None
        x = x if isinstance(x, Tensor) else next((t for t in leaves if isinstance(t, Tensor)), None)
        owner = type(self.module).__name__
        if x is None:
            self.fail(f"{owner}.forward takes no tensor input")
            x = self.params[0].detach().new_zeros(1)
        if not isinstance(output, Tensor):
            self.fail(f"{owner}.forward returns {type(output).__name__}, not one tensor")
            output = next((t for t in tree_flatten(output)[0] if isinstance(t, Tensor) and t.requires_grad), None)
        if self.failure is None and isinstance(output, Tensor) and output.requires_grad:
            dtype = self.params[0].dtype  # the recomputation runs outside autocast: inputs in the parameters' dtype
            inputs = tree_unflatten([(t.detach().to(dtype) if t.is_floating_point() else t.detach())
                                     if isinstance(t, Tensor) else t for t in leaves], spec)

            def arrived(grad: Tensor) -> None:
                self.pending = cast(tuple[tuple[Any, ...], dict[str, Any]], inputs)

            output.register_hook(arrived)
        return (x,), {}, output

    # -- statistics ------------------------------------------------------------------------------------------
    def per_example_gradients(self, x: Tensor, g: Tensor) -> Tensor:
        """``v_n``, ``(N, a_dim)``, by ``torch.func`` on the owner's forward (see the module docstring); the
        global random state is left as it was (the recomputation draws its own dropout masks)."""
        from torch.func import functional_call, vjp, vmap

        if self.pending is None:
            raise RuntimeError("the inputs of this use were not captured")
        (args, kwargs), self.pending = self.pending, None
        d = self.example_dim
        if x.dim() <= d:
            raise ValueError(f"its input {tuple(x.shape)} has no examples' dimension {d}")
        n = x.shape[d]
        module = self.module
        params = {k: p.detach() for k, p in zip(self.names, self.params)}
        # copies of the buffers: the recomputation must not update running statistics a second time
        state = {**{k: b.clone() for k, b in module.named_buffers()}, **params}
        leaves, spec = tree_flatten((args, kwargs))
        batched = [i for i, t in enumerate(leaves) if isinstance(t, Tensor) and t.dim() > d and t.shape[d] == n]

        def call(rows: list[Tensor], p: dict[str, Tensor]) -> Tensor:
            full = list(leaves)
            for i, t in zip(batched, rows):
                full[i] = t.unsqueeze(d)
            a, k = tree_unflatten(full, spec)
            return cast(Tensor, functional_call(module, {**state, **p}, tuple(a), dict(k)))

        if n == 0:
            return g.new_zeros(0, self.a_dim)
        with torch.random.fork_rng(devices=[g.device] if g.device.type == "cuda" else []):
            e = self.output_dim(g, n, d, lambda: call([leaves[i].narrow(d, 0, 1).squeeze(d) for i in batched], params))

            def one(rows: list[Tensor], gi: Tensor) -> dict[str, Tensor]:
                out, pull = vjp(lambda p: call(rows, p).select(e, 0), params)[:2]
                return cast(dict[str, Tensor], pull(gi.to(out.dtype))[0])

            rows = [leaves[i] for i in batched]
            try:
                per = vmap(one, in_dims=(d, e), randomness=self.randomness)(rows, g)
            except RuntimeError as exc:  # an in-place draw into an unbatched tensor (stochastic depth's mask)
                if self.randomness == "same" or "randomness" not in str(exc):
                    raise
                self.randomness = "same"
                per = vmap(one, in_dims=(d, e), randomness=self.randomness)(rows, g)
        return torch.cat([per[k].reshape(n, -1) for k in self.names], 1)

    @staticmethod
    def output_dim(g: Tensor, n: int, d: int, first: Callable[[], Tensor]) -> int:
        """The examples' dimension of the output (gradient ``g``): its one dimension of size ``n``, else (several)
        the one where example 0 alone (``first()``) has size 1 -- e.g. ``(N, classes)`` from a ``(T, N, E)``
        input."""
        dims = [k for k in range(g.dim()) if g.shape[k] == n]
        if len(dims) > 1:
            one = first()
            dims = [k for k in dims if one.dim() == g.dim() and one.shape[k] == 1
                    and all(one.shape[j] == g.shape[j] for j in range(g.dim()) if j != k)]
            dims = dims if len(dims) == 1 or d not in dims else [d]
        if not dims:
            raise ValueError(f"its output {tuple(g.shape)} has no examples' dimension of size {n}")
        return dims[0]

    def backward_stats(self, x: Tensor, g: Tensor, dtype: torch.dtype, scale: Tensor | float | None = None,
                       ) -> tuple[Stat, Stat]:
        """As :meth:`kfac.modules.NormAdapter.backward_stats`: ``(Σ_n v_n², N)`` and ``(N, N)``; a block whose
        per-example gradients fail reports non-finite ones (see :meth:`fail`)."""
        v = None
        if self.failure is None:  # the first failure drops the block
            try:
                v = self.per_example_gradients(x, g)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:  # any failure of the transform drops this block only
                text = str(exc).strip().splitlines()
                self.fail(f"per-example gradients by torch.func failed ({type(exc).__name__}: "
                          f"{text[0] if text else ''})")
        if v is None:  # non-finite statistics with the refusal: the preconditioner untracks the block
            n = max(1, x.shape[self.example_dim] if x.dim() > self.example_dim else 1)
            return ((g.new_full((self.a_dim,), float("nan"), dtype=dtype), n),
                    (g.new_full((1, 1), float("nan"), dtype=dtype), n))
        return self.diagonal_stats(v, dtype, scale)

    # -- gradients -------------------------------------------------------------------------------------------
    def matrix_of(self, grads: Sequence[Tensor | None]) -> Tensor | None:
        """The gradients flattened as one row (``None`` once the block is dropped)."""
        ref = next((t for t in grads if t is not None), None)
        if ref is None or self.failure is not None:
            return None
        return torch.cat([ref.new_zeros(p.numel()) if t is None else t.reshape(-1).to(ref.dtype)
                          for p, t in zip(self.params, grads)])[None]

    def split_matrix(self, mat: Tensor) -> list[Tensor]:
        out, start = [], 0
        for p in self.params:
            out.append(mat[0, start:start + p.numel()].reshape(p.shape))
            start += p.numel()
        return out


def _channels_last(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or is_transposed_linear(layer)


class BiasAdapter(LooseAdapter):
    """The diagonal block of ``layer.bias`` (a linear layer or convolution applying it), owned by ``module``:
    ``v_n = Σ_t g_nt`` from ``layer``'s output gradient, no recomputation."""

    def __init__(self, module: nn.Module, layer: nn.Module) -> None:
        super().__init__(module, [cast(nn.Parameter, layer.bias)])
        self.layer = layer
        self.input_name = "input"

    def observe(self, callback: Hook) -> list[Any]:
        return [self.layer.register_forward_hook(callback, with_kwargs=True)]

    def describe(self) -> str:
        return f"the bias of {type(self.layer).__name__}"

    def per_example_gradients(self, x: Tensor, g: Tensor) -> Tensor:
        if _channels_last(self.layer):
            d = self.example_dim
            if g.dim() == 1:
                return g[None]
            return g.movedim(d, 0).reshape(g.shape[d], -1, g.shape[-1]).sum(1)
        batched = x.dim() > (3 if isinstance(self.layer, nn.Conv2d) else 2)
        g = g if batched else g[None]  # an unbatched convolution input is one example
        return g.reshape(g.shape[0], g.shape[1], -1).sum(2)


def _bias_user(module: nn.Module, param: nn.Parameter) -> nn.Module | None:
    """A linear layer or convolution in ``module``'s subtree that applies ``param`` as its ``bias``."""
    return next((m for m in module.modules() if getattr(m, "bias", None) is param and m is not module
                 and (_channels_last(m) or isinstance(m, (nn.Conv1d, nn.Conv2d)))), None)


def loose_adapter(module: nn.Module, params: list[nn.Parameter], reason: str | None) -> LooseAdapter | None:
    """The block of ``params``, the own trainable parameters of a container ``module`` that no adapter models
    (``reason``: :func:`kfac.modules.adapter_for`'s), or ``None`` where this does not apply (a leaf module, a
    recurrent layer, an adapter's own refusal)."""
    if not params or not (reason or "").startswith("unsupported module type") or next(module.children(), None) is None:
        return None
    if len(params) == 1:
        user = _bias_user(module, params[0])
        if user is not None:  # e.g. BERT's prediction head: the decoder applies the head's own bias
            return BiasAdapter(module, user)
    return LooseAdapter(module, params)


def head_bias_adapter(head: nn.Module, covered: set[int]) -> BiasAdapter | None:
    """The block of a tied output layer's own bias (its weight is an embedding's), unless ``covered`` (ids of
    parameters already in a block) holds it or it is frozen."""
    bias = getattr(head, "bias", None)
    if not isinstance(bias, nn.Parameter) or not bias.requires_grad or id(bias) in covered:
        return None
    return BiasAdapter(head, head)
