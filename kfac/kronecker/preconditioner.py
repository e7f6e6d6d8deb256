"""K-FAC gradient preconditioner: orchestrates statistics hooks, the curvature engine and the schedule.

Schedule (KAISA / kfac-pytorch 0.4.2 conventions): steps count from 0; factors are updated when
``step % factor_update_steps == 0`` and decompositions refreshed when ``step % inv_update_steps == 0``.
At a factor update ``F <- decay * F + (1 - decay) * F_batch`` (running factor initialised to the identity),
where ``F_batch`` averages over every forward/backward pass since the previous step, so ``k`` accumulated
micro-batches give exactly the factors of their concatenation. The preconditioned gradients of all layers
are scaled by ``nu = min(1, sqrt(kl_clip / |sum_layers lr^2 <P(g), g>|))``.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._tensor import all_finite, copy_all
from ..curvature import as_named_blocks, flatten_blocks
from ..distributed.comm import Communicating
from ..distributed.config import DistributedConfig
from ..distributed.executor import Executor
from ..hparams import Hyper, block_lrs, check_positive, check_step_count, schedule_token
from ..modules import ModuleAdapter
from ..planner import Plan
from ..tracking import track_layers, warn_skipped
from . import corrections, guards
from .engine import CurvatureEngine, Staged
from .hooks import LayerState, StatisticsHooks, first_input
from .methods import WarmStart, make_method
from .schedule import SCHEDULED, KFACHyperparameters
from .state import StateMixin
from .sampled import SampledStatisticsMixin
from .store import FactorStore

__all__ = ["KFACPreconditioner"]

logger = logging.getLogger("kfac")


class KFACPreconditioner(Communicating, StateMixin, SampledStatisticsMixin):
    """Kronecker-factored preconditioner for the supported layers of ``model``.

    Usage (own training loop, KAISA style)::

        pre = kfac.KFACPreconditioner(model, lr=lambda step: scheduler.get_last_lr()[0])
        loss.backward(); pre.step(); optimizer.step()

    Args (keyword-only; every hyperparameter is a constant or a callable ``step -> value``):
        factor_update_steps: steps between factor updates.
        inv_update_steps: steps between decomposition refreshes.
        damping: Tikhonov damping added to the Kronecker eigenvalue products (eigen) or to each factor (inverse).
        relative_damping: the damping is in units of each layer's mean eigenvalue ``tr(A) tr(G) / (a_dim g_dim)``
            (eigen and EK-FAC): one value means the same for every layer, batch size and loss normalisation
            (the absolute damping of KAISA's conventions scales with ``1 / batch²``). Default ``False`` (KAISA).
        warm_start: refresh eigenbases from the previous ones -- kept when their first-order error in the damped
            inverse is within tolerance, else one Jacobi-like correction, else ``eigh`` (``True``, or a
            :class:`kfac.WarmStart`; eigen and EK-FAC; :mod:`kfac.kronecker.methods.warm`). Default ``False``: ``eigh``.
        truncate: ``ε`` of the truncated eigenbasis (eigen): ``A``-eigendirections within ``ε λ / max(dG)`` of the
            median eigenvalue share it exactly, an error of at most ``ε / λ`` in the damped inverse, for ``2 g a k``
            instead of ``2 g a²`` flops (``k`` other columns; used when ``k <= a / 2``; see
            :mod:`kfac.kronecker.methods.eigen`). Default ``None`` (exact).
        factor_decay: running-average decay ``a`` in ``F <- a F + (1 - a) F_batch``.
        factor_init: ``"identity"`` (KAISA: running factors start at ``I``) or ``"zero"`` (bias-corrected from
            zero: no identity swamps small curvature; :meth:`kfac.kronecker.engine.CurvatureEngine.absorb`).
        units: ``"kaisa"`` (KAISA's per-row means; convolutions divide rows by their positions) or
            ``"curvature"``: every block's ``A ⊗ G`` approximates the block of the back-propagated loss's curvature
            (``A`` the mean, ``G`` the *sum* of row outer products), one scale for every layer type (see
            :mod:`kfac.modules.base`).
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
        distributed: a :class:`kfac.distributed.config.DistributedConfig`; its fields may also be passed as
            keywords (``strategy=``, ``comm_dtype=``, ...), which override it.
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
        relative_damping: bool = False,
        warm_start: WarmStart | bool = False,
        truncate: float | None = None,
        factor_decay: Hyper = 0.95,
        factor_init: str = "identity",
        units: str = "kaisa",
        kl_clip: Hyper | None = 1e-3,
        lr: Hyper | None = 0.1,
        method: str = "eigen",
        fisher: str = "empirical",
        skip_layers: Iterable[str] | str = (),
        accumulation_steps: int = 1,
        grad_scaler: Any | None = None,
        factor_dtype: torch.dtype = torch.float32,
        correction_update_steps: Hyper | None = None,
        correction_decay: Hyper | None = None,
        distributed: DistributedConfig | None = None,
        hooks: bool = True,
        **distributed_options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        for option, value, allowed in (("fisher", fisher, ("empirical", "mc")), ("units", units, ("kaisa", "curvature")),
                                       ("factor_init", factor_init, ("identity", "zero"))):
            if value not in allowed:
                raise ValueError(f"{option} must be one of {allowed}, got {value!r}")
        self.factor_init, self.units = factor_init, units
        if factor_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"factor_dtype must be torch.float32 or torch.float64, got {factor_dtype} (half precision "
                             "factors lose the small eigenvalues that set the step; autocast the model instead)")
        unknown = sorted(set(distributed_options) - {f.name for f in dataclasses.fields(DistributedConfig)})
        if unknown:
            raise TypeError(f"KFACPreconditioner got unexpected keyword arguments {unknown}")
        config = dataclasses.replace(distributed or DistributedConfig(), **distributed_options)
        self.config = config
        self.method = make_method(method, relative_damping=relative_damping, warm_start=warm_start,
                                  truncate=truncate)
        self.hparams = KFACHyperparameters(
            factor_update_steps=factor_update_steps, inv_update_steps=inv_update_steps, damping=damping,
            factor_decay=factor_decay, kl_clip=kl_clip, lr=lr, correction_update_steps=correction_update_steps,
            correction_decay=correction_decay)
        self.fisher = fisher
        self.accumulation_steps = check_step_count(accumulation_steps, name="accumulation_steps")
        self.grad_scaler = grad_scaler
        self.factor_dtype = factor_dtype

        self.store = FactorStore()
        self.steps = 0
        self.skipped_steps = 0
        self.discarded_statistics = 0
        self.skipped: list[tuple[str, str]] = []
        self.not_executed: list[str] = []  # layers dropped by a checkpoint of an older version (state compat)
        self.fallbacks: dict[str, int] = {}  # steps each layer used its plain gradient (non-finite update)
        self._health = guards.StatisticsHealth()
        self._layers: list[LayerState] = []
        self._by_name: dict[str, LayerState] = {}
        self._model = weakref.ref(model)
        self._modules_at_start: weakref.WeakSet[nn.Module] = weakref.WeakSet(model.modules())
        self._seen: set[str] = set()  # layers with statistics on some rank (from globally reduced counts)
        self._reported_unused = False
        self._checked_execution = False
        self._written: tuple[tuple[Any, int], ...] = ()  # (weakref, version) of the .grad tensors step() last wrote
        self._warned_fallback: set[str] = set()
        self._warned_shard = False
        self._known_names: set[str] = set()  # modules added after construction that were already reported
        self._capture_step: int | None = None
        self._capture_flag = False
        self._correct_flag = False
        self._refreshed_damping: float | None = None
        self._register(model, skip_layers, hooks)
        if not self._layers:
            reasons = "; ".join(f"{n or '<root>'}: {r}" for n, r in self.skipped) or "the model has no parameters"
            raise ValueError(f"K-FAC found no supported layers to precondition ({reasons})")
        self._hooks = StatisticsHooks(layers=self._layers, factor_dtype=factor_dtype, fisher=fisher,
                                      accumulation_steps=self.accumulation_steps, grad_scaler=grad_scaler,
                                      schedule=self, method=self.method,
                                      mark_final=lambda name: self._exec.mark_final(name))
        self._hooked = hooks
        options = {**self.hparams.comparable(), "fisher": fisher, "accumulation_steps": self.accumulation_steps,
                   "factor_dtype": str(factor_dtype), "method": method, "relative_damping": relative_damping,
                   "warm_start": repr(warm_start), "truncate": truncate, "factor_init": factor_init, "units": units}
        self.engine = CurvatureEngine.create(
            store=self.store, method=self.method, factor_dtype=factor_dtype, config=config, options=options,
            devices={layer.name: layer.adapter.weight.device for layer in self._layers},
            intervals={k: self.hparams.constant_interval(k) for k in ("factor_update_steps", "inv_update_steps")},
            stats=lambda name: self._by_name[name].pending(), params=self.parameters_of())
        self._comm, self._exec = self.engine.comm, self.engine.executor
        if self.method.corrects and self.world_size > 1 and self.plan.grad_workers_per_layer != self.world_size:
            raise ValueError(f"method={method!r} in a distributed run needs strategy='comm-opt': every rank projects "
                             "its per-example gradients onto the eigenbases, so every rank must hold them")
        if hooks:  # last: a constructor that raises leaves no hook on the model
            self._hooks.install()

    @property
    def plan(self) -> Plan:
        """The :class:`kfac.planner.Plan` this rank follows (trivial in a single process)."""
        return self._exec.plan

    @property
    def executor(self) -> Executor:
        """The :class:`kfac.distributed.executor.Executor` carrying out :attr:`plan` on this rank."""
        return self._exec

    # -- registration ---------------------------------------------------------------------------------------
    def _register(self, model: nn.Module, skip: Iterable[str] | str, hooks: bool) -> None:
        tracking = track_layers(model, skip)
        self.skipped += tracking.skipped
        for t in tracking.layers:
            if self.method.corrects and not t.adapter.per_example:
                self.skipped.append((t.name, f"method={self.method.name!r} needs per-example gradients, which "
                                             f"{type(t.adapter).__name__} layers do not give (use method='eigen')"))
                continue
            t.adapter.position_scaling = self.units == "kaisa"
            entry = self.store.add(t.name, a_dim=t.adapter.a_dim, g_dim=t.adapter.g_dim,
                                   a_diagonal=t.adapter.a_diagonal, gradient_power=t.adapter.gradient_power,
                                   gradient_sum=self.units == "curvature")
            layer = LayerState(name=t.name, module=t.module, adapter=t.adapter, entry=entry,
                               input_name=first_input(t.module))
            self._layers.append(layer)
            self._by_name[t.name] = layer
        for name, reason in self.skipped:
            logger.info("kfac: not preconditioning %r: %s", name, reason)
        if hooks:  # without hooks the caller (influence) reports what it leaves out itself
            warn_skipped(self.skipped, stacklevel=4)

    @property
    def layers(self) -> list[str]:
        """Names of the tracked (preconditioned) modules, in registration order."""
        return [layer.name for layer in self._layers]

    def remove(self) -> None:
        """Remove every hook this preconditioner registered (the model is left as it was)."""
        for layer in self._layers:
            self._hooks.unhook(layer)

    # -- schedule --------------------------------------------------------------------------------------------
    def capturing(self) -> bool:
        """Whether this step updates factors (statistics are only collected then)."""
        self._schedule()
        return self._capture_flag

    def correcting(self) -> bool:
        """Whether this step updates EK-FAC corrections (per-example projections are only computed then)."""
        self._schedule()
        return self._correct_flag

    def _schedule(self) -> None:
        if self._capture_step != self.steps:
            fus = self.hparams.interval("factor_update_steps", self.steps)
            cus = self.hparams.interval("correction_update_steps", self.steps)
            self._capture_step = self.steps
            self._capture_flag = self.steps % fus == 0
            self._correct_flag = self.method.corrects and self.steps % cus == 0

    # -- statistics ----------------------------------------------------------------------------------------
    def discard_pending_statistics(self) -> None:
        """Drop statistics collected since the last step (e.g. those of a step that was skipped), finishing any
        reduction of them already in flight."""
        if hasattr(self, "_exec"):
            self._exec.discard_statistics()
        for layer in self._layers:
            layer.discard_pending()

    def discard_stale_statistics(self) -> None:
        """Drop the statistics of a backward pass that never reached ``step()`` (fenced: every rank must skip)."""
        if any(layer.g_calls for layer in self._layers):  # not those of a forward pass still awaiting its backward
            self._comm.fence(self.steps, "zero_grad() after a backward pass without step()")
            self.discard_pending_statistics()

    # -- step ----------------------------------------------------------------------------------------------
    def _check_execution(self) -> None:
        """At the first step: some tracked layer must have run (a clear error for a model in eval mode), and the
        model must still hold the tracked modules."""
        if self._checked_execution:
            return
        guards.check_some_layer_ran(self._layers)
        self._check_modules()
        self._checked_execution = True

    def _check_modules(self) -> None:
        """Raise if a tracked module was replaced or removed since construction; warn once about added ones."""
        model = self._model()
        if model is not None and self._hooked:
            guards.check_modules(model, self._layers, self._modules_at_start, self._known_names)

    def _check_fresh_gradients(self) -> None:
        """``step()`` twice on the same gradients would precondition them twice: a clear error instead."""
        if self._written and guards.same_gradients(self._written, guards.grad_versions(self._layers)):
            raise RuntimeError("KFACPreconditioner.step() was called again on gradients it already preconditioned "
                               "(no backward pass since the last step): run zero_grad() and backward() before each "
                               "step()")

    def _drop_unexecuted(self, names: Iterable[str]) -> None:
        """Untrack layers that a checkpoint of an older version recorded as never executed (state compatibility)."""
        self.not_executed += self._untrack(names, "registered but never executed (recorded in the loaded checkpoint)")

    def _untrack(self, names: Iterable[str], reason: str) -> list[str]:
        """Stop tracking ``names`` (hooks removed, store entries deleted, listed in ``skipped``). Every rank must
        untrack the same layers at the same point (the plan is recomputed and checked collectively)."""
        wanted = set(names)
        dropped = []
        for layer in [layer for layer in self._layers if layer.name in wanted]:
            self._hooks.unhook(layer)
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
        parameters); every rank then skips together. A layer's non-finite factor statistics with finite gradients
        (e.g. an overflow in ``a^T a``) are dropped, warned (:class:`kfac.kronecker.guards.StatisticsHealth`): it
        keeps its factors, the others update; a layer whose preconditioned gradient is non-finite keeps its plain
        gradient that step, warned (counted in :attr:`fallbacks`).
        The same step also checks that every rank's hyperparameter schedules agree for this and the next step.
        """
        grads = self.engine.gradients(self.adapters)
        if all(g is None for g in grads.values()):
            raise RuntimeError("KFACPreconditioner.step() was called before loss.backward(): "
                               "no tracked parameter has a gradient")
        self._check_fresh_gradients()
        self._comm.fence(self.steps, "step()")  # every rank here at this step, or a clear error instead of a hang
        self._check_execution()
        if not self._written:  # first step(): its schedule (update() and refresh() called directly apply corrections)
            guards.warn_no_corrections(self.method, self.hparams)
        hp = self.hparams.at(self.steps)
        lrs = self._layer_lrs(hp, lr)
        update, refresh = (self.steps % hp[k] == 0 for k in ("factor_update_steps", "inv_update_steps"))
        correct = not refresh and self.correcting()
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
        token = (schedule_token(self.hparams.values(self.steps) + self.hparams.values(self.steps + 1))
                 if self._comm.enabled else 0)
        everywhere, same, staged_bad = self._comm.agree(finite, token, staged_bad)
        if not same:  # every rank sees the mismatch in the same reduction, so every rank takes this branch
            self._comm.check_identical({n: [v, w] for n, v, w in zip(SCHEDULED, self.hparams.values(self.steps),
                                                                     self.hparams.values(self.steps + 1))},
                                       what=f"K-FAC hyperparameter schedules at steps {self.steps}-{self.steps + 1}")
        if not everywhere:
            self.skip_step("non-finite gradients" if not finite else "non-finite gradients on another rank")
            return False
        if update:
            self._update_factors(hp["factor_decay"])
        if refresh:
            self._refresh(hp["damping"])  # new eigenbases: this step's corrections (in the old ones) are dropped
        elif correct:
            corrections.update(self._layers, self.method, self._exec, self._comm, hp["correction_decay"])
        self.discard_pending_statistics()
        if staged is not None:
            bad = staged_bad
        else:
            staged = self._preconditioned(grads, hp, lrs)
            bad = self._comm.agree(True, 0, staged.non_finite(self.layers))[2]
        copy_all(staged.pairs({n for n, b in zip(self.layers, bad) if b}, self._fall_back))
        self._written = guards.grad_versions(self._layers)
        self.steps += 1
        return True

    def _fall_back(self, name: str) -> None:
        """Layer ``name`` keeps its plain gradient this step (its preconditioned gradient is non-finite)."""
        self.fallbacks[name] = self.fallbacks.get(name, 0) + 1
        guards.warn_fallback(name, self.steps, self._warned_fallback)

    def _preconditioned(self, grads: Mapping[str, Tensor | None], hp: Mapping[str, Any],
                        lrs: Mapping[str, float] | None) -> Staged:
        return self.engine.precondition(self.adapters, grads, damping=hp["damping"], kl_clip=hp["kl_clip"], lrs=lrs)

    def _update_factors(self, decay: float) -> None:
        self._hooks.check_collected()
        reduced = self.engine.reduce_factors(self.steps)
        if reduced is None or reduced[1]:
            self.discarded_statistics += 1
        if reduced is None:
            return
        batches, bad = reduced
        verdict = self._comm.agree(True, 0, [n in bad for n in self.layers])[2]  # same layers on every rank
        for name, reason in self._health.record(self.layers, verdict, self.steps, self.adapters).items():
            self._untrack([name], reason)
        self._seen.update(name for name, (_, _, seen) in batches.items() if seen)
        if not self._reported_unused:  # once, from globally reduced counts: the same on every rank
            self._reported_unused = True
            guards.warn_unused(self.unused_layers)
        self.engine.absorb([layer.entry for layer in self._layers], batches, decay, init=self.factor_init)

    def _refresh(self, damping: float) -> None:
        self.engine.refresh(damping, [layer.entry for layer in self._layers])
        self._refreshed_damping = damping
        self._warned_fallback.clear()

    def skip_step(self, reason: str) -> None:
        """Record a skipped step: statistics since the last step are dropped, nothing else changes."""
        self.skipped_steps += 1
        self.discard_pending_statistics()
        logger.warning("kfac: %s at step %d; step skipped (%d skipped so far)", reason, self.steps,
                       self.skipped_steps)

    def _layer_lrs(self, hp: Mapping[str, Any], lr: float | Mapping[str, float] | None) -> dict[str, float] | None:
        return None if hp["kl_clip"] is None else block_lrs(self.layers, hp["lr"], lr)

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
        hp = self.hparams.at(self.steps)
        if self.capturing():
            self._exec.launch_statistics()
            self._update_factors(hp["factor_decay"])
        if self.correcting():
            corrections.update(self._layers, self.method, self._exec, self._comm, hp["correction_decay"])
        self.discard_pending_statistics()
        self.steps += 1

    @torch.no_grad()
    def refresh(self, *, damping: float | None = None) -> None:
        """Recompute the decompositions from the current factors (``damping``: default the current one)."""
        self._refresh(self.hparams.at(self.steps)["damping"] if damping is None else check_positive(
            damping, name="damping"))

    @torch.no_grad()
    def ihvp(self, grads: Mapping[str, Tensor] | Tensor, *, damping: float | None = None,
             ) -> dict[str, Tensor] | Tensor:
        """``(C + damping I)^-1 g`` per layer, for ``{layer: (g_dim, a_dim) matrix}`` or a flat vector (see
        :mod:`kfac.curvature`). Needs every layer's decompositions on this rank (a single process, or
        ``strategy="comm-opt"``)."""
        damping = self._query_damping(damping)
        shapes = self.block_shapes()
        named, flat = as_named_blocks(grads, shapes, kind="layers")
        out = self.engine.ihvp(named, damping)
        return flatten_blocks(out, shapes) if flat else out

    @torch.no_grad()
    def diag(self, *, damping: float | None = None) -> dict[str, Tensor]:
        """The diagonal of ``(C + damping I)^-1`` per layer, as ``(g_dim, a_dim)`` matrices."""
        return self.engine.diag(self.layers, self._query_damping(damping))

    def _query_damping(self, damping: float | None) -> float:
        value = self.hparams.at(self.steps)["damping"] if damping is None else check_positive(damping, name="damping")
        if self.method.bakes_damping and self._refreshed_damping is not None and value != self._refreshed_damping:
            raise ValueError(f"method={self.method.name!r} bakes the damping into its inverses at refresh time "
                             f"({self._refreshed_damping}); call refresh(damping={value}) first")
        return value

    def memory_usage(self) -> int:
        """Bytes held by factors and decompositions (not counting derived caches: eigen K-FAC on the PyTorch path
        keeps ``1 / (eigenvalues + damping)``, one number per tracked weight, between refreshes)."""
        return self.store.nbytes()

    def __repr__(self) -> str:
        return (f"KFACPreconditioner(method={self.method.name!r}, strategy={self._exec.strategy!r}, "
                f"world_size={self.world_size}, layers={len(self._layers)}, "
                f"skipped={len(self.skipped)}, steps={self.steps}, store={self.store!r})")
