"""Optimizer wrappers: precondition the gradients (K-FAC, EK-FAC or M-FAC), then run a base optimizer.

One mechanism, :class:`PreconditionedOptimizer`, for all of them: it drives any :class:`kfac.curvature.Preconditioner`.
``param_groups`` and ``state`` *are* the base optimizer's, so LR schedulers, gradient clipping utilities and
``GradScaler.step`` work on the wrapper directly; ``kl_clip`` reads each layer's current group ``lr``.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .distributed.comm import Communicator
from .distributed.fsdp import is_sharded, local_shard, shard_size
from .distributed.sharded_jvp import sharded_gram
from .curvature import Preconditioner
from ._tensor import all_finite
from .adaptive.contract import RandomState, check_equal_parts, gradient_versions, same_inputs, step_lr
from .adaptive.controller import AdaptiveConfig, AdaptiveController, Part
from .adaptive.output_loss import OutputLoss
from .adaptive.quadratic import ParameterSpace, batch_statistics_only
from .kronecker.preconditioner import KFACPreconditioner
from .kronecker.store import FactorStore
from .tracking import rename_map
from . import optim_state

__all__ = ["PreconditionedOptimizer", "KFAC", "EKFAC", "MFAC"]

logger = logging.getLogger("kfac")


class PreconditionedOptimizer(torch.optim.Optimizer):
    """Runs ``preconditioner.step()`` on the gradients, then ``optimizer.step()`` (skipping both together when a
    gradient is non-finite on any rank; ``opt.preconditioner.skipped_steps`` counts such steps).

    ``preconditioner`` must implement :class:`kfac.curvature.Preconditioner`. Blocks whose parameters are not all
    in ``optimizer``'s param groups are untracked (their gradients are left as they are).
    """

    def __init__(self, preconditioner: Preconditioner, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.preconditioner = preconditioner
        # Initialise torch.optim.Optimizer's bookkeeping (hooks, step patching) on the base's groups, then share
        # the very same containers so schedulers and the base optimizer see one state.
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self._kfac_ready = True
        stepped = {id(p) for group in self.param_groups for p in group["params"]}
        outside = [name for name, params in self.preconditioner.parameters_of().items()
                   if not all(id(p) in stepped for p in params)]
        if len(outside) == len(self.preconditioner.layers):
            self.preconditioner.remove()  # its hooks must not outlive this failed construction
            raise ValueError("none of the supported layers has its parameters in the optimizer")
        self.preconditioner.untrack(outside, "parameters are not (all) in the optimizer's param groups")
        self._param_to_layer = {id(p): name for name, params in self.preconditioner.parameters_of().items()
                                for p in params}

    @property
    def store(self) -> FactorStore:
        """The factor store (:class:`kfac.FactorStore`)."""
        # K-FAC / EK-FAC only, so not in the Preconditioner protocol (M-FAC raises AttributeError): duck-typed
        store: FactorStore = getattr(self.preconditioner, "store")
        return store

    def _layer_lrs(self) -> dict[str, float]:
        lrs: dict[str, float] = {}
        for group in self.param_groups:
            for p in group["params"]:
                name = self._param_to_layer.get(id(p))
                if name is not None and name not in lrs:
                    lrs[name] = float(group["lr"])
        return lrs

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Precondition the tracked gradients, then call the base optimizer's ``step``."""
        if closure is None and self._initialising_state():
            return self.optimizer.step()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # the preconditioner checks its own layers' gradients; here only the others (norm layers, ...)
        others = [p.grad for group in self.param_groups for p in group["params"]
                  if p.grad is not None and id(p) not in self._param_to_layer]
        finite = all_finite(others)
        if self.preconditioner.step(lr=self._layer_lrs(), grads_finite=finite):
            self.optimizer.step()
        return loss

    def _initialising_state(self) -> bool:
        """``step()`` before any step with every gradient exactly zero: how ``torch.distributed.checkpoint``'s
        ``get_state_dict`` / ``set_optimizer_state_dict`` create an empty optimizer state (at lr 0). Only the base
        optimizer steps (zero stays zero under any preconditioner; K-FAC's state is untouched)."""
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.requires_grad]
        if getattr(self.preconditioner, "steps", 1) != 0 or not grads or any(g is None or g.any() for g in grads):
            return False
        logger.info("kfac: step() on all-zero gradients before any training step (torch.distributed.checkpoint "
                    "initialising the optimizer state): only the base optimizer stepped")
        return True

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the base optimizer's gradients and drop statistics of a step that never reached ``step()``
        (e.g. one skipped by ``GradScaler``); statistics of a forward pass awaiting its backward are kept."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self.preconditioner.discard_stale_statistics()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not getattr(self, "_kfac_ready", False):  # called by Optimizer.__init__ on the base's groups
            return super().add_param_group(param_group)
        self.optimizer.add_param_group(param_group)
        warnings.warn("kfac: parameters added with add_param_group() after the K-FAC wrapper was built are not "
                      "preconditioned (build the wrapper after the model and its param groups are final)",
                      stacklevel=2)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus K-FAC's state under the key ``"kfac"`` and, for
        ``torch.distributed.checkpoint``, inside ``state`` and ``param_groups`` (:mod:`kfac.optim_state`). Never
        communicates: under a sharded plan K-FAC's part is this rank's shard (see :meth:`consolidated_state_dict`)."""
        state = self.optimizer.state_dict()
        state["kfac"] = self.preconditioner.state_dict()
        return self._with_keyed(state)

    def _with_keyed(self, state: dict[str, Any]) -> dict[str, Any]:
        keyed = getattr(self.preconditioner, "keyed_state_dict", None)
        if keyed is None:  # M-FAC: its windows are not in the DCP layout
            return state
        pieces, meta = keyed()
        per_param, extra = self._keyed_extras()
        return optim_state.embed(state, self.optimizer, self.preconditioner.parameters_of(), pieces, per_param,
                                 {**meta, **extra})

    def consolidated_state_dict(self) -> dict[str, Any]:
        """Like :meth:`state_dict`, with the complete K-FAC state (loadable at any world size) on every rank even
        under a sharded plan. A collective: call it on every rank, then save on one."""
        state = self.optimizer.state_dict()
        state["kfac"] = self.preconditioner.consolidated_state_dict()
        return self._with_keyed(state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load :meth:`state_dict` or :meth:`consolidated_state_dict` output, or a state dict in the DCP layout
        (``set_optimizer_state_dict`` after ``dcp.load``: a collective, any world size and plan)."""
        state = dict(state_dict)
        kfac_state = state.pop("kfac", None)
        state, per_param, meta = optim_state.split(state, self.optimizer)
        if kfac_state is None and meta is None:
            raise ValueError(f"state dict has no 'kfac' entry: it was not saved by kfac.{type(self).__name__}"
                             ".state_dict()")
        if kfac_state is not None:
            self.preconditioner.validate_state_dict(kfac_state)
            self.optimizer.load_state_dict(state)
            self.preconditioner.load_state_dict(kfac_state)
        else:
            assert meta is not None  # checked above
            self._load_keyed_extras(per_param, meta)
            pieces = optim_state.by_layer(per_param, self.optimizer, self.preconditioner.parameters_of())
            self.preconditioner.load_keyed_state_dict(pieces, meta)  # type: ignore[attr-defined]
            self.optimizer.load_state_dict(state)
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state

    def _keyed_extras(self) -> tuple[dict[int, dict[str, Tensor]], dict[str, Any]]:
        """Per-parameter tensors (by ``id``) and scalars a subclass adds to the DCP layout."""
        return {}, {}

    def _load_keyed_extras(self, per_param: dict[int, dict[str, Tensor]], meta: dict[str, Any]) -> None:
        """Restore :meth:`_keyed_extras` (before the rest: a mismatch raises before anything changes)."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(\n  optimizer={self.optimizer!r},\n  preconditioner={self.preconditioner!r}"
                "\n)")


def _no_lr(kwargs: dict[str, Any], cls: str) -> None:
    if "lr" in kwargs:
        raise TypeError(f"{cls} reads the learning rate from the base optimizer's param groups; do not pass lr=")


class KFAC(PreconditionedOptimizer):
    """K-FAC-preconditioned wrapper around ``optimizer``.

    Example::

        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        opt = kfac.KFAC(model, base, factor_update_steps=10, inv_update_steps=100, damping=1e-3)
        for x, y in loader:
            opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()

    All keyword arguments are those of :class:`kfac.KFACPreconditioner` (except ``lr``, which comes from the
    base optimizer's param groups), with two defaults chosen on the time-to-result suite (:data:`DEFAULTS`:
    ``damping=1e-2``, ``inv_update_steps=10``); every value passed means what it means in KAISA.

    ``adaptive=True`` (or a :class:`kfac.adaptive.controller.AdaptiveConfig`) turns on adaptive K-FAC: step size,
    momentum and damping from the exact quadratic model of each batch, no ``damping``/``kl_clip`` to tune. Then
    ``optimizer`` must be ``torch.optim.SGD(params, lr=1.0)`` without momentum (it applies the update and any
    weight decay), and each step is ``opt.step(closure)`` with a closure that runs the forward pass and returns the
    batch's mean loss without calling ``backward`` (see :mod:`kfac.adaptive.controller`)::

        opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=1.0), adaptive=True)
        for x, y in loader:
            opt.step(lambda: F.cross_entropy(model(x), y))
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 adaptive: bool | AdaptiveConfig = False, **kwargs: Any) -> None:
        _no_lr(kwargs, type(self).__name__)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.adaptive: AdaptiveController | None = None
        if adaptive:
            controller = _adaptive_controller(model, optimizer, adaptive, kwargs)
            kwargs.update(damping=controller.damping_at, kl_clip=None, relative_damping=True)
            for key, value in ADAPTIVE_DEFAULTS.items():
                kwargs.setdefault(key, value)
            self.adaptive = controller
        else:
            for key, value in DEFAULTS.items():
                kwargs.setdefault(key, value)
        try:
            self.kfac = KFACPreconditioner(model, lr=None, **kwargs)
            super().__init__(self.kfac, optimizer)
        except Exception:
            if self.adaptive is not None:
                self.adaptive.remove()  # no hooks outlive a failed construction
            raise

    def step(self, closure: Callable[[], Any] | Sequence[Callable[[], Any]] | None = None) -> Any:
        """Without ``adaptive``: the base optimizer's step on the preconditioned gradients. With it: ``closure``
        (or one closure per micro-batch when ``accumulation_steps > 1``) returns the batch's mean loss; K-FAC
        runs the backward passes (through ``grad_scaler`` if one was given) and applies the whole update.
        Returns the batch's mean loss (detached) in adaptive mode."""
        if closure is None and self._initialising_state():
            return self.optimizer.step()
        if self.adaptive is None:
            if closure is not None and not callable(closure):
                raise TypeError("several closures per step are for adaptive K-FAC with accumulation_steps > 1")
            return super().step(closure)
        return self._adaptive_step(closure)

    def _adaptive_step(self, closure: Callable[[], Any] | Sequence[Callable[[], Any]] | None) -> Tensor:
        controller, pre = self.adaptive, self.kfac
        assert controller is not None  # adaptive mode
        closures = _closures(closure, pre.accumulation_steps)
        lr = step_lr(self.param_groups)
        scaler = pre.grad_scaler if pre.grad_scaler is not None and pre.grad_scaler.is_enabled() else None
        params = list(controller.params.values())
        self.zero_grad()
        pre.discard_pending_statistics()  # the step's statistics come from the closure's forward passes alone
        randomness = RandomState(p.device for p in params)
        parts: list[Part] = []
        losses: list[Tensor] = []
        for c in closures:
            before = gradient_versions(params)
            with controller.recording() as forwards, torch.enable_grad():
                loss = c()
            if not (isinstance(loss, Tensor) and loss.dim() == 0 and loss.requires_grad):
                raise TypeError("adaptive K-FAC: the closure must return the batch's loss as a scalar tensor that "
                                "requires grad (and must not call backward)")
            if gradient_versions(params) != before:
                raise RuntimeError("adaptive K-FAC: the closure called backward(); K-FAC runs the backward pass "
                                   "itself (and the loss's second derivatives): remove loss.backward() from the "
                                   "closure and return the loss")
            if not forwards:
                raise RuntimeError("adaptive K-FAC: the closure must run the forward pass of the model K-FAC was "
                                   "built on (no forward pass was seen)")
            with pre.statistics_paused():  # ∇_z L and H u reach the hooks on the last layer's output
                parts.append(Part(forwards=forwards, loss=OutputLoss(loss, [z for f in forwards for z in f.outputs])))
            check_equal_parts([part.forwards for part in parts])
            if pre.fisher == "mc" and pre.capturing():
                generator = controller.sampling_generator(parts[-1].loss.outputs[0].device, pre.communicator.rank)
                factor = (scaler.get_scale() if scaler is not None else 1.0) / math.sqrt(len(closures))
                with pre.statistics_paused():
                    samples = parts[-1].loss.sample(controller.config.loss, generator, controller.class_dims)
                pre.sampled_backward(parts[-1].loss.outputs, [u * factor for u in samples])
            part = loss / len(closures)
            (scaler.scale(part) if scaler is not None else part).backward(retain_graph=True)
            losses.append(loss.detach())
        if scaler is not None:
            scaler.unscale_(self.optimizer)  # an overflow leaves non-finite gradients: the step is skipped
        weight_decay = {controller.names[id(p)]: float(group.get("weight_decay", 0.0))
                        for group in self.param_groups for p in group["params"]
                        if id(p) in controller.names and group.get("weight_decay", 0.0)}
        with torch.no_grad():
            for name, eta in weight_decay.items():  # ∇(f + η‖θ‖²/2): preconditioned with the loss's gradient
                p = controller.params[name]
                if p.grad is not None:
                    p.grad.add_(p, alpha=eta)
        g = controller.gradient()
        comm = pre.communicator
        device = next(iter(g.values())).device

        def reduce(tensors: list[Tensor]) -> list[Tensor]:
            if not comm.enabled:
                return tensors
            summed = comm.all_reduce_sum([t.to(device) for t in tensors], category="adaptive", exact=True)
            return [t.cpu() / comm.world_size for t in summed]

        def precondition() -> bool:
            others = [p.grad for group in self.param_groups for p in group["params"]
                      if p.grad is not None and id(p) not in self._param_to_layer]
            return pre.step(grads_finite=all_finite(others))

        saved: dict[str, Tensor] = {}

        def apply(update: dict[str, Tensor]) -> None:
            with torch.no_grad():
                for name, delta in update.items():
                    p = controller.params[name]
                    saved[name] = p.detach().clone()
                    p.add_(delta.to(p.dtype))

        def restore() -> None:
            with torch.no_grad():
                for name, value in saved.items():
                    controller.params[name].copy_(value)

        def evaluate() -> float:
            value = 0.0
            with torch.no_grad(), randomness.replay(), batch_statistics_only(controller.model):
                for c, part in zip(closures, parts):
                    with controller.recording() as forwards:
                        value += float(c()) / len(closures)
                    if not same_inputs(part.forwards, forwards):
                        restore()
                        raise RuntimeError("adaptive K-FAC calls the closure twice per step (the second time without "
                                           "gradients, to measure the loss after the update) and it must compute the "
                                           "same batch both times: draw the batch outside the closure (the update "
                                           "was undone)")
            return float(reduce([torch.tensor([value], dtype=torch.float64)])[0])

        mean = torch.stack(losses).mean()
        with pre.statistics_paused():
            controller.update(g=g, weight_decay=weight_decay, precondition=precondition, parts=parts,
                              loss=float(reduce([mean.double().reshape(1)])[0]), lr=lr, evaluate=evaluate,
                              apply=apply, restore=restore, reduce=reduce, space=_parameter_space(params, comm))
        if scaler is not None:
            scaler.update()
        return mean

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.adaptive is not None:
            state["kfac_adaptive"] = self.adaptive.state_dict()
        return state

    def consolidated_state_dict(self) -> dict[str, Any]:
        state = super().consolidated_state_dict()
        if self.adaptive is not None:
            state["kfac_adaptive"] = self.adaptive.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        adaptive = state.pop("kfac_adaptive", None)
        if "kfac" in state and (adaptive is None) != (self.adaptive is None):
            _adaptive_mismatch(adaptive is None)
        super().load_state_dict(state)
        if self.adaptive is not None and adaptive is not None:
            previous = adaptive.get("previous")
            names = rename_map(previous or (), self.adaptive.params)  # saved from a wrapped model, or the reverse
            if names:
                adaptive = {**adaptive, "previous": {names[n]: t for n, t in previous.items()}}
            self.adaptive.load_state_dict(adaptive, ((n, p.device) for n, p in self.adaptive.params.items()))

    def _keyed_extras(self) -> tuple[dict[int, dict[str, Tensor]], dict[str, Any]]:
        """Adaptive K-FAC: its last direction under each parameter (a placeholder and a presence flag before the
        first step), its scalars (Monte-Carlo label sampling restarts from its seed)."""
        a = self.adaptive
        if a is None:
            return {}, {}
        prev = a.previous or {}
        per_param = {id(p): {"adaptive.previous": prev[n] if n in prev else torch.zeros_like(p),
                             "adaptive.previous.present": torch.tensor(n in prev, dtype=torch.uint8)}
                     for n, p in a.params.items()}
        return per_param, {"adaptive": {"damping": a.damping, "steps": a.steps, "rejected": a.rejected,
                                        "undone": a.undone}}

    def _load_keyed_extras(self, per_param: dict[int, dict[str, Tensor]], meta: dict[str, Any]) -> None:
        if ("adaptive" in meta) != (self.adaptive is not None):
            _adaptive_mismatch("adaptive" not in meta)
        if self.adaptive is None:
            return
        previous = {n: per_param[id(p)]["adaptive.previous"] for n, p in self.adaptive.params.items()
                    if float(per_param.get(id(p), {}).get("adaptive.previous.present", 0)) > 0.5}
        self.adaptive.load_state_dict({**meta["adaptive"], "previous": previous or None, "generator": None},
                                      ((n, p.device) for n, p in self.adaptive.params.items()))


def _parameter_space(params: list[nn.Parameter], comm: Communicator) -> ParameterSpace | None:
    """Parameter-space products of the quadratic model from each rank's shards on an FSDP2 / HSDP model (the
    same answer on every rank); ``None``: whole tensors."""
    if not any(is_sharded(p) for p in params):
        return None
    size = shard_size(params)
    return ParameterSpace(gram=lambda vectors: sharded_gram(vectors, comm, size),
                          all_finite=lambda tensors: comm.all_true(all_finite(local_shard(t) for t in tensors)))


def _adaptive_mismatch(saved_without: bool) -> None:
    raise ValueError("this state was saved with" + ("out" if saved_without else "") + " adaptive K-FAC; build the "
                     "optimizer the same way to load it")


DEFAULTS: dict[str, Any] = {"damping": 1e-2, "inv_update_steps": 10}
"""``kfac.KFAC``'s defaults where they differ from :class:`kfac.KFACPreconditioner`'s (KAISA's, kept there for
migration parity). On the time-to-result suite's tuning seed, at each setting's best lr, KAISA's damping 1e-3 with
a refresh every step ended at 0.325 on the autoencoder (AdamW 0.284) and 96.7% on the classifier (SGD 97.8%), its
``kl_clip`` turning the lr into a trust-region radius; damping 1e-2 with a refresh every 10 steps ended at 0.273 and
97.8% at a tenth of the refresh cost. A damping is absolute (it scales with ``1 / batch²``); ``adaptive=True`` needs
none."""

ADAPTIVE_DEFAULTS: dict[str, Any] = {"fisher": "mc", "factor_decay": 0.7, "inv_update_steps": 3,
                                     "units": "curvature", "factor_init": "zero"}
"""Adaptive K-FAC's preconditioner defaults: the Monte-Carlo Fisher (the curvature the quadratic model uses; it
reached the autoencoder's target in ~0.8x the steps of the empirical Fisher) and fresh factors (decay 0.7,
eigenbases every 3 steps: chosen on the time-to-result suite's tuning seeds, where decay 0.95 with a refresh every
10 steps needed more than twice the steps; the quadratic model keeps the steps safe)."""


def _adaptive_controller(model: nn.Module, optimizer: torch.optim.Optimizer, adaptive: bool | AdaptiveConfig,
                         kwargs: dict[str, Any]) -> AdaptiveController:
    """Validate an adaptive set-up (clear errors) and build its controller."""
    config = adaptive if isinstance(adaptive, AdaptiveConfig) else AdaptiveConfig()
    if type(optimizer) is not torch.optim.SGD or any(g.get("momentum", 0) or g.get("nesterov") for g in
                                                      optimizer.param_groups):
        raise ValueError("adaptive K-FAC computes the whole update (momentum included): use "
                         "torch.optim.SGD(params, lr=1.0) without momentum as the base optimizer")
    step_lr(optimizer.param_groups)  # one lr, no maximize (clear errors)
    if kwargs.get("units", "curvature") != "curvature":
        raise ValueError("adaptive K-FAC scales every layer's direction by one step size, which needs every block in "
                         "the curvature's units: units='curvature' (the default in adaptive mode)")
    fixed = sorted(k for k in ("damping", "kl_clip", "relative_damping") if k in kwargs)
    if fixed:
        raise ValueError(f"adaptive K-FAC sets {fixed} itself (Levenberg-Marquardt damping, relative factor "
                         "damping AdaptiveConfig.factor_damping, no kl_clip)")
    if kwargs.get("method", "eigen") == "inverse":
        raise ValueError("adaptive K-FAC needs method='eigen' or 'ekfac' (the inverse method fixes the damping at "
                         "refresh time, the adaptive damping changes every few steps)")
    stepped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    params = {n: p for n, p in inner.named_parameters() if id(p) in stepped}
    return AdaptiveController(model=model, config=config, params=params)


def _closures(closure: Any, accumulation_steps: int) -> list[Callable[[], Any]]:
    """The adaptive step's closures: one per micro-batch (clear errors otherwise)."""
    if closure is None:
        raise RuntimeError("adaptive K-FAC needs opt.step(closure): a closure that runs the forward pass and "
                           "returns the batch's mean loss (without calling backward)")
    closures = [closure] if callable(closure) else list(closure)
    if len(closures) != accumulation_steps or not all(callable(c) for c in closures):
        raise ValueError(f"adaptive K-FAC with accumulation_steps={accumulation_steps} takes {accumulation_steps} "
                         f"closure(s) per step, one per micro-batch of equal size (got {len(closures)})")
    return closures


class EKFAC(KFAC):
    """EK-FAC (George et al., 2018): K-FAC's eigenbases with eigenvalues re-estimated from per-example gradients.

    ``kfac.KFAC(model, optimizer, method="ekfac", inv_update_steps=10, **kwargs)``: the eigenbases are refreshed
    every ``inv_update_steps`` (default 10 here) and the eigenvalues corrected every ``correction_update_steps``
    (default ``factor_update_steps``) in between. See :mod:`kfac.kronecker.methods.ekfac` for the math and
    :class:`kfac.KFACPreconditioner` for the options.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, **kwargs: Any) -> None:
        kwargs.setdefault("inv_update_steps", 10)
        if kwargs.setdefault("method", "ekfac") != "ekfac":
            raise ValueError(f"EKFAC uses method='ekfac', got method={kwargs['method']!r}")
        super().__init__(model, optimizer, **kwargs)


class MFAC(PreconditionedOptimizer):
    """M-FAC-preconditioned wrapper around ``optimizer`` (Frantar et al., NeurIPS 2021): each step adds the gradient
    to a window of the last ``num_grads`` gradients and replaces it by ``(λ I + (1/k) Σ g_i g_i^T)^{-1} g``.

    Example::

        opt = kfac.MFAC(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), num_grads=32,
                        damping=1e-4, kl_clip=1e-3)

    ``model_or_params``: an ``nn.Module`` or an iterable of parameters / param groups. All keyword arguments are
    those of :class:`kfac.MFACPreconditioner` (except ``lr``, which comes from the base optimizer's param groups).
    """

    def __init__(self, model_or_params: Any, optimizer: torch.optim.Optimizer, **kwargs: Any) -> None:
        from .mfac.mfac_preconditioner import MFACPreconditioner

        _no_lr(kwargs, type(self).__name__)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        super().__init__(MFACPreconditioner(model_or_params, lr=None, **kwargs), optimizer)
