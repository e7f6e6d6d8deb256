"""M-FAC gradient preconditioner (Frantar, Kurtic & Alistarh, NeurIPS 2021): the inverse of a sliding-window
empirical Fisher applied to ``.grad``, without ever forming a ``d x d`` matrix.

**Math.** With the last ``k <= m`` gradients ``g_1..g_k`` (``m = num_grads``) stacked as the rows of ``G``
(``k x d``) and damping ``λ > 0``::

    F = λ I + (1/k) Σ_i g_i g_i^T = λ I + (1/k) G^T G                     (no gradient yet: F = λ I)
    F^{-1} v = (v - G^T (kλ I + G G^T)^{-1} G v) / λ                       (Woodbury, see kfac.mfac.woodbury)

A step first adds the current gradient ``g`` to the window (:class:`kfac.mfac.fisher.SlidingWindowFisher`; the
oldest leaves once ``m`` are held), then writes ``P g = F^{-1} g`` back into ``.grad``. Cost per step: O(d m + m^2)
for the Gram row and the IHVP, plus one O(m^3) factorisation of the ``m x m`` matrix ``kλ I + G G^T`` per added
gradient. ``blocks="global"``: one ``F`` over all blocks; ``blocks="per_layer"``: an independent ``F_b`` per block
(block-diagonal ``F``).

With ``kl_clip`` the preconditioned gradients of all blocks are scaled, as in K-FAC, by
``nu = min(1, sqrt(kl_clip / |Σ_b lr_b^2 <P g_b, g_b>|))``.

**Blocks.** For an ``nn.Module``, one block per module with direct trainable parameters, keyed by module name (the
names of K-FAC's factor store). Modules K-FAC supports (Linear, Conv2d, Embedding) use the adapter's gradient
matrix ``(g_dim, a_dim)`` (bias as last column); any other module (norm layers, ...) the concatenation of its
direct parameters' flattened gradients, shape ``(d_b,)``. For an iterable of parameters (or param groups), one block
per parameter, named ``"param{i}"``, in the parameter's shape. A parameter whose ``.grad`` is ``None`` counts as a
zero gradient and is left ``None`` (:mod:`kfac.mfac.blocks`).

**Distributed** (``torch.distributed`` initialised, world size > 1, gradients already averaged over ranks, e.g. by
DDP, so every rank sees the same ``g``). Blocks are assigned to ranks by LPT on their size ``d_b`` (verified
identical on every rank); a rank's window holds only its blocks (``m x d_b`` each) and never leaves it, except
in :meth:`~MFACPreconditioner.state_dict`. In global mode the two partial sums over blocks of a step, the new Gram
row (``m`` numbers) and the projection ``G g`` (``k`` numbers), are summed over ranks in float64 (category
``"mfac"`` of :attr:`MFACPreconditioner.bytes_communicated`): O(m) numbers per step whatever ``d``. Per-layer mode
needs no curvature communication. Each owner then broadcasts its blocks' preconditioned gradients (one bucket per
source rank, category ``"gradients"``), and ``kl_clip`` is computed identically on every rank from the complete
result.
:meth:`~MFACPreconditioner.ihvp`, :meth:`~MFACPreconditioner.diag` and :meth:`~MFACPreconditioner.state_dict` are
collectives there (call them on every rank with the same arguments); they return complete results on every rank.
The assignment, the exchange and the state dict: :mod:`kfac.mfac.sharding`.

**FSDP2 / HSDP** (a model sharded with ``fully_shard``): M-FAC works within a shard group (by default the mesh's
shard dimension; on an HSDP mesh every replica does the same work on the same averaged gradients): each block's
owner gathers the rows of its gradient whole (:mod:`kfac.distributed.fsdp`), adds it to its window and
preconditions it, and every rank gets back its rows of the result with ``<P g, g>`` for ``kl_clip``; equal to one
process.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed.fsdp import ShardedGradients, shard_group
from .._tensor import all_finite, copy_all, kl_clip_scale, update_dots
from ..curvature import as_named_blocks, flatten_blocks
from ..distributed.comm import Communicating, Communicator
from ..hparams import Hyper, block_lrs, check_positive, comparable, resolve
from .blocks import module_blocks, param_blocks, read_grads, window_placement
from .fisher import BlockMode, SlidingWindowFisher
from .sharding import Sharding

__all__ = ["MFACPreconditioner"]

logger = logging.getLogger("kfac")

_MODES: dict[str, BlockMode] = {"global": "global", "per_layer": "per_block"}


class MFACPreconditioner(Communicating):
    """M-FAC preconditioner: ``.grad <- (λ I + (1/k) Σ_{last k <= m} g_i g_i^T)^{-1} .grad`` (see the module
    docstring for the math, the blocks and the distributed protocol).

    Usage (own training loop)::

        pre = kfac.MFACPreconditioner(model, num_grads=32, damping=1e-4)
        loss.backward(); pre.step(); optimizer.step()

    Args (keyword-only; ``damping``, ``kl_clip`` and ``lr`` are constants or callables ``step -> value``):
        num_grads: window length ``m >= 1``.
        damping: ``λ > 0``.
        blocks: ``"global"`` (one Fisher over all blocks) or ``"per_layer"`` (block-diagonal, one per block).
        kl_clip: trust-region bound on ``Σ lr^2 <P g, g>``; ``None`` disables the scaling.
        lr: learning rate used by ``kl_clip`` (overridden by ``step(lr=...)``; :class:`kfac.MFAC` passes the
            optimizer's group lrs).
        skip_layers: module names, class names or regular expressions (full match on the name; for a parameter
            iterable, on ``"param{i}"``); a skipped module's children are skipped too.
        dtype: dtype of the window (default: the promoted dtype of the tracked parameters); the ``m x m``
            Gram matrices and their factorisations are always float64.
        process_group: the ``torch.distributed`` group to shard over (default: the default group, if initialised).
    """

    def __init__(
        self,
        model_or_params: nn.Module | Iterable[Any],
        *,
        num_grads: int = 32,
        damping: Hyper = 1e-4,
        blocks: str = "global",
        kl_clip: Hyper | None = None,
        lr: Hyper | None = None,
        skip_layers: Iterable[str] | str = (),
        dtype: torch.dtype | None = None,
        process_group: Any | None = None,
    ) -> None:
        if isinstance(num_grads, bool) or not isinstance(num_grads, int) or num_grads < 1:
            raise ValueError(f"num_grads (window length m) must be an int >= 1, got {num_grads!r}")
        if blocks not in _MODES:
            raise ValueError(f"blocks must be 'global' or 'per_layer', got {blocks!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating point torch.dtype, got {dtype!r}")
        self.num_grads = num_grads
        self.damping = damping
        self.blocks = blocks
        self.kl_clip = kl_clip
        self.lr = lr
        self._hparams(0)  # validate constants early
        self.steps = 0
        self.skipped_steps = 0
        self.skipped: list[tuple[str, str]] = []
        skip = [skip_layers] if isinstance(skip_layers, str) else list(skip_layers)
        if isinstance(model_or_params, nn.Module):
            self._blocks = module_blocks(model_or_params, skip, self.skipped)
        else:
            self._blocks = param_blocks(model_or_params, skip, self.skipped)
        if not self._blocks:
            reasons = "; ".join(f"{n or '<root>'}: {r}" for n, r in self.skipped) or "no trainable parameters"
            raise ValueError(f"M-FAC found no parameters to precondition ({reasons})")
        self.device, self.dtype = window_placement(self._blocks, dtype)
        if process_group is None:  # HSDP: every replica runs M-FAC within its shard group (identical gradients)
            process_group = shard_group(p for b in self._blocks for p in b.params)
        self._comm = Communicator(group=process_group)
        self._build()
        self._verify()
        for name, reason in self.skipped:
            logger.info("kfac: M-FAC not preconditioning %r: %s", name, reason)

    def _build(self) -> None:
        """Assign blocks to ranks (LPT on ``d_b``, ties by name) and create this rank's (empty) window. The
        cross-rank check runs at the next collective call (:meth:`_verify`)."""
        self._sharding = Sharding.by_lpt(self._comm, self._blocks, mode=self.blocks, num_grads=self.num_grads,
                                         dtype=self.dtype, device=self.device)
        self._owner = self._sharding.owner
        self._owned = self._sharding.owned
        # FSDP2-sharded blocks: each owner gathers its blocks' rows whole and returns every rank its rows of the
        # result (kfac.distributed.fsdp); the windows stay on the owners
        self._shards = ShardedGradients(comm=self._comm, params={b.name: list(b.params) for b in self._blocks},
                                        dtype=self.dtype)
        if self._shards:
            if len(self._shards.members) != self._comm.world_size:
                raise ValueError("M-FAC on a sharded model works within one shard group: pass process_group=None "
                                 "(it then uses the mesh's shard dimension) or that group")
            self._shards.bind(lambda name, members: members.index(self._comm.ranks[self._owner[name]]))
        self._fisher = SlidingWindowFisher(
            block_shapes={b.name: b.shape for b in self._owned}, num_grads=self.num_grads,
            damping=self._hparams(self.steps)["damping"], blocks=_MODES[self.blocks],
            all_reduce=self._all_reduce if self._comm.enabled else None, dtype=self.dtype, device=self.device)
        self._verified = False
        self._warned_shard = False

    def _verify(self) -> None:
        """Every rank must have the same blocks, options and assignment (collective; clear error otherwise)."""
        if self._verified:
            return
        if self._comm.enabled:
            self._comm.check_identical(
                {"blocks": [[b.name, list(b.shape)] for b in self._blocks], "owner": self._owner,
                 "num_grads": self.num_grads, "mode": self.blocks, "dtype": str(self.dtype),
                 "damping": comparable(self.damping), "kl_clip": comparable(self.kl_clip),
                 "lr": comparable(self.lr)},
                what="M-FAC blocks, options or block-to-rank assignment")
        self._verified = True

    def _all_reduce(self, t: Tensor) -> Tensor:
        return self._comm.all_reduce_sum([t], category="mfac", exact=True)[0]

    # -- properties -----------------------------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        """Names of the tracked blocks, in order (the order of flat vectors)."""
        return [b.name for b in self._blocks]

    @property
    def owners(self) -> dict[str, int]:
        """``{block: rank holding its window}`` (all 0 in a single process)."""
        return dict(self._owner)

    @property
    def count(self) -> int:
        """Number ``k <= m`` of gradients in the window."""
        return self._fisher.count

    def memory_usage(self) -> int:
        """Bytes of this rank's window (``m x d_b`` per held block) and float64 Gram matrices (``m x m`` each)."""
        m = self.num_grads
        groups = 1 if self.blocks == "global" else len(self._owned)
        return m * sum(b.size for b in self._owned) * self.dtype.itemsize + groups * m * m * 8

    def _hparams(self, step: int) -> dict[str, Any]:
        """``damping``, ``kl_clip`` and ``lr`` at ``step`` (schedules resolved; damping and kl_clip validated)."""
        hp = {"damping": resolve(self.damping, step, name="damping"),
              "kl_clip": resolve(self.kl_clip, step, name="kl_clip"),
              "lr": resolve(self.lr, step, name="lr")}
        check_positive(hp["damping"], name="damping")
        check_positive(hp["kl_clip"], name="kl_clip", allow_none=True)
        return hp

    def _damping(self, damping: float | None) -> float:
        """A query's ``λ``: ``damping`` if given (validated), else the damping hyperparameter at this step."""
        if damping is None:
            return float(self._hparams(self.steps)["damping"])
        return float(check_positive(damping, name="damping"))

    # -- the curvature interface (kfac.curvature.Preconditioner) -------------------------------------------------
    def block_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{block: shape}``: ``(g_dim, a_dim)`` for adapter layers, ``(d_b,)`` for other modules, the parameter's
        shape for a parameter iterable."""
        return {b.name: b.shape for b in self._blocks}

    def parameters_of(self) -> dict[str, list[Tensor]]:
        return {b.name: list(b.params) for b in self._blocks}

    def untrack(self, names: Iterable[str], reason: str) -> list[str]:
        """Stop preconditioning ``names`` (listed in ``skipped``); the window is rebuilt without them, so this is
        only allowed while it is empty (before the first step or update). Call it on every rank alike."""
        wanted = set(names)
        dropped = [b.name for b in self._blocks if b.name in wanted]
        if not dropped:
            return []
        if self._fisher.count or self.steps:
            raise RuntimeError(f"M-FAC cannot untrack blocks {dropped} after gradients entered the window; "
                               "untrack before the first step")
        self._blocks = [b for b in self._blocks if b.name not in wanted]
        self.skipped += [(name, reason) for name in dropped]
        if self._blocks:
            self._build()  # untrack may run on one rank before another reaches it: verified at the next collective
        return dropped

    def _check_ready(self) -> None:
        if not self._blocks:
            raise RuntimeError("M-FAC tracks no blocks (all were untracked)")
        self._verify()

    def _gradients(self, what: str) -> dict[str, Tensor]:
        return read_grads(self._blocks, dtype=self.dtype, device=self.device, what=what)

    def _sharded_gradients(self) -> tuple[dict[str, Tensor | None], dict[str, Tensor]]:
        """Sharded blocks: this rank's rows of every block (flat; zeros where it has no gradient) and the whole
        gradients of the blocks it owns, in block layout (a collective)."""
        local: dict[str, Tensor | None] = {b.name: self._shards.local(b.name) for b in self._blocks}
        if all(t is None for t in local.values()):
            raise RuntimeError("MFACPreconditioner.step() was called before loss.backward(): no tracked parameter "
                               "has a gradient")
        local = {n: t if t is not None else self._shards.zeros(n) for n, t in local.items()}
        whole = self._shards.gather(local)
        return local, {b.name: b.matrix_of(whole[b.name]).to(self.dtype) for b in self._owned}

    def _absorb(self, grads: Mapping[str, Tensor], grads_finite: bool) -> str | None:
        """Add ``grads`` to the window; returns ``None``, or why the step is skipped (the same on every rank)."""
        owned = {b.name: grads[b.name] for b in self._owned}
        finite = grads_finite and all_finite(grads.values())
        rows = self._fisher.partial_gram_row(owned) if finite else None
        finite = rows is not None and bool(torch.isfinite(rows).all())  # rows is None exactly when not finite
        if not self._comm.all_true(finite):
            return "non-finite gradients" if not finite else "non-finite gradients on another rank"
        assert rows is not None  # finite on every rank, so on this one
        if self.blocks == "global" and self._comm.enabled:
            rows = self._all_reduce(rows[0]).reshape(rows.shape)
        try:
            self._fisher.commit(owned, rows)
        except ValueError:  # the summed Gram row overflowed: identical on every rank, so every rank skips
            return "overflow in the Gram row"
        return None

    def _skip(self, reason: str) -> None:
        self.skipped_steps += 1
        logger.warning("kfac: M-FAC %s at step %d; step skipped (%d skipped so far)", reason, self.steps,
                       self.skipped_steps)

    @torch.no_grad()
    def update(self) -> None:
        """Add the current gradients to the window without preconditioning them, and advance the step counter
        (like K-FAC's ``update``). Non-finite gradients are not added (logged and counted in ``skipped_steps``)."""
        self._check_ready()
        if self._shards:
            local, owned = self._sharded_gradients()
            reason = self._absorb(owned, all_finite(t for t in local.values() if t is not None))
        else:
            reason = self._absorb(self._gradients("update"), True)
        if reason is not None:
            self._skip(reason)
            return
        self.steps += 1

    def refresh(self, *, damping: float | None = None) -> None:
        """No-op: the ``m x m`` factorisation is recomputed lazily at the first solve after a change."""
        if damping is not None:
            check_positive(damping, name="damping")

    def discard_stale_statistics(self) -> None:
        """No-op: M-FAC collects nothing outside ``step()``/``update()``."""

    def remove(self) -> None:
        """No-op: M-FAC registers no hooks (it reads ``.grad``)."""

    @torch.no_grad()
    def step(self, *, lr: float | Mapping[str, float] | None = None, grads_finite: bool = True) -> bool:
        """Add the current gradients to the window, then replace them by ``F^{-1} g`` (scaled by ``kl_clip``).

        ``lr``: for ``kl_clip``, a float or ``{block: lr}`` (default: the ``lr`` hyperparameter). Returns ``False``
        and changes nothing but ``skipped_steps`` when a gradient is non-finite on any rank or ``grads_finite`` is
        ``False`` on any rank (all ranks skip together).
        """
        self._check_ready()
        grads = self._gradients("step") if not self._shards else {}
        hp = self._hparams(self.steps)
        lrs = None if hp["kl_clip"] is None else block_lrs(self.layers, hp["lr"], lr)  # per block, for kl_clip
        if self._shards:
            return self._sharded_step(hp, lrs, grads_finite)
        reason = self._absorb(grads, grads_finite)
        if reason is not None:
            self._skip(reason)
            return False
        owned = {b.name: grads[b.name] for b in self._owned}
        local = self._fisher.ihvp(owned, damping=float(hp["damping"]))  # global mode: one k-sized sum over ranks
        precond = self._exchange(local, self.layers, "gradients")  # {block: F^{-1} g}, window dtype
        names = self.layers
        dots = update_dots([(precond[n], grads[n]) for n in names])  # also the finiteness check of F^{-1} g
        if lrs is not None:
            nu = kl_clip_scale(dots, [lrs[n] for n in names], hp["kl_clip"])
            precond = {n: v * nu.to(v.dtype) for n, v in precond.items()}
        finite = torch.isfinite(dots).tolist()  # identical on every rank: the products were exchanged
        bad = [n for n, ok in zip(names, finite) if not ok]
        if bad:
            warnings.warn(f"kfac: non-finite M-FAC update for blocks {bad} at step {self.steps} (damping too small "
                          "for the gradient window?); they use their plain gradients this step", stacklevel=3)
        for b, ok in zip(self._blocks, finite):
            if ok:
                b.set_grad(precond[b.name])
        self.steps += 1
        return True

    @torch.no_grad()
    def ihvp(self, grads: Mapping[str, Tensor] | Tensor, *, damping: float | None = None,
             ) -> dict[str, Tensor] | Tensor:
        """``F^{-1} g`` for ``{block: tensor in its block shape}`` or a flat vector (block order, see
        :mod:`kfac.curvature`); returns the same form. Global mode needs every block (they are coupled);
        per-layer mode accepts a subset. Results have the inputs' dtypes. In a distributed run this is a
        collective (same arguments on every rank) and every rank gets the complete result."""
        lam = self._damping(damping)
        self._check_ready()
        shapes = self.block_shapes()
        named, flat = as_named_blocks(grads, shapes, what="ihvp", kind="blocks")
        if self.blocks == "global":
            missing = [n for n in shapes if n not in named]
            if missing:
                raise ValueError(f"ihvp: blocks='global' couples all blocks, gradients are missing for {missing}")
            owned = {b.name: named[b.name] for b in self._owned}
            local = self._fisher.ihvp(owned, damping=lam)
        else:
            local = self._per_block_ihvp({b.name: named[b.name] for b in self._owned if b.name in named}, lam)
        out = self._exchange(local, [n for n in shapes if n in named], "ihvp")
        out = {n: out[n].reshape(shapes[n]).to(named[n].dtype) for n in shapes if n in named}
        return flatten_blocks(out, shapes) if flat else out

    def _sharded_step(self, hp: Mapping[str, Any], lrs: Mapping[str, float] | None, grads_finite: bool) -> bool:
        """:meth:`step` on sharded blocks: the owners add their blocks' whole gradients to their windows and
        precondition them; every rank gets its rows of the results with ``<P(g), g>`` for ``kl_clip``."""
        local, owned = self._sharded_gradients()
        reason = self._absorb(owned, grads_finite and all_finite(t for t in local.values() if t is not None))
        if reason is not None:
            self._skip(reason)
            return False
        pre = self._fisher.ihvp(owned, damping=float(hp["damping"]))
        blocks = {b.name: b for b in self._owned}
        done = {n: (torch.cat([t.reshape(-1) for t in blocks[n].split(v)]), True, update_dots([(v, owned[n])])[0])
                for n, v in pre.items()}
        got = self._shards.scatter(done, local)
        names = self.layers
        dots = torch.stack([got[n].dot for n in names])
        if lrs is not None:
            nu = kl_clip_scale(dots, [lrs[n] for n in names], hp["kl_clip"])
            for n in names:
                got[n].update.mul_(nu.to(got[n].update.dtype))
        finite = torch.isfinite(dots).tolist()
        bad = [n for n, ok in zip(names, finite) if not ok]
        if bad:
            warnings.warn(f"kfac: non-finite M-FAC update for blocks {bad} at step {self.steps} (damping too small "
                          "for the gradient window?); they use their plain gradients this step", stacklevel=3)
        copy_all([pair for n, ok in zip(names, finite) if ok for pair in got[n].targets])
        self.steps += 1
        return True

    def _per_block_ihvp(self, named: Mapping[str, Tensor], lam: float) -> dict[str, Tensor]:
        """Per-layer mode with a possibly partial dict: the missing held blocks get zeros (their result is
        dropped; per-block Fishers are independent)."""
        if not self._owned:
            return {}
        full = {b.name: named[b.name] if b.name in named else torch.zeros(b.shape, dtype=self.dtype,
                                                                           device=self.device)
                for b in self._owned}
        out = self._fisher.ihvp(full, damping=lam)
        return {n: out[n] for n in named}

    def _exchange(self, local: Mapping[str, Tensor], names: list[str], category: str) -> dict[str, Tensor]:
        """The tensors of blocks ``names`` on every rank (see :meth:`Sharding.exchange`)."""
        return self._sharding.exchange(local, names, category)

    @torch.no_grad()
    def diag(self, *, damping: float | None = None) -> dict[str, Tensor]:
        """The diagonal of ``F^{-1}`` per block, in the block's shape: ``(1 - Σ_i (R G)_{i,·}^2) / λ`` with
        ``R^T R = (kλ I + G G^T)^{-1}``; O(d m^2). Collective in a distributed run (owners compute, then
        broadcast)."""
        lam = self._damping(damping)
        self._check_ready()
        local = self._fisher.diag(damping=lam)
        return self._exchange(local, self.layers, "diag")

    # -- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Never communicates (``if rank == 0: torch.save(opt.state_dict(), path)`` is safe). Where this rank owns
        every block (a single process) it is the complete state of :meth:`consolidated_state_dict`; otherwise this
        rank's *shard*: its own windows (``state["shard"]`` names the rank, world size and assignment), loadable
        only by the same rank of the same assignment."""
        if not self._comm.enabled or len(self._owned) == len(self._blocks):
            return self.consolidated_state_dict()
        self._check_ready()
        if not self._warned_shard:
            self._warned_shard = True
            logger.warning("kfac: M-FAC state_dict() on rank %d holds only this rank's blocks: resume it with every "
                           "rank loading its own file at the same world size, or save consolidated_state_dict() (a "
                           "collective: call it on every rank) for a portable checkpoint", self.rank)
        return {"steps": self.steps, "skipped_steps": self.skipped_steps, "method": "mfac", "blocks": self.layers,
                "shard": self._shard_id(), "local": self._fisher.state_dict()}

    def _shard_id(self) -> dict[str, Any]:
        return self._sharding.shard_id()

    def consolidated_state_dict(self) -> dict[str, Any]:
        """Counters, the window of every block (``m x d_b``, ``window[name]``) and the float64 Gram matrices
        (``gram``: ``groups x m x m``, one group in global mode, one per block in order otherwise). Complete on every
        rank and loadable at any world size; in a distributed run a collective (owners broadcast their windows,
        category ``"state"``): call it on every rank. Tensors are copies."""
        self._check_ready()
        local = self._fisher.state_dict()
        windows, gram = self._sharding.consolidate(local)
        return {"steps": self.steps, "skipped_steps": self.skipped_steps, "method": "mfac", "blocks": self.layers,
                "block_shapes": {n: list(s) for n, s in self.block_shapes().items()}, "mode": self.blocks,
                "num_grads": self.num_grads, "position": int(local["position"]), "count": int(local["count"]),
                "window": windows, "gram": gram}

    def validate_state_dict(self, state: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` if ``state`` cannot be loaded into this preconditioner (nothing is changed)."""
        if not isinstance(state, Mapping):
            raise ValueError(f"M-FAC state must be a mapping, got {type(state).__name__}")
        if state.get("method") != "mfac":
            raise ValueError(f"state was not saved by an MFACPreconditioner (method={state.get('method')!r})")
        self._sharding.validate(state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (from any world size); clear ``ValueError`` on a mismatch."""
        self.validate_state_dict(state)
        local = state["local"] if state.get("shard") is not None else self._sharding.local_state(state)
        self._fisher.load_state_dict(local)
        self.steps = int(state["steps"])
        self.skipped_steps = int(state["skipped_steps"])

    def __repr__(self) -> str:
        return (f"MFACPreconditioner(blocks={self.blocks!r}, num_grads={self.num_grads}, count={self.count}, "
                f"world_size={self.world_size}, layers={len(self._blocks)}, skipped={len(self.skipped)}, "
                f"steps={self.steps})")
