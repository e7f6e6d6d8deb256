"""K-FAC gradient preconditioner: hooks that collect Kronecker factors and a ``step()`` that rewrites ``.grad``.

Schedule (KAISA / kfac-pytorch 0.4.2 conventions): steps count from 0; factors are updated when
``step % factor_update_steps == 0`` and decompositions refreshed when ``step % inv_update_steps == 0``.
At a factor update ``F <- decay * F + (1 - decay) * F_batch`` (running factor initialised to the identity),
where ``F_batch`` averages over every forward/backward pass since the previous step, so ``k`` accumulated
micro-batches give exactly the factors of their concatenation. The preconditioned gradients of all layers
are scaled by ``nu = min(1, sqrt(kl_clip / |sum_layers lr^2 <P(g), g>|))``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import warnings
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import sampling
from ..hparams import Hyper, block_lrs, check_positive, check_step_count, comparable, resolve, schedule_token
from ..distributed.comm import Communicator
from ..distributed.executor import Executor
from .methods import DecompositionError, make_method
from ..modules import ModuleAdapter, adapter_for
from ..tracking import track_layers
from .._tensor import (all_finite, copy_all, foreach_mul_, functorch_active, in_backward, kl_clip_scale,
                       statistics_mode, update_dots)
from ..planner import CostModel
from ..curvature import flatten_blocks, unflatten_blocks
from ..distributed.reduction import PendingStats
from .store import FactorEntry, FactorStore

__all__ = ["KFACPreconditioner"]

_SCHEDULED = ("factor_update_steps", "inv_update_steps", "correction_update_steps", "damping", "factor_decay",
              "correction_decay", "kl_clip", "lr")

logger = logging.getLogger("kfac")


# Modules whose forward hooks belong to a live K-FAC preconditioner (two would both collect statistics).
_HOOKED: "weakref.WeakKeyDictionary[nn.Module, weakref.ref[KFACPreconditioner]]" = weakref.WeakKeyDictionary()


@dataclass(eq=False)
class _Layer:
    name: str
    module: nn.Module
    adapter: ModuleAdapter
    entry: FactorEntry
    input_name: str | None = None  # forward()'s first parameter, for inputs passed by keyword
    handles: list[Any] = field(default_factory=list)
    a_sum: Tensor | None = None
    a_count: int = 0
    g_sum: Tensor | None = None
    g_count: int = 0
    g_expected: int = 0  # forward uses since the last step whose output gradient feeds G
    g_received: int = 0  # ... and how many of those gradients arrived
    g_calls: int = 0     # backward passes that delivered the gradients of every use so far
    forward_calls: int = 0
    corr_sum: Tensor | None = None  # EK-FAC: sum over examples of (QG^T V_n QA)^2 / T_n, and the example count
    corr_count: int = 0

    def discard_pending(self) -> None:
        self.a_sum = self.g_sum = None
        self.a_count = self.g_count = self.g_calls = self.g_expected = self.g_received = 0
        self.corr_sum = None
        self.corr_count = 0


def _add(total: Tensor | None, value: Tensor) -> Tensor:
    return value if total is None else total.add_(value)


class KFACPreconditioner:
    """Kronecker-factored preconditioner for the supported layers of ``model``.

    Usage (own training loop, KAISA style)::

        pre = kfac.KFACPreconditioner(model, lr=lambda step: scheduler.get_last_lr()[0])
        loss.backward(); pre.step(); optimizer.step()

    Args (keyword-only; every hyperparameter is a constant or a callable ``step -> value``):
        factor_update_steps: steps between factor updates.
        inv_update_steps: steps between decomposition refreshes.
        damping: Tikhonov damping added to the Kronecker eigenvalue products (eigen) or to each factor (inverse).
        factor_decay: running-average decay ``a`` in ``F <- a F + (1 - a) F_batch``.
        kl_clip: trust-region bound on ``lr^2 <P(g), g>``; ``None`` disables the scaling.
        lr: learning rate used by ``kl_clip`` (the :class:`kfac.KFAC` wrapper reads the optimizer's instead).
        method: ``"eigen"``, ``"inverse"`` or ``"ekfac"`` (eigen K-FAC with eigenvalues re-estimated from
            per-example gradients; see :mod:`kfac.kronecker.methods.ekfac`).
        correction_update_steps: steps between EK-FAC eigenvalue corrections (default: ``factor_update_steps``).
            Corrections are computed during the backward pass in the eigenbases of the last refresh (no per-example
            data is kept), so they are not applied on refresh steps: use ``inv_update_steps > 1``.
        correction_decay: running-average decay of the EK-FAC corrections (default: ``factor_decay``).
        fisher: ``"empirical"`` (``G`` from the training loss) or ``"mc"`` (``G`` from a loss on labels sampled
            from the model, produced by :meth:`mc_backward` each factor-update step).
        skip_layers: module names, class names or regular expressions (full match on the name); a skipped
            module's children are skipped too.
        accumulation_steps: forward/backward passes expected per ``step()`` (a mismatch is logged once).
        grad_scaler: a ``torch.amp.GradScaler``; factors are computed from unscaled gradients. With your own
            optimizer, call ``scaler.unscale_(optimizer)`` before :meth:`step` (the KFAC wrapper does it for you
            through ``scaler.step``).
        factor_dtype: dtype of factors and decompositions (float32, or float64 for reference computations; half
            precision loses the small eigenvalues that set the step size and is rejected).
        hooks: register the statistics hooks (``False`` for an engine fed by its caller, e.g. influence fitting;
            :meth:`step` then never collects statistics).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        factor_update_steps: Hyper = 1,
        inv_update_steps: Hyper = 1,
        damping: Hyper = 1e-3,
        factor_decay: Hyper = 0.95,
        kl_clip: Hyper | None = 1e-3,
        lr: Hyper | None = 0.1,
        method: str = "eigen",
        fisher: str = "empirical",
        skip_layers: Iterable[str] | str = (),
        accumulation_steps: int = 1,
        grad_scaler: Any | None = None,
        factor_dtype: torch.dtype = torch.float32,
        strategy: str | None = None,
        grad_worker_fraction: float | None = None,
        factor_reduction: str = "global",
        comm_dtype: torch.dtype | None = None,
        process_group: Any | None = None,
        cost_model: Any | None = None,
        memory_cap: int | None = None,
        split_factors: bool | None = None,
        bucket_cap_mb: float = 25.0,
        correction_update_steps: Hyper | None = None,
        correction_decay: Hyper | None = None,
        hooks: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if fisher not in ("empirical", "mc"):
            raise ValueError(f"fisher must be 'empirical' or 'mc', got {fisher!r}")
        if factor_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"factor_dtype must be torch.float32 or torch.float64, got {factor_dtype} (half precision "
                             "factors lose the small eigenvalues that set the step; autocast the model instead)")
        self.method = make_method(method)
        self.factor_update_steps = factor_update_steps
        self.inv_update_steps = inv_update_steps
        self.damping = damping
        self.factor_decay = factor_decay
        self.correction_update_steps = factor_update_steps if correction_update_steps is None else correction_update_steps
        self.correction_decay = factor_decay if correction_decay is None else correction_decay
        self.kl_clip = kl_clip
        self.lr = lr
        self.fisher = fisher
        self.accumulation_steps = check_step_count(accumulation_steps, name="accumulation_steps")
        self.grad_scaler = grad_scaler
        self.factor_dtype = factor_dtype
        self._hparams(0)  # validate constants early

        self.store = FactorStore()
        self.steps = 0
        self.skipped_steps = 0
        self.discarded_statistics = 0
        self.skipped: list[tuple[str, str]] = []
        self.not_executed: list[str] = []  # layers dropped by a checkpoint of an older version (state compat)
        self.fallbacks: dict[str, int] = {}  # steps each layer used its plain gradient (non-finite update)
        self._layers: list[_Layer] = []
        self._by_name: dict[str, _Layer] = {}
        self._model = weakref.ref(model)
        self._modules_at_start: weakref.WeakSet[nn.Module] = weakref.WeakSet(model.modules())
        self._hooks = hooks
        self._seen: set[str] = set()  # layers with statistics on some rank (from globally reduced counts)
        self._reported_unused = False
        self._checked_execution = False
        self._written: tuple[tuple[int, int], ...] = ()  # (id, version) of the .grad tensors step() last wrote
        self._warned_fallback: set[str] = set()
        self._warned_shard = False
        self._known_names: set[str] = set()  # modules added after construction that were already reported
        self._capture_step: int | None = None
        self._capture_flag = False
        self._correct_flag = False
        self._refreshed_damping: float | None = None
        self._in_mc_backward = False
        self._warned_accumulation = False
        self._register(model, skip_layers, hooks=hooks)
        if not self._layers:
            reasons = "; ".join(f"{n or '<root>'}: {r}" for n, r in self.skipped) or "the model has no parameters"
            raise ValueError(f"K-FAC found no supported layers to precondition ({reasons})")
        if cost_model is None:  # default constants, with the element sizes this run actually stores and sends
            wire = comm_dtype or factor_dtype
            cost_model = dataclasses.replace(CostModel.default(), bytes_per_element=factor_dtype.itemsize,
                                             comm_bytes_per_element=wire.itemsize)
        if not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be positive, got {bucket_cap_mb!r}")
        plan_kwargs: dict[str, Any] = {"method": self.method.decomposition, "cost_model": cost_model, "memory_cap": memory_cap,
                                       "split": split_factors}
        for key in ("factor_update_steps", "inv_update_steps"):  # the plan amortises by constant schedules only
            value = getattr(self, key)
            plan_kwargs[key] = value if isinstance(value, int) and not isinstance(value, bool) else 1
        self._comm = Communicator(group=process_group, comm_dtype=comm_dtype)
        self._comm.check_identical(self._options(method=method, strategy=strategy, comm_dtype=comm_dtype,
                                                 grad_worker_fraction=grad_worker_fraction, memory_cap=memory_cap,
                                                 split_factors=split_factors, bucket_cap_mb=bucket_cap_mb,
                                                 factor_reduction=factor_reduction),
                                   what="K-FAC options")
        self._exec = Executor(comm=self._comm, entries=[layer.entry for layer in self._layers],
                              devices={layer.name: layer.module.weight.device for layer in self._layers},
                              factor_dtype=factor_dtype, strategy=strategy, grad_worker_fraction=grad_worker_fraction,
                              factor_reduction=factor_reduction, plan_kwargs=plan_kwargs, stats=self._pending_stats,
                              bucket_cap_bytes=int(bucket_cap_mb * 2**20))
        iu, cu = self.inv_update_steps, self.correction_update_steps
        if self._corrects and isinstance(iu, int) and isinstance(cu, int) and cu % iu == 0:
            logger.warning("kfac: method=%r with correction_update_steps=%d and inv_update_steps=%d never applies a "
                           "correction (corrections are skipped on refresh steps)", method, cu, iu)
        if self._corrects and self.world_size > 1 and self.plan.grad_workers_per_layer != self.world_size:
            raise ValueError(f"method={method!r} in a distributed run needs strategy='comm-opt': every rank projects "
                             "its per-example gradients onto the eigenbases, so every rank must hold them")

    def _options(self, **extra: Any) -> dict[str, Any]:
        """Every option that affects the update, JSON-comparable across ranks (schedules by their step-0 value)."""
        names = ("factor_update_steps", "inv_update_steps", "damping", "factor_decay", "correction_update_steps",
                 "correction_decay", "kl_clip", "lr", "fisher", "accumulation_steps", "factor_dtype")
        out = {n: comparable(getattr(self, n)) for n in names}
        out.update({k: comparable(v) for k, v in extra.items()})
        return out

    def _schedule_values(self, step: int) -> tuple[object, ...]:
        """The hyperparameters at ``step`` that must agree between ranks (compared every step, see :meth:`step`)."""
        return tuple(resolve(getattr(self, n), step, name=n) for n in _SCHEDULED)

    @property
    def _corrects(self) -> bool:
        return bool(getattr(self.method, "corrects", False))

    @property
    def plan(self):
        """The :class:`kfac.planner.Plan` this rank follows (trivial in a single process)."""
        return self._exec.plan

    @property
    def communicator(self) -> Communicator:
        """The :class:`kfac.distributed.comm.Communicator` this preconditioner's collectives go through."""
        return self._comm

    @property
    def executor(self) -> Executor:
        """The :class:`kfac.distributed.executor.Executor` carrying out :attr:`plan` on this rank."""
        return self._exec

    @property
    def rank(self) -> int:
        return self._comm.rank

    @property
    def world_size(self) -> int:
        return self._comm.world_size

    @property
    def bytes_communicated(self) -> dict[str, int]:
        """This rank's share of the bytes on the wire so far, by category (factors, decompositions, gradients,
        control flags, ...); summed over ranks it is the total traffic, comparable with ``plan.comm``."""
        return {k: int(round(v)) for k, v in self._comm.bytes_sent.items()}

    # -- registration ---------------------------------------------------------------------------------------
    def _register(self, model: nn.Module, skip: Iterable[str] | str, *, hooks: bool) -> None:
        tracking = track_layers(model, skip)
        self.skipped += tracking.skipped
        for t in tracking.layers:
            entry = self.store.add(t.name, a_dim=t.adapter.a_dim, g_dim=t.adapter.g_dim,
                                   a_diagonal=t.adapter.a_diagonal)
            layer = _Layer(name=t.name, module=t.module, adapter=t.adapter, entry=entry,
                           input_name=_first_input(t.module))
            self._layers.append(layer)
            self._by_name[t.name] = layer
        for name, reason in self.skipped:
            logger.info("kfac: not preconditioning %r: %s", name, reason)
        if hooks:
            for layer in self._layers:
                owner = _HOOKED.get(layer.module)
                other = owner() if owner is not None else None
                if other is not None and other is not self and other._hooks_on(layer.module):
                    raise ValueError(f"layer {layer.name!r} is already tracked by another live K-FAC preconditioner "
                                     "(kfac.KFAC built twice on one model?): both would collect statistics; call "
                                     "remove() on the old one (opt.preconditioner.remove()) first")
            for layer in self._layers:
                layer.handles.append(layer.module.register_forward_hook(
                    functools.partial(self._forward_hook, layer), with_kwargs=True))
                _HOOKED[layer.module] = weakref.ref(self)

    def _hooks_on(self, module: nn.Module) -> bool:
        return any(layer.module is module and layer.handles for layer in self._layers)

    @property
    def layers(self) -> list[str]:
        """Names of the tracked (preconditioned) modules, in registration order."""
        return [layer.name for layer in self._layers]

    def remove(self) -> None:
        """Remove every hook this preconditioner registered (the model is left as it was)."""
        for layer in self._layers:
            for h in layer.handles:
                h.remove()
            layer.handles.clear()
            layer.discard_pending()
            if _HOOKED.get(layer.module) is not None and _HOOKED[layer.module]() is self:
                del _HOOKED[layer.module]

    # -- hyperparameters -----------------------------------------------------------------------------------
    def _hparams(self, step: int) -> dict[str, Any]:
        hp = {
            "factor_update_steps": self._interval("factor_update_steps", step),
            "inv_update_steps": self._interval("inv_update_steps", step),
            "damping": resolve(self.damping, step, name="damping"),
            "factor_decay": resolve(self.factor_decay, step, name="factor_decay"),
            "correction_update_steps": self._interval("correction_update_steps", step),
            "correction_decay": resolve(self.correction_decay, step, name="correction_decay"),
            "kl_clip": resolve(self.kl_clip, step, name="kl_clip"),
            "lr": resolve(self.lr, step, name="lr"),
        }
        check_positive(hp["damping"], name="damping")
        check_positive(hp["kl_clip"], name="kl_clip", allow_none=True)
        for key in ("factor_decay", "correction_decay"):
            if not 0 <= hp[key] < 1:
                raise ValueError(f"{key} must be in [0, 1), got {hp[key]!r}")
        return hp

    def _interval(self, name: str, step: int) -> int:
        return check_step_count(resolve(getattr(self, name), step, name=name), name=name)

    def _capturing(self) -> bool:
        """Whether this step updates factors (statistics are only collected then)."""
        self._schedule()
        return self._capture_flag

    def _correcting(self) -> bool:
        """Whether this step updates EK-FAC corrections (per-example projections are only computed then)."""
        self._schedule()
        return self._correct_flag

    def _schedule(self) -> None:
        if self._capture_step != self.steps:
            fus = self._interval("factor_update_steps", self.steps)
            cus = self._interval("correction_update_steps", self.steps)
            self._capture_step = self.steps
            self._capture_flag = self.steps % fus == 0
            self._correct_flag = self._corrects and self.steps % cus == 0

    # -- hooks ---------------------------------------------------------------------------------------------
    def _forward_hook(self, layer: _Layer, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                      output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()) or functorch_active():
            return
        x = args[0] if args else kwargs.get(layer.input_name) if layer.input_name is not None else None
        if not isinstance(x, Tensor):
            return
        layer.forward_calls += 1
        capture, correct = self._capturing(), self._correcting()
        if not (capture or correct):
            return
        if capture:
            with statistics_mode(x):
                stat, n = layer.adapter.a_stat(x.detach(), self.factor_dtype)
            layer.a_sum, layer.a_count = _add(layer.a_sum, stat), layer.a_count + n
        x_corr = x.detach() if correct and self.method.ready(layer.entry) else None
        if isinstance(output, Tensor) and output.requires_grad:
            # a forward re-run inside a backward pass (activation checkpointing) is not a new use: its gradient
            # arrives in a nested backward (reentrant) or never (non-reentrant, whose first run already counted)
            if capture and not in_backward():
                layer.g_expected += 1
            output.register_hook(functools.partial(self._grad_hook, layer, capture, x_corr))

    def _grad_hook(self, layer: _Layer, capture: bool, x: Tensor | None, grad: Tensor) -> None:
        if not layer.handles:
            return
        if x is not None and not self._in_mc_backward:  # EK-FAC corrections use the data's own labels
            with statistics_mode(grad):
                self._add_correction(layer, x, grad)
        if not capture or (self.fisher == "mc") != self._in_mc_backward:
            return
        with statistics_mode(grad):
            stat, n = layer.adapter.g_stat(grad.detach(), self.factor_dtype, scale=self._grad_scale())
        layer.g_sum, layer.g_count = _add(layer.g_sum, stat), layer.g_count + n
        layer.g_received += 1
        if layer.g_received < layer.g_expected:
            return  # a layer applied several times per forward: the gradients of its other uses are still to come
        layer.g_calls += 1
        if layer.g_calls == self.accumulation_steps and layer.a_count:
            self._exec.mark_final(layer.name)  # last micro-batch: its reduction may start during this backward

    def _grad_scale(self) -> Tensor | float | None:
        """The loss scale of the backward pass in flight (the scaler's live tensor: no host sync, never stale)."""
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return None
        scale = getattr(scaler, "_scale", None)
        return scale if isinstance(scale, Tensor) else float(scaler.get_scale())

    def mc_backward(self, outputs: Tensor, *, loss: str = "cross_entropy", reduction: str = "mean",
                    generator: torch.Generator | None = None) -> None:
        """Collect ``G`` for ``fisher="mc"`` from a loss on labels sampled from ``outputs`` (see :mod:`kfac.kronecker.sampling`).

        Call after the forward pass and before ``loss.backward()`` on every (micro-)batch; it is a no-op on steps
        that do not update factors. Parameter gradients are not touched. Like the user's loss under gradient
        accumulation, the sampled loss is divided by ``accumulation_steps``.
        """
        if self.fisher != "mc":
            raise RuntimeError("mc_backward() needs fisher='mc' (this preconditioner uses the empirical Fisher)")
        if not self._capturing():
            return
        sampled = sampling.sampled_loss(outputs, loss=loss, reduction=reduction, generator=generator)
        if self.accumulation_steps > 1:
            sampled = sampled / self.accumulation_steps
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            sampled = self.grad_scaler.scale(sampled)
        weights = [layer.module.weight for layer in self._layers if layer.handles]
        self._in_mc_backward = True
        try:
            torch.autograd.grad(sampled, weights, retain_graph=True, allow_unused=True)
        finally:
            self._in_mc_backward = False

    def discard_pending_statistics(self) -> None:
        """Drop statistics collected since the last step (e.g. those of a step that was skipped), finishing any
        reduction of them already in flight."""
        if hasattr(self, "_exec"):
            self._exec.discard_statistics()
        for layer in self._layers:
            layer.discard_pending()

    def _pending_stats(self, name: str) -> PendingStats:
        layer = self._by_name[name]
        if not (layer.a_count and layer.g_count):
            return PendingStats(None, 0, None, 0)
        return PendingStats(layer.a_sum, layer.a_count, layer.g_sum, layer.g_count)

    def discard_stale_statistics(self) -> None:
        """Drop statistics only if a backward pass already ran (a step that never reached ``step()``); the
        statistics of a forward pass whose backward is still to come are kept."""
        if any(layer.g_calls for layer in self._layers):
            self.discard_pending_statistics()

    # -- step ----------------------------------------------------------------------------------------------
    def _check_execution(self) -> None:
        """At the first step: some tracked layer must have run (a clear error for a model in eval mode), and the
        model must still hold the tracked modules."""
        if self._checked_execution:
            return
        if not any(layer.forward_calls > 0 for layer in self._layers):
            raise RuntimeError("no tracked layer ran forward() in training mode with gradients enabled since the "
                               "preconditioner was created: call model.train() and run the forward pass before step()")
        self._check_modules()
        self._checked_execution = True

    def _check_modules(self) -> None:
        """Raise if a tracked module was replaced or removed since construction (its hooks would never fire again);
        warn once if supported modules were added (they are not preconditioned). Run on refresh steps."""
        model = self._model()
        if model is None or not self._hooks:
            return
        current = dict(model.named_modules())
        replaced = [layer.name for layer in self._layers if current.get(layer.name) is not layer.module]
        if replaced:
            raise RuntimeError(f"kfac: tracked modules {replaced} were replaced or removed after the preconditioner "
                               "was built, so they are no longer preconditioned: build kfac.KFAC after the model is "
                               "final (or remove() this one and build a new one)")
        added = [n for n, m in current.items() if m not in self._modules_at_start and n not in self._known_names
                 and any(True for _ in m.parameters(recurse=False)) and adapter_for(m)[0] is not None]
        if added:
            self._known_names.update(added)
            warnings.warn(f"kfac: modules {added} were added to the model after the preconditioner was built and are "
                          "not preconditioned: build kfac.KFAC after the model is final", stacklevel=4)

    def _check_fresh_gradients(self) -> None:
        """``step()`` twice on the same gradients would precondition them twice: a clear error instead."""
        if self._written and self._written == self._grad_versions():
            raise RuntimeError("KFACPreconditioner.step() was called again on gradients it already preconditioned "
                               "(no backward pass since the last step): run zero_grad() and backward() before each "
                               "step()")

    def _grad_versions(self) -> tuple[tuple[int, int], ...]:
        return tuple((id(p.grad), p.grad._version) for layer in self._layers for p in layer.adapter.parameters()
                     if p.grad is not None)

    def _drop_unexecuted(self, names: Iterable[str]) -> None:
        """Untrack layers that a checkpoint of an older version recorded as never executed (state compatibility)."""
        dropped = self._untrack(names, "registered but never executed through forward() (recorded in the "
                                       "loaded checkpoint); its gradient is left unpreconditioned")
        self.not_executed += dropped

    def _untrack(self, names: Iterable[str], reason: str) -> list[str]:
        """Stop tracking ``names`` (hooks removed, store entries deleted, listed in ``skipped``). Every rank must
        untrack the same layers at the same point (the plan is recomputed and checked collectively)."""
        wanted = set(names)
        dropped = []
        for layer in [layer for layer in self._layers if layer.name in wanted]:
            for h in layer.handles:
                h.remove()
            layer.handles.clear()
            if _HOOKED.get(layer.module) is not None and _HOOKED[layer.module]() is self:
                del _HOOKED[layer.module]
            self._layers.remove(layer)
            del self._by_name[layer.name]
            self.store.remove(layer.name)
            self.skipped.append((layer.name, reason))
            dropped.append(layer.name)
        if dropped and hasattr(self, "_exec"):
            self._exec.replan([layer.entry for layer in self._layers])
        return dropped

    @property
    def unused_layers(self) -> list[str]:
        """Tracked layers that have not contributed statistics on any rank yet (a branch not taken so far, or a
        module only called functionally): their gradients are used as they are until they have factors."""
        return [layer.name for layer in self._layers if layer.name not in self._seen]

    @torch.no_grad()
    def step(self, *, lr: float | Mapping[str, float] | None = None, grads_finite: bool = True) -> bool:
        """Update factors/decompositions on schedule and precondition the tracked gradients in place.

        ``lr`` overrides the ``lr`` hyperparameter for ``kl_clip`` (a float, or a mapping layer name -> lr).
        Returns ``False`` (and changes nothing but the ``skipped_steps`` counter) when a tracked gradient is
        non-finite on any rank, or ``grads_finite`` is ``False`` on any rank (the wrapper's check of the other
        parameters); every rank then skips together. Non-finite factor statistics with finite gradients (e.g. an
        overflow in ``a^T a``) are dropped with a warning: that step preconditions with the current factors but
        does not update them. A layer whose preconditioned gradient is non-finite (factors too ill-conditioned for
        the damping) keeps its plain gradient that step, with a warning (counted in :attr:`fallbacks`).
        The same step also checks that every rank's hyperparameter schedules agree for this and the next step.
        """
        grads = {layer.name: layer.adapter.grad_matrix() for layer in self._layers}
        if all(g is None for g in grads.values()):
            raise RuntimeError("KFACPreconditioner.step() was called before loss.backward(): "
                               "no tracked parameter has a gradient")
        self._check_fresh_gradients()
        self._check_execution()
        hp = self._hparams(self.steps)
        lrs = self._layer_lrs(hp, lr)
        update = self.steps % hp["factor_update_steps"] == 0
        refresh = self.steps % hp["inv_update_steps"] == 0
        correct = not refresh and self._correcting()
        if refresh:
            self._check_modules()
        if update:
            self._exec.launch_statistics()  # before any other collective of this step, on every rank
        staged = None
        if not (update or refresh or correct):
            # Nothing but preconditioning: queue it before the finiteness check's host sync, so that the device
            # is kept busy while the host waits (the results are fresh tensors, dropped if the step is skipped).
            staged = self._preconditioned(grads, hp, lrs)
        finite = grads_finite and all_finite(g for g in grads.values() if g is not None)
        staged_bad = staged.non_finite(self.layers) if staged is not None else []
        # distributed: schedules at this and the next step must agree on every rank (their values ride along in the
        # finiteness all-reduce, so a mismatch is caught a step before it could desynchronise the collectives)
        token = (schedule_token(self._schedule_values(self.steps) + self._schedule_values(self.steps + 1))
                 if self._comm.enabled else 0)
        everywhere, same, staged_bad = self._comm.agree(finite, token, staged_bad)
        if not same:  # every rank sees the mismatch in the same reduction, so every rank takes this branch
            self._comm.check_identical({n: [v, w] for n, v, w in zip(_SCHEDULED, self._schedule_values(self.steps),
                                                                     self._schedule_values(self.steps + 1))},
                                       what=f"K-FAC hyperparameter schedules at steps {self.steps}-{self.steps + 1}")
        if not everywhere:
            self.skip_step("non-finite gradients" if not finite else "non-finite gradients on another rank")
            return False
        if update:
            self._update_factors(hp["factor_decay"])
        if refresh:
            self._refresh(hp["damping"])  # new eigenbases: this step's corrections (in the old ones) are dropped
        elif correct:
            self._update_corrections(hp["correction_decay"])
        self.discard_pending_statistics()
        if staged is not None:
            bad = staged_bad
        else:
            staged = self._preconditioned(grads, hp, lrs)
            bad = self._comm.agree(True, 0, staged.non_finite(self.layers))[2]
        copy_all(staged.pairs({n for n, b in zip(self.layers, bad) if b}, self._fall_back))
        self._written = self._grad_versions()
        self.steps += 1
        return True

    def _fall_back(self, name: str) -> None:
        """Layer ``name`` keeps its plain gradient this step (its preconditioned gradient is non-finite)."""
        self.fallbacks[name] = self.fallbacks.get(name, 0) + 1
        if name not in self._warned_fallback:
            self._warned_fallback.add(name)
            warnings.warn(f"kfac: non-finite preconditioned gradient for layer {name!r} at step {self.steps} (its "
                          "factors are too ill-conditioned for the damping, or its decompositions are not finite); "
                          "it uses its plain gradient (warned once per refresh; counted in fallbacks)", stacklevel=4)

    # -- the curvature interface (kfac.curvature.Preconditioner) -------------------------------------------
    def block_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{layer: (g_dim, a_dim)}``: the gradient-matrix layout of each tracked layer (bias as last column)."""
        return {layer.name: (layer.entry.g_dim, layer.entry.a_dim) for layer in self._layers}

    @property
    def adapters(self) -> dict[str, ModuleAdapter]:
        """``{layer: its module adapter}`` for the tracked layers."""
        return {layer.name: layer.adapter for layer in self._layers}

    def parameters_of(self) -> dict[str, list[nn.Parameter]]:
        """``{layer: its parameters}`` for the tracked layers."""
        return {layer.name: layer.adapter.parameters() for layer in self._layers}

    def untrack(self, names: Iterable[str], reason: str) -> list[str]:
        """Stop preconditioning ``names`` (hooks removed, store entries deleted, listed in ``skipped``)."""
        return self._untrack(names, reason)

    @torch.no_grad()
    def update(self) -> None:
        """Absorb the statistics collected since the last call (factors, and EK-FAC corrections on their
        schedule) and advance the step counter, without touching gradients (e.g. to fit factors for influence)."""
        self._check_execution()
        hp = self._hparams(self.steps)
        if self._capturing():
            self._exec.launch_statistics()
            self._update_factors(hp["factor_decay"])
        if self._correcting():
            self._update_corrections(hp["correction_decay"])
        self.discard_pending_statistics()
        self.steps += 1

    @torch.no_grad()
    def refresh(self, *, damping: float | None = None) -> None:
        """Recompute the decompositions from the current factors (``damping``: default the current one)."""
        self._refresh(self._hparams(self.steps)["damping"] if damping is None else check_positive(
            damping, name="damping"))

    @torch.no_grad()
    def ihvp(self, grads: Mapping[str, Tensor] | Tensor, *, damping: float | None = None,
             ) -> dict[str, Tensor] | Tensor:
        """``(C + damping I)^-1 g`` per layer, for ``{layer: (g_dim, a_dim) matrix}`` or a flat vector (see
        :mod:`kfac.curvature`). Needs every layer's decompositions on this rank (a single process, or
        ``strategy="comm-opt"``)."""
        damping = self._query_damping(damping)
        shapes = self.block_shapes()
        flat = isinstance(grads, Tensor)
        named = unflatten_blocks(grads, shapes) if flat else dict(grads)
        unknown = [n for n in named if n not in shapes]
        if unknown:
            raise ValueError(f"ihvp: unknown layers {unknown}; tracked layers are {list(shapes)}")
        out = {}
        for name, g in named.items():
            if tuple(g.shape) != shapes[name]:
                raise ValueError(f"ihvp: gradient of {name!r} has shape {tuple(g.shape)}, expected {shapes[name]}")
            out[name] = self.method.precondition(self._ready_entry(name), g, damping=damping).to(g.dtype)
        return flatten_blocks(out, shapes) if flat else out

    @torch.no_grad()
    def diag(self, *, damping: float | None = None) -> dict[str, Tensor]:
        """The diagonal of ``(C + damping I)^-1`` per layer, as ``(g_dim, a_dim)`` matrices."""
        damping = self._query_damping(damping)
        return {layer.name: self.method.diag(self._ready_entry(layer.name), damping=damping)
                for layer in self._layers}

    def _query_damping(self, damping: float | None) -> float:
        value = self._hparams(self.steps)["damping"] if damping is None else check_positive(damping, name="damping")
        if self.method.name == "inverse" and self._refreshed_damping is not None and value != self._refreshed_damping:
            raise ValueError(f"method='inverse' bakes the damping into its inverses at refresh time "
                             f"({self._refreshed_damping}); call refresh(damping={value}) first")
        return value

    def _ready_entry(self, name: str) -> FactorEntry:
        entry = self.store[name]
        if not self.method.ready(entry):
            where = (f"; rank {self.rank} of {self.world_size} only holds the decompositions the "
                     f"{self.plan.strategy!r} plan assigns it (use strategy='comm-opt' to hold them all)"
                     if self.world_size > 1 else "")
            raise RuntimeError(f"layer {name!r} has no decompositions: call update() and refresh() first{where}")
        return entry

    def skip_step(self, reason: str) -> None:
        """Record a skipped step: statistics since the last step are dropped, nothing else changes."""
        self.skipped_steps += 1
        self.discard_pending_statistics()
        logger.warning("kfac: %s at step %d; step skipped (%d skipped so far)", reason, self.steps,
                       self.skipped_steps)

    def _layer_lrs(self, hp: Mapping[str, Any], lr: float | Mapping[str, float] | None) -> dict[str, float] | None:
        return None if hp["kl_clip"] is None else block_lrs(self.layers, hp["lr"], lr)

    def _update_factors(self, decay: float) -> None:
        used = [layer for layer in self._layers if layer.a_count and layer.g_count]
        if self._layers and not any(layer.g_received for layer in self._layers) and self.fisher == "mc":
            raise RuntimeError("fisher='mc' needs mc_backward(outputs) after the forward pass of every "
                               "factor-update step; no sampled-label statistics were collected")
        calls = [layer.g_calls for layer in used]
        if calls and min(calls) != self.accumulation_steps and not self._warned_accumulation:
            self._warned_accumulation = True
            logger.warning("kfac: saw %d backward pass(es) before step() but accumulation_steps=%d",
                           min(calls), self.accumulation_steps)
        batches = self._exec.reduce_statistics()
        # batch factors are Gram matrices: |M_ij| <= sqrt(M_ii M_jj), so they are finite iff their diagonals are
        # (O(d) to check instead of O(d^2))
        held = [t.diagonal() if t.dim() == 2 else t for a, g, _ in batches.values() for t in (a, g) if t is not None]
        finite = all_finite(held)
        if self._exec.narrow_factor_wire:  # float16 on the wire can overflow: decide together, then widen it
            finite = self._comm.all_true(finite)
            if not finite:
                self._exec.widen_factor_wire()
                logger.warning("kfac: factor statistics overflowed %s on the wire at step %d; this step's statistics "
                               "are dropped and factors travel in %s from now on", self._comm.comm_dtype,
                               self.steps, self.factor_dtype)
                self.discarded_statistics += 1
                return
        if not finite:
            logger.warning("kfac: non-finite factor statistics at step %d (finite gradients); factors not updated "
                           "this step", self.steps)
            self.discarded_statistics += 1
            return
        self._seen.update(name for name, (_, _, seen) in batches.items() if seen)
        if not self._reported_unused:  # once, from globally reduced counts: the same on every rank
            self._reported_unused = True
            unused = self.unused_layers
            if unused:
                warnings.warn(f"kfac: tracked layers {unused} ran no forward pass in training mode on any rank before "
                              "the first factor update (a branch not taken yet, or a module called functionally); "
                              "their gradients are used as they are until they run and their factors are refreshed",
                              stacklevel=4)
        for layer in self._layers:
            a_batch, g_batch, seen = batches[layer.name]
            entry = layer.entry
            if a_batch is not None:
                if entry.A is None:
                    entry.A = (torch.ones_like(a_batch) if entry.a_diagonal else
                               torch.eye(entry.a_dim, dtype=a_batch.dtype, device=a_batch.device))
                entry.A = torch.lerp(entry.A, a_batch, 1 - decay)  # decay A + (1 - decay) A_batch, a new tensor
            if g_batch is not None:
                if entry.G is None:
                    entry.G = torch.eye(entry.g_dim, dtype=g_batch.dtype, device=g_batch.device)
                entry.G = torch.lerp(entry.G, g_batch, 1 - decay)
            if seen:
                entry.num_updates += 1

    def _refresh(self, damping: float) -> None:
        def failed(entry: FactorEntry, factor: str, exc: DecompositionError) -> None:
            warnings.warn(f"kfac: {exc}; layer {entry.name!r} uses its plain gradient until the next refresh",
                          stacklevel=5)

        self._exec.refresh(lambda e, f: self.method.refresh_factor(e, f, damping=damping), self.method.fields, failed)
        self._refreshed_damping = damping
        self._warned_fallback.clear()
        if self._corrects:  # new eigenbases: the corrections restart from the K-FAC eigenvalues
            for layer in self._layers:
                if self._exec.is_grad_worker(layer.name):
                    self.method.reset_corrections(layer.entry)

    @torch.no_grad()
    def _add_correction(self, layer: _Layer, x: Tensor, grad: Tensor) -> None:
        """Project this backward pass's per-example gradients onto the current eigenbases (EK-FAC)."""
        scale = self._grad_scale()
        g = grad.detach() if scale is None else grad.detach() / scale
        a_rows, g_rows = layer.adapter.example_rows(x, g, self.factor_dtype)
        part = self.method.correction_sum(layer.entry, a_rows, g_rows)
        if part is not None:
            part = part / a_rows.shape[1]  # per-row units (see kfac.kronecker.methods.ekfac)
            layer.corr_sum = part if layer.corr_sum is None else layer.corr_sum.add_(part)
            layer.corr_count += a_rows.shape[0]

    def _update_corrections(self, decay: float) -> None:
        """EK-FAC: ``Lambda_batch = sum over ranks and examples of (QG^T V_n QA)^2 / T_n`` divided by the global
        example count (and by ``world_size^2``, the gradient-averaging convention of :mod:`kfac.distributed.executor`)."""
        names, sums, counts = [], [], []
        for layer in self._layers:
            entry = layer.entry
            if not (self._exec.is_grad_worker(layer.name) and self.method.ready(entry)) or entry.a_diagonal:
                continue
            total = layer.corr_sum
            if total is None:
                total = torch.zeros(entry.g_dim, entry.a_dim, dtype=entry.QG.dtype, device=entry.QG.device)
            names.append(layer.name)
            sums.append(total)
            counts.append(float(layer.corr_count))
        if not names:
            return
        count = torch.tensor(counts, dtype=torch.float64, device=sums[0].device)
        if self._comm.enabled:
            count = self._comm.all_reduce_sum([count], category="correction_counts", exact=True)[0]
            sums = self._comm.all_reduce_sum(sums, category="corrections")
        scale = float(self.world_size) ** 2
        for name, total, n in zip(names, sums, count.tolist()):
            if n > 0:
                self.method.update_corrections(self.store[name], total / (n * scale), decay)

    def _preconditioned(self, grads: Mapping[str, Tensor | None], hp: Mapping[str, Any],
                        lrs: Mapping[str, float] | None) -> "_Staged":
        """Queue the preconditioning of every tracked gradient (exchanged between ranks, scaled by ``kl_clip``)
        and the per-layer dots ``<P(g), g>`` that check it, leaving the gradients untouched."""
        kl_clip, damping = hp["kl_clip"], hp["damping"]
        local: dict[str, tuple[Tensor, bool]] = {}
        for layer in self._layers:
            grad = grads[layer.name]
            if grad is None or not self._exec.is_grad_worker(layer.name):
                continue
            if self.method.ready(layer.entry):
                local[layer.name] = (self.method.precondition(layer.entry, grad, damping=damping), True)
            else:
                local[layer.name] = (grad.to(self.factor_dtype), False)
        results = self._exec.exchange_gradients(local, grads)
        layers = [layer for layer in self._layers if layer.name in results and results[layer.name][1]]
        updates = [results[layer.name][0] for layer in layers]
        dots = update_dots([(v, grads[layer.name]) for layer, v in zip(layers, updates)]) if layers else None
        if lrs is not None and dots is not None:
            # each v is a fresh preconditioned tensor (or a received buffer), never the gradient
            foreach_mul_(updates, kl_clip_scale(dots, [lrs[layer.name] for layer in layers], kl_clip))
        return _Staged(layers=layers, updates=updates, dots=dots)

    # -- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Step counters and the factors and decompositions this rank holds (tensors referenced, not copied).

        Never communicates, so ``if rank == 0: torch.save(opt.state_dict(), path)`` is safe. When this rank holds
        everything (a single process, or ``strategy="comm-opt"``) the state is complete and loads at any world
        size; otherwise it is this rank's *shard* (``state["shard"]`` names the rank, world size and plan) and loads
        only into the same rank of the same plan -- for a portable checkpoint call :meth:`consolidated_state_dict`
        on every rank instead.
        """
        complete = all(self._exec.holds(n, f) and self._exec.is_grad_worker(n) for n in self.layers for f in "AG")
        shard = None if complete or not self._comm.enabled else {
            "rank": self.rank, "world_size": self.world_size, "plan": self.plan.digest()}
        if shard is not None and not self._warned_shard:
            self._warned_shard = True
            logger.warning("kfac: state_dict() on rank %d holds only this rank's shard of the K-FAC state (strategy "
                           "%r): resume it with every rank loading its own file at the same world size, or save "
                           "consolidated_state_dict() (a collective: call it on every rank) for a portable "
                           "checkpoint", self.rank, self.plan.strategy)
        return self._state(self.store.state_dict(), shard)

    def consolidated_state_dict(self) -> dict[str, Any]:
        """The complete state on every rank, loadable at any world size. A collective: every rank must call it
        (each factor's owner sends its state); in a single process it equals :meth:`state_dict`."""
        return self._state(self._exec.gather_store_state(self.store, self.method.fields), None)

    def _state(self, store: dict[str, Any], shard: dict[str, Any] | None) -> dict[str, Any]:
        return {"steps": self.steps, "skipped_steps": self.skipped_steps, "layers": self.layers,
                "not_executed": list(self.not_executed), "method": self.method.name, "store": store,
                "seen": sorted(self._seen), "shard": shard}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` / :meth:`consolidated_state_dict` output; the tracked layers must match
        (clear error otherwise)."""
        self.validate_state_dict(state)
        self._drop_unexecuted(state.get("not_executed", ()))
        self.store.load_state_dict(state["store"])
        self._exec.prune(self.method.fields)
        for layer in self._layers:
            layer.entry.to(layer.module.weight.device)
        self.steps = int(state["steps"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self._seen = set(state.get("seen", self.layers)) & set(self.layers)
        self._reported_unused = True
        self._checked_execution = True
        self._capture_step = None
        self._written = ()
        self.discard_pending_statistics()

    def validate_state_dict(self, state: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` if ``state`` cannot be loaded into this preconditioner (nothing is changed)."""
        shard = state.get("shard")
        if shard is not None:
            here = {"rank": self.rank, "world_size": self.world_size, "plan": self.plan.digest()}
            if shard != here:
                raise ValueError(
                    f"this K-FAC state is the shard of rank {shard['rank']} of {shard['world_size']} (saved by "
                    f"state_dict() under a sharded plan); it loads only into that rank of the same plan (this is "
                    f"rank {self.rank} of {self.world_size}{'' if shard['plan'] == here['plan'] else ', another plan'}"
                    "). Save consolidated_state_dict() on every rank (or one state_dict() file per rank) to resume")
        expected = set(self.layers) - set(state.get("not_executed", ()))
        if set(state["layers"]) != expected:
            missing, extra = expected - set(state["layers"]), set(state["layers"]) - expected
            raise ValueError(f"K-FAC state was saved for different layers: missing {sorted(missing)}, "
                             f"unexpected {sorted(extra)}")
        if state.get("method", self.method.name) != self.method.name:
            raise ValueError(f"K-FAC state was saved with method={state['method']!r}, this is {self.method.name!r}")
        probe = FactorStore()
        for layer in self._layers:
            if layer.name in expected:
                e = layer.entry
                probe.add(e.name, a_dim=e.a_dim, g_dim=e.g_dim, a_diagonal=e.a_diagonal)
        probe.load_state_dict(state["store"])

    def memory_usage(self) -> int:
        """Bytes held by factors and decompositions (not counting derived caches: eigen K-FAC on the PyTorch path
        keeps ``1 / (eigenvalues + damping)``, one number per tracked weight, between refreshes)."""
        return self.store.nbytes()

    def __repr__(self) -> str:
        return (f"KFACPreconditioner(method={self.method.name!r}, strategy={self._exec.strategy!r}, "
                f"world_size={self.world_size}, layers={len(self._layers)}, "
                f"skipped={len(self.skipped)}, steps={self.steps}, store={self.store!r})")


@dataclass
class _Staged:
    """Preconditioned gradients queued by one step, with their per-layer dots (the finiteness check)."""

    layers: list[_Layer]
    updates: list[Tensor]
    dots: Tensor | None

    def non_finite(self, tracked: Sequence[str]) -> list[bool]:
        """Per tracked layer (a vector of the same length on every rank), whether its preconditioned gradient is
        non-finite (one host sync)."""
        finite = [] if self.dots is None else torch.isfinite(self.dots).tolist()
        bad = {layer.name for layer, ok in zip(self.layers, finite) if not ok}
        return [name in bad for name in tracked]

    def pairs(self, bad: Collection[str], fall_back: Callable[[str], None]) -> list[tuple[Tensor, Tensor]]:
        """The ``(.grad, new value)`` pairs to copy; a layer in ``bad`` keeps its plain gradient (``fall_back``)."""
        out = []
        for layer, v in zip(self.layers, self.updates):
            if layer.name in bad:
                fall_back(layer.name)
            else:
                out += layer.adapter.grad_targets(v)
        return out


def _first_input(module: nn.Module) -> str | None:
    """The name of ``module.forward``'s first parameter (to find an input passed by keyword)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):  # pragma: no cover (builtins without a signature)
        return None
    first = next((p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)), None)
    return first.name if first is not None else None


