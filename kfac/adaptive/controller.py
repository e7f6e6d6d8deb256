"""Adaptive K-FAC (Martens & Grosse, ICML 2015, sections 6-7): step size, momentum and damping from the exact
local quadratic model of the current batch.

Each step, with the gradient ``g``, the K-FAC direction ``Δ = -(F̂ + γ I)^{-1} g`` (the preconditioner at
damping ``γ``, no ``kl_clip``) and the previous update ``δ₀``, the update is ``δ = α Δ + μ δ₀`` with ``(α, μ)``
minimising ``M(δ) = g^T δ + ½ δ^T (C + λ I) δ`` (``C`` the exact GGN/Fisher of the batch; ``α`` alone on the first
step, see :mod:`kfac.adaptive.quadratic`). Every ``adapt_every`` steps the loss after the update is compared with the
model's prediction, ``ρ = (f(θ + δ) - f(θ)) / M(δ)``, and ``λ`` follows the Levenberg-Marquardt rule with
``ω = (19/20)^adapt_every``. A non-finite update is never applied: the step is skipped and ``λ`` grows.

The factors' damping ``γ`` is relative (``relative_damping=True``): each layer adds ``γ`` times its mean
curvature eigenvalue, so one value fits every layer, batch size and loss normalisation (KAISA's factors carry
``1/N²``, an absolute damping would not). Martens & Grosse also adapt ``γ`` (a greedy search); on the time-to-result
suite a fixed relative ``γ = 1e-2`` did as well or better than the search and than ``γ`` tied to ``λ`` (which let
``γ`` collapse and diverged with fresh factors), so ``γ`` is fixed and only ``λ`` adapts. The factors' ``G`` come
from labels sampled from the model (``fisher="mc"``, the Fisher ``C`` is), drawn from the controller's own seeded
generator so that resuming is exact. A step after which the batch's loss rose (``ρ < 0``, measured every
``adapt_every`` steps) is undone, the momentum direction dropped and ``λ`` raised.

Contract (``torch.optim`` style): ``opt.step(closure)`` where ``closure()`` runs the forward pass of the model K-FAC
was built on and returns the mean loss of the batch, *without* calling ``backward`` (K-FAC does, and calls the
closure again without gradients to measure ``ρ``). The base optimizer must be ``torch.optim.SGD`` without momentum
(momentum comes from the model): K-FAC writes ``-δ / lr`` into ``.grad``, so SGD applies ``δ`` (and its weight
decay, if any).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._tensor import all_finite
from .losses import LOSSES
from .quadratic import Direction, levenberg_marquardt, output_jvps, quadratic_model

__all__ = ["AdaptiveConfig", "AdaptiveController", "Inputs"]

Inputs = tuple[tuple[Any, ...], dict[str, Any]]
"""The positional and keyword arguments of one forward pass of the model."""


@dataclass(frozen=True)
class AdaptiveConfig:
    """Settings of adaptive K-FAC (the defaults need no tuning).

    Attributes:
        loss: the loss the closure computes from the model's outputs: ``"cross_entropy"``, ``"mse"`` or
            ``"bernoulli"`` (see :mod:`kfac.adaptive.losses`).
        initial_damping: the starting ``λ`` of the quadratic model (adapted by Levenberg-Marquardt).
        factor_damping: ``γ``, the relative damping of the K-FAC direction (in units of each layer's mean
            eigenvalue; 1e-3 ... 1e-2 did equally well on the time-to-result suite, 1e-4 diverged on one seed).
        adapt_every: steps between Levenberg-Marquardt updates of ``λ`` (``T₁`` of the paper).
        momentum: use the previous update as the second direction (``μ``); ``False``: ``α`` alone.
        min_damping, max_damping: bounds of ``λ``.
        seed: seeds the labels sampled for the Monte-Carlo Fisher (``fisher="mc"``, the default in adaptive mode;
            rank ``r`` of a distributed run uses ``seed + r``); the generator's state is checkpointed.
    """

    loss: str = "cross_entropy"
    initial_damping: float = 1e-3
    factor_damping: float = 1e-2
    adapt_every: int = 5
    momentum: bool = True
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
        if not 0 < self.min_damping <= self.initial_damping <= self.max_damping:
            raise ValueError("damping bounds must satisfy 0 < min_damping <= initial_damping <= max_damping, got "
                             f"{self.min_damping}, {self.initial_damping}, {self.max_damping}")

    @property
    def omega(self) -> float:
        """``ω₁ = (19/20)^T₁``, the factor of ``λ``'s Levenberg-Marquardt rule."""
        return (19 / 20) ** self.adapt_every


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
        self.outputs: Tensor | None = None              # the outputs of the closure's forward pass
        self.generator: torch.Generator | None = None   # labels of the Monte-Carlo Fisher (created on first use)
        self._generator_state: Tensor | None = None     # loaded before the generator exists
        self.inputs: Inputs | None = None  # of the closure's last forward pass
        self._handles = [self.model.register_forward_pre_hook(self._capture, with_kwargs=True),
                         self.model.register_forward_hook(self._capture_outputs)]

    def _capture(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if torch.is_grad_enabled():
            self.inputs = (args, dict(kwargs))

    def _capture_outputs(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.is_grad_enabled() and isinstance(output, Tensor):
            self.outputs = output

    def sampling_generator(self, device: torch.device, rank: int) -> torch.Generator:
        """The generator of the Monte-Carlo Fisher's labels on ``device`` (seeded ``seed + rank``)."""
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

    def update(self, g: dict[str, Tensor], precondition: Callable[[], bool], batches: Sequence[Inputs],
               loss: Tensor | float, evaluate: Callable[[], float], apply: Callable[[dict[str, Tensor]], None],
               undo: Callable[[dict[str, Tensor]], None], reduce: Callable[[list[Tensor]], list[Tensor]]) -> bool:
        """One adaptive step: ``precondition()`` turns ``.grad`` into ``(F̂ + γ I)^{-1} g`` (``False``: skipped),
        ``batches`` are the model's inputs of each micro-batch (equal sizes: the batch's curvature is their mean),
        ``apply(δ)`` applies the update (``undo(δ)`` takes it back), ``evaluate()`` gives the loss at the new
        parameters, ``reduce`` averages the model's scalars over ranks. Returns whether an update was kept."""
        if not precondition():
            return False
        config = self.config
        delta = self.read()
        self.direction = delta  # Δ of this step (for inspection)
        directions: list[Direction] = [delta]
        if config.momentum and self.previous is not None:
            directions.append(self.previous)
        models = [quadratic_model(config.loss, *output_jvps(self.model, args, directions, kwargs), directions, g)
                  for args, kwargs in batches]
        model = models[0]
        if len(models) > 1:
            model.curvature = torch.stack([m.curvature for m in models]).mean(0)
        model.curvature, model.linear = reduce([model.curvature, model.linear])
        coefficients = model.solve(self.damping)
        predicted = float(model.value(coefficients, self.damping))
        step = {n: sum((float(c) * d[n] for c, d in zip(coefficients, directions) if n in d),
                       torch.zeros_like(v)) for n, v in delta.items()}
        if not (math.isfinite(predicted) and all_finite(step.values())):
            return self._reject()
        apply(step)
        self.previous = step
        self.steps += 1
        rho = float("nan")
        if self.steps % config.adapt_every == 0:
            rho = (evaluate() - float(loss)) / predicted if predicted < 0 else float("nan")
            self.damping = levenberg_marquardt(self.damping, rho, omega=config.omega,
                                               min_damping=config.min_damping, max_damping=config.max_damping)
            if not rho >= 0:  # the batch's loss rose (or the model predicted no decrease): take the step back
                undo(step)
                self.previous = None
                self.undone += 1
        self.last = {"alpha": float(coefficients[0]), "mu": float(coefficients[1]) if len(coefficients) > 1 else 0.0,
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
