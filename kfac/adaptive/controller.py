"""Adaptive K-FAC (Martens & Grosse, ICML 2015, sections 6-7): step size, momentum and damping from the exact
local quadratic model of the current batch.

Each step, with the gradient ``g`` (including the base optimizer's weight decay ``η θ``), the K-FAC direction
``Δ = -(F̂ + γ I)^{-1} g`` (the preconditioner at damping ``γ``, no ``kl_clip``, factors in curvature units so
every layer's direction is its own damped natural gradient on one scale) and the previous update ``δ₀``, the update
is ``δ = α Δ + μ δ₀`` with ``(α, μ)`` minimising ``M(δ) = g^T δ + ½ δ^T (C + (λ + η) I) δ`` (``C`` the exact GGN of
the closure's own loss, see :mod:`kfac.adaptive.output_loss`; ``α`` alone on the first step, see
:mod:`kfac.adaptive.quadratic`). The base optimizer's ``lr`` multiplies the chosen update (``1.0``: the model's
step; a scheduler or warm-up scales it; ``0``: no update). After every update the closure's loss is measured again
and compared with the model's prediction, ``ρ = (f(θ + δ) - f(θ)) / M(δ)``; a step after which the loss rose
by more than the model predicted it to fall (``ρ < -1``; a smaller rise near a plateau is float noise as often as
not, and the Levenberg-Marquardt rule answers it) is undone exactly (the parameters are restored bit for bit), the
momentum direction dropped and ``λ`` multiplied by ``undo_factor``. Otherwise, every ``adapt_every`` steps ``λ`` follows the Levenberg-Marquardt rule with ``ω = (19/20)^adapt_every``. A non-finite
update is never applied: the step is skipped and ``λ`` grows.

The factors' damping ``γ`` is relative (``relative_damping=True``): each layer adds ``γ`` times its mean
curvature eigenvalue, so one value fits every layer, batch size and loss normalisation. Martens & Grosse also
adapt ``γ`` (a greedy search); on the time-to-result suite a fixed relative ``γ = 1e-2`` did as well or better
than the search and than ``γ`` tied to ``λ`` (which let ``γ`` collapse and diverged with fresh factors), so ``γ``
is fixed and only ``λ`` adapts. The factors' ``G`` come from Monte-Carlo samples of the loss's output Hessian
(``fisher="mc"``), drawn from the controller's own seeded generator so that resuming is exact.

Contract (``torch.optim.LBFGS`` style): ``opt.step(closure)`` where ``closure()`` runs the forward pass of the
model K-FAC was built on (once or more) and returns the batch's loss, *without* calling ``backward`` (K-FAC does;
a closure that does is a clear error). The closure is called **twice** per step: once with gradients, once without
after the update to measure ``ρ``; the second call runs with the random state of the first (the same dropout
masks) and batch-norm layers keep their running statistics, and it must see the same inputs (a closure that draws
a new batch on each call is a clear error, and the update is undone). The base optimizer must be
``torch.optim.SGD`` without momentum or ``maximize``, all param groups at one ``lr``; K-FAC applies the update
itself.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .losses import LOSSES
from .output_loss import OutputLoss
from .quadratic import Direction, ParameterSpace, levenberg_marquardt, model_outputs, output_jvps, quadratic_model

__all__ = ["AdaptiveConfig", "AdaptiveController", "Forward", "Inputs"]

Inputs = tuple[tuple[Any, ...], dict[str, Any]]
"""The positional and keyword arguments of one forward pass of the model."""


@dataclass(frozen=True)
class AdaptiveConfig:
    """Settings of adaptive K-FAC (the defaults need no tuning).

    Attributes:
        loss: the structure of the closure's loss in the model's outputs, for the Monte-Carlo samples of its
            output Hessian (``fisher="mc"``): ``"cross_entropy"`` (softmax blocks along the class dimension: any
            cross-entropy, with weights, smoothing, ignored rows, over ``(N, C)``, ``(N, T, C)`` or
            ``(N, C, H, W)`` logits), ``"mse"`` or ``"bernoulli"`` (a diagonal output Hessian). The quadratic
            model uses the exact GGN of whatever loss the closure computes (see
            :mod:`kfac.adaptive.output_loss`).
        initial_damping: the starting ``λ`` of the quadratic model (adapted by Levenberg-Marquardt).
        factor_damping: ``γ``, the relative damping of the K-FAC direction (in units of each layer's mean
            eigenvalue; 1e-3 ... 1e-2 did equally well on the time-to-result suite, 1e-4 diverged on one seed).
        adapt_every: steps between Levenberg-Marquardt updates of ``λ`` (``T₁`` of the paper); ``ρ`` and the
            undo of a step that raised the loss act on every step.
        momentum: use the previous update as the second direction (``μ``); ``False``: ``α`` alone.
        gradient_direction: add ``-g`` as a third direction of the quadratic model (one more JVP), so a K-FAC
            direction spoiled by one badly estimated block (zero-initialised factors, a plateau) cannot stall
            the run.
        undo_factor: ``λ`` is multiplied by it when a step is undone (a trust region that shrinks at once, rather
            than by ``1/ω`` per step, so a run that starts with too small a ``λ`` loses a few steps, not dozens).
        min_damping, max_damping: bounds of ``λ``.
        seed: seeds the Monte-Carlo samples (rank ``r`` of a distributed run uses ``seed + r``); the generator's
            state is checkpointed.
    """

    loss: str = "cross_entropy"
    initial_damping: float = 1e-3
    factor_damping: float = 1e-2
    adapt_every: int = 1
    momentum: bool = True
    undo_factor: float = 4.0
    gradient_direction: bool = True
    min_damping: float = 1e-8
    max_damping: float = 1e4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"adaptive loss must be one of {sorted(LOSSES)}, got {self.loss!r}")
        if not (isinstance(self.adapt_every, int) and not isinstance(self.adapt_every, bool) and self.adapt_every >= 1):
            raise ValueError(f"adapt_every must be a positive integer, got {self.adapt_every!r}")
        if not (isinstance(self.factor_damping, (int, float)) and 0 < self.factor_damping < math.inf):
            raise ValueError(f"factor_damping must be a positive number, got {self.factor_damping!r}")
        if not (isinstance(self.undo_factor, (int, float)) and 1 <= self.undo_factor < math.inf):
            raise ValueError(f"undo_factor must be a number >= 1, got {self.undo_factor!r}")
        if not 0 < self.min_damping <= self.initial_damping <= self.max_damping:
            raise ValueError("damping bounds must satisfy 0 < min_damping <= initial_damping <= max_damping, got "
                             f"{self.min_damping}, {self.initial_damping}, {self.max_damping}")

    @property
    def omega(self) -> float:
        """``ω₁ = (19/20)^T₁``, the factor of ``λ``'s Levenberg-Marquardt rule."""
        return (19 / 20) ** self.adapt_every


@dataclass
class Forward:
    """One forward pass of the model inside the closure: its inputs and the output tensors."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: list[Tensor] = field(default_factory=list)


@dataclass
class Part:
    """One closure call (micro-batch): its forward passes and its loss as a function of their outputs."""

    forwards: list[Forward]
    loss: OutputLoss


class AdaptiveController:
    """Runs the adaptive step of a :class:`kfac.KFAC` wrapper (see the module docstring)."""

    def __init__(self, *, model: nn.Module, config: AdaptiveConfig, params: dict[str, nn.Parameter]) -> None:
        self.config = config
        self.model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self.params = params
        self.names = {id(p): n for n, p in params.items()}
        self.damping = config.initial_damping  # λ
        self.undone = 0                         # steps undone because the batch's loss rose
        self.steps = 0
        self.rejected = 0
        self.previous: dict[str, Tensor] | None = None  # δ₀
        self.direction: dict[str, Tensor] | None = None  # Δ of the last step
        self.last: dict[str, float] = {}                # α, μ, ρ, predicted change of the last step
        self.generator: torch.Generator | None = None   # Monte-Carlo samples (created on first use)
        self._generator_state: Tensor | None = None     # loaded before the generator exists
        self.forwards: list[Forward] = []               # of the closure call being recorded
        self.class_dims: dict[int, int] = {}            # cross-entropy class dimension of each output
        self._recording = False
        self._pending: Inputs | None = None
        self._handles = [self.model.register_forward_pre_hook(self._capture_inputs, with_kwargs=True),
                         self.model.register_forward_hook(self._capture_outputs)]

    def _capture_inputs(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._recording:
            self._pending = (args, dict(kwargs))

    def _capture_outputs(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._recording and self._pending is not None:
            outputs = model_outputs(output) if torch.is_grad_enabled() else []
            self.forwards.append(Forward(*self._pending, outputs=outputs))
            self._pending = None

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[Forward]]:
        """Record the model's forward passes (inputs, outputs) while the block runs."""
        self.forwards, self._pending, self._recording = [], None, True
        try:
            yield self.forwards
        finally:
            self._recording, self._pending = False, None

    def sampling_generator(self, device: torch.device, rank: int) -> torch.Generator:
        """The generator of the Monte-Carlo samples on ``device`` (seeded ``seed + rank``)."""
        if self.generator is None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.config.seed + rank)
            if self._generator_state is not None:
                self.generator.set_state(self._generator_state)
        return self.generator

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def damping_at(self, step: int) -> float:
        """The preconditioner's (relative) damping schedule: ``γ``."""
        return self.config.factor_damping

    def gradient(self) -> dict[str, Tensor]:
        return {n: p.grad.detach().clone() for n, p in self.params.items() if p.grad is not None}

    def read(self) -> dict[str, Tensor]:
        """``-.grad`` of the trained parameters: the K-FAC direction ``Δ`` after preconditioning."""
        return {n: -p.grad.detach().clone() for n, p in self.params.items() if p.grad is not None}

    def update(self, *, g: dict[str, Tensor], weight_decay: dict[str, float], precondition: Callable[[], bool],
               parts: Sequence[Part], loss: float, lr: float, evaluate: Callable[[], float],
               apply: Callable[[dict[str, Tensor]], None], restore: Callable[[], None],
               reduce: Callable[[list[Tensor]], list[Tensor]], space: ParameterSpace | None = None) -> bool:
        """One adaptive step: ``precondition()`` turns ``.grad`` into ``(F̂ + γ I)^{-1} g`` (``False``: skipped),
        ``parts`` are the closure calls of the step (equal micro-batches: the batch's curvature is their mean),
        ``apply(δ)`` applies an update (``restore()`` takes it back exactly), ``evaluate()`` gives the loss at the
        new parameters, ``reduce`` averages the model's scalars over ranks, ``space`` forms parameter-space products
        (sharded parameters: :class:`kfac.adaptive.quadratic.ParameterSpace`). Returns whether an update was kept."""
        space = space or ParameterSpace()
        if not precondition():
            return False
        config = self.config
        delta = self.read()
        self.direction = delta  # Δ of this step (for inspection)
        directions: list[Direction] = [delta]
        if config.momentum and self.previous is not None:
            directions.append(self.previous)
        if config.gradient_direction:  # the steepest-descent direction beside Δ (a poorly estimated block of the
            directions.append({n: -v for n, v in g.items()})  # factors can make Δ useless; the model then uses -g)
        models = []
        for part in parts:
            outputs: list[Tensor] = []
            products: list[list[Tensor]] = [[] for _ in directions]
            for f in part.forwards:
                z, jv = output_jvps(self.model, f.args, directions, f.kwargs)
                outputs += z
                for i, p in enumerate(jv):
                    products[i] += p
            models.append(quadratic_model(part.loss.hvp, outputs, products, directions, g, weight_decay,
                                          space=space))
        model = models[0]
        if len(models) > 1:
            model.curvature = torch.stack([m.curvature for m in models]).mean(0)
        model.curvature, model.linear = reduce([model.curvature, model.linear])
        coefficients = model.solve(self.damping)
        predicted = float(model.value(coefficients * lr, self.damping))  # the change of the applied update
        step = {n: sum((float(c) * lr * d[n] for c, d in zip(coefficients, directions) if n in d),
                       torch.zeros_like(v)) for n, v in delta.items()}
        if not (math.isfinite(predicted) and space.all_finite(step.values())):
            return self._reject()
        rho = float("nan")
        if lr > 0:
            apply(step)
            self.previous = step
            self.steps += 1
            if predicted < 0:
                rho = (evaluate() - loss) / predicted
            if not rho >= -1:  # the loss rose by more than the model promised to lower it: take it back, bit for bit
                restore()
                self.previous = None
                self.undone += 1
                self.damping = min(self.damping * config.undo_factor, config.max_damping)
            elif self.steps % config.adapt_every == 0:
                self.damping = levenberg_marquardt(self.damping, rho, omega=config.omega,
                                                   min_damping=config.min_damping, max_damping=config.max_damping)
        momentum = len(directions) - int(config.gradient_direction) == 2  # [Δ, δ₀, (-g)]
        self.last = {"alpha": float(coefficients[0]), "mu": float(coefficients[1]) if momentum else 0.0,
                     "beta": float(coefficients[-1]) if config.gradient_direction else 0.0,
                     "rho": rho, "predicted": predicted}
        return True

    def _reject(self) -> bool:
        """A non-finite model or update: nothing is applied and ``λ`` grows."""
        self.rejected += 1
        self.damping = levenberg_marquardt(self.damping, float("nan"), omega=self.config.omega,
                                           min_damping=self.config.min_damping, max_damping=self.config.max_damping)
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"damping": self.damping, "steps": self.steps, "rejected": self.rejected, "undone": self.undone,
                "previous": None if self.previous is None else {n: t.clone() for n, t in self.previous.items()},
                "generator": self.generator.get_state() if self.generator is not None else self._generator_state}

    def load_state_dict(self, state: dict[str, Any], devices: Iterable[tuple[str, torch.device]]) -> None:
        self.damping = float(state["damping"])
        self.undone = int(state.get("undone", 0))
        self._generator_state = state.get("generator")
        if self.generator is not None and self._generator_state is not None:
            self.generator.set_state(self._generator_state)
        self.steps = int(state["steps"])
        self.rejected = int(state.get("rejected", 0))
        where = dict(devices)
        previous = state.get("previous")
        self.previous = None if previous is None else {n: t.to(where[n]) for n, t in previous.items()}
