"""M-FAC: matrix-free inverse-Fisher-vector products over a window of gradients.

Frantar, Kurtic & Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order Information",
NeurIPS 2021. Pure torch, any device, float32 or float64; no ``torch.distributed`` (see *Sharding*).

**Fisher.** With the ``k`` gradients held stacked as the rows of ``G`` (``k x d``) and damping ``λ > 0``::

    F = λ I + (1/k) Σ_{i<=k} g_i g_i^T = λ I + (1/k) G^T G          (k = 0: F = λ I)

``k = min(#gradients seen, m)``: a partially filled window is normalised by the number of gradients it actually
holds (``1/k``, not ``1/m``), i.e. it is always the plain average of the outer products present. By Woodbury::

    F^{-1} v = (v - G^T M^{-1} G v) / λ,        M = k λ I + K,   K = G G^T   (k x k Gram matrix)

so only the ``k x k`` matrix ``M`` is ever factorised. Its eigenvalues are ``>= kλ``; it is factorised in float64
whatever the working dtype (cheap: ``m x m``) by Cholesky ``M = L L^T``, falling back to an eigendecomposition with
the eigenvalues clamped to ``>= kλ`` when the Cholesky fails (``kλ`` below round-off of ``||K||``). Every method
only needs ``R`` with ``R^T R = M^{-1}`` (``R = L^{-1}``, or ``diag(s)^{-1/2} Q^T``), e.g.
``diag(F^{-1}) = (1 - Σ_i (R G)_{i,·}^2) / λ`` (the factorisation: :class:`kfac.mfac.woodbury.GramFactor`).

**Forms.** :class:`SlidingWindowFisher` (dynamic: a ring buffer of the last ``m`` gradients, defined here) and
:class:`StaticFisher` (a fixed set of ``k`` gradients, :mod:`kfac.mfac.static`, re-exported here).

**Blocks.** Parameters are grouped in named blocks, each a flat vector of size ``d_b`` (any tensor shape is
flattened; results come back in the input's shape). ``blocks="global"``: one Fisher over the concatenation of all
blocks, ``K = Σ_b G_b G_b^T``. ``blocks="per_block"``: an independent ``F_b`` per block (``F`` block-diagonal), one
``K_b`` per block. A flat tensor stands for the concatenation of the blocks in their declared order.

**Sharding.** A rank may hold only the blocks it owns. In global mode the sums over blocks of ``m``-sized (or
``m x m``) partials go through the ``all_reduce`` hook: ``all_reduce(t)`` must return the elementwise sum of ``t``
over ranks, or ``None`` after summing ``t`` in place (so ``torch.distributed.all_reduce`` itself can be passed); the
default is the identity (one process). Calls are collective: every rank calls ``add`` / ``ihvp`` / ... in the same
order. The ``m x d`` window never crosses ranks. In per-block mode every Gram matrix is local and the hook is never
called. The two phases of ``add`` and ``ihvp`` are public (``partial_gram_row``/``commit``,
``partial_projection``/``finish_ihvp``) so callers can run the reduction themselves, e.g. fused with others.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .static import StaticFisher
from .woodbury import FLAT_BLOCK, AllReduce, BlockFisher, BlockMode, GramFactor, Vectors, check_damping

__all__ = ["FLAT_BLOCK", "AllReduce", "BlockMode", "SlidingWindowFisher", "StaticFisher"]


class SlidingWindowFisher(BlockFisher):
    """Dynamic M-FAC: ``F = λ I + (1/k) Σ g_i g_i^T`` over the last ``k <= m`` gradients added (ring buffer).

    State: an ``m x d_b`` ring buffer per block (working dtype) and one ``m x m`` float64 Gram matrix per group
    (global: ``K = Σ_b G_b G_b^T``; per block: ``K_b``). Only the first ``count`` slots are live (slots fill in order,
    then the oldest is overwritten). Adding ``g`` to slot ``p`` only replaces row/column ``p`` of ``K`` by
    ``G g`` (O(d m)); each entry is set, never accumulated, so no round-off builds up. The float64 factor of
    ``M = kλI + K`` (O(m^3)) is recomputed lazily, at the first solve after an ``add`` or a damping change, so an
    ``add`` costs O(d m) now + O(m^3) once later, and an IHVP O(d m + m^2).

    Args (keyword-only):
        block_shapes: ``{name: shape or size}`` of the blocks held here (an int: one block named ``"params"``).
            Under sharding, only the blocks this rank owns.
        num_grads: window length ``m >= 1``.
        damping: default ``λ > 0`` (per-call override via ``damping=``; the :attr:`damping` property is settable).
        blocks: ``"global"`` (one Fisher over all blocks, across ranks) or ``"per_block"`` (block-diagonal).
        all_reduce: sum-over-ranks hook for global mode (see module docstring); identity by default.
        dtype, device: of the window and the results (default: torch's default dtype, CPU).
    """

    def __init__(
        self,
        *,
        block_shapes: Mapping[str, int | Sequence[int]] | int,
        num_grads: int,
        damping: float,
        blocks: BlockMode = "global",
        all_reduce: AllReduce | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(num_grads, bool) or not isinstance(num_grads, int) or num_grads < 1:
            raise ValueError(f"num_grads (window length m) must be an int >= 1, got {num_grads!r}")
        if isinstance(block_shapes, int):
            block_shapes = {FLAT_BLOCK: block_shapes}
        shapes = {name: (s,) if isinstance(s, int) else tuple(int(x) for x in s) for name, s in block_shapes.items()}
        super().__init__(
            shapes,
            blocks=blocks,
            all_reduce=all_reduce,
            dtype=dtype or torch.get_default_dtype(),
            device=torch.device(device) if device is not None else torch.device("cpu"),
        )
        self._m = num_grads
        self._damping = check_damping(damping)
        self._window = {
            name: torch.zeros(num_grads, size, dtype=self.dtype, device=self.device)
            for name, size in self._layout.sizes.items()
        }
        self._gram = torch.zeros(len(self._groups), num_grads, num_grads, dtype=torch.float64, device=self.device)
        self._factors: list[GramFactor | None] = [None] * len(self._groups)
        self._position = 0
        self._count = 0

    @property
    def num_grads(self) -> int:
        """Window length ``m``."""
        return self._m

    @property
    def count(self) -> int:
        """Number ``k <= m`` of gradients currently held (the ``1/k`` of the Fisher)."""
        return self._count

    @property
    def position(self) -> int:
        """Ring-buffer slot the next gradient goes to."""
        return self._position

    @property
    def damping(self) -> float:
        return self._damping

    @damping.setter
    def damping(self, value: float) -> None:
        self._damping = check_damping(value)

    def _resolve(self, damping: float | None) -> float:
        return self._damping if damping is None else check_damping(damping)

    def _factor(self, group: int, damping: float) -> GramFactor:
        factor = self._factors[group]
        if factor is None or factor.damping != damping:
            k = self._count
            factor = self._factors[group] = GramFactor(self._gram[group, :k, :k], damping)
        return factor

    # -- adding a gradient ------------------------------------------------------------------------------------------

    def partial_gram_row(self, grads: Vectors) -> Tensor:
        """This rank's share of the new Gram row(s), (groups, m) float64; O(d m), no state change.

        ``rows[j, i] = Σ_{b in group j} <slot_i(G_b), g_b>`` with the slot being written (:attr:`position`) taken
        as ``g`` itself, so ``rows[j, position] = Σ_b ||g_b||^2``. Groups: 1 in global mode, else one per block.
        """
        flat = self._inputs(grads, "grads")
        rows = torch.zeros(len(self._groups), self._m, dtype=torch.float64, device=self.device)
        p = self._position
        for j, names in enumerate(self._groups):
            for name in names:
                g = flat[name]
                row = self._window[name] @ g
                row[p] = g @ g
                rows[j] += row.to(torch.float64)
        return rows

    def commit(self, grads: Vectors, rows: Tensor) -> None:
        """Write ``grads`` to slot :attr:`position` (evicting the oldest once ``m`` are held), given the Gram rows
        from :meth:`partial_gram_row` summed over ranks (global mode). O(d + m); raises ``ValueError`` without
        changing state if the rows are not finite (a non-finite or overflowing gradient on any rank)."""
        flat = self._inputs(grads, "grads")
        shape = (len(self._groups), self._m)
        if tuple(rows.shape) != shape:
            raise ValueError(f"Gram rows have shape {tuple(rows.shape)}, expected {shape}")
        if not bool(torch.isfinite(rows).all()):
            bad = [name for name, g in flat.items() if not bool(torch.isfinite(g).all())]
            where = f"in block(s) {bad}" if bad else "(overflow, or a non-finite gradient on another rank)"
            raise ValueError(f"non-finite gradient {where}; the window was left unchanged")
        p = self._position
        for name, g in flat.items():
            self._window[name][p].copy_(g)
        rows = rows.to(device=self.device, dtype=torch.float64)
        self._gram[:, p, :] = rows
        self._gram[:, :, p] = rows
        self._position = (p + 1) % self._m
        self._count = min(self._count + 1, self._m)
        self._factors = [None] * len(self._groups)

    def add(self, grads: Vectors) -> None:
        """Add one gradient (``{name: tensor}`` for the held blocks, or flat); the oldest leaves once ``m`` are held.

        O(d m) now and O(m^3) at the next solve. Global mode: one reduction of ``m`` float64 elements.
        """
        self.commit(grads, self._reduce(self.partial_gram_row(grads)))

    def rebuild_gram(self) -> None:
        """Recompute the Gram matrices from the window: O(d m^2); global mode: one ``m x m`` reduction."""
        grams = torch.zeros_like(self._gram)
        for j, names in enumerate(self._groups):
            for name in names:
                window = self._window[name]
                grams[j] += (window @ window.mT).to(torch.float64)
        self._gram = self._reduce(grams)
        self._factors = [None] * len(self._groups)

    # -- solves -----------------------------------------------------------------------------------------------------

    def partial_projection(self, vectors: Vectors) -> Tensor:
        """This rank's share of ``G v``: (groups, k) float64, ``[j] = Σ_{b in group j} G_b v_b``; O(d k)."""
        flat = self._inputs(vectors, "vectors")
        k = self._count
        proj = torch.zeros(len(self._groups), k, dtype=torch.float64, device=self.device)
        if k:
            for j, names in enumerate(self._groups):
                for name in names:
                    proj[j] += (self._window[name][:k] @ flat[name]).to(torch.float64)
        return proj

    def finish_ihvp(self, vectors: Vectors, projection: Tensor, *, damping: float | None = None) -> Vectors:
        """``F^{-1} v = (v - G^T M^{-1} (G v)) / λ`` given ``G v`` summed over ranks; O(d k + k^2) (+ refactor)."""
        lam = self._resolve(damping)
        flat = self._inputs(vectors, "vectors")
        k = self._count
        shape = (len(self._groups), k)
        if tuple(projection.shape) != shape:
            raise ValueError(f"projection has shape {tuple(projection.shape)}, expected {shape}")
        out = {}
        for j, names in enumerate(self._groups):
            if k:
                w = self._factor(j, lam).solve(projection[j].to(device=self.device, dtype=torch.float64))
                w = w.to(self.dtype)
            for name in names:
                v = flat[name]
                out[name] = torch.addmv(v, self._window[name][:k].mT, w, alpha=-1) / lam if k else v / lam
        return self._layout.restore(vectors, out)

    def diag(self, *, damping: float | None = None) -> dict[str, Tensor]:
        """``diag(F^{-1}) = (1 - Σ_i (R G)_{i,·}^2) / λ`` per held block, in the block's declared shape.

        O(d m^2) (a triangular solve against each ``k x d_b`` window, in float64); no reduction.
        """
        lam = self._resolve(damping)
        k = self._count
        out = {}
        for j, names in enumerate(self._groups):
            for name in names:
                if k:
                    bt = self._factor(j, lam).whiten(self._window[name][:k].to(torch.float64))
                    d = ((1 - bt.square().sum(0)) / lam).to(self.dtype)
                else:
                    d = torch.full((self._layout.sizes[name],), 1 / lam, dtype=self.dtype, device=self.device)
                out[name] = d.reshape(self._layout.shapes[name])
        return out

    # -- checkpointing ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Tensor | int]:
        """``num_grads``, ``position``, ``count`` (ints), ``gram`` (groups x m x m), ``window.<name>`` (m x d_b)."""
        state: dict[str, Tensor | int] = {
            "num_grads": self._m,
            "position": self._position,
            "count": self._count,
            "gram": self._gram.clone(),
        }
        for name, window in self._window.items():
            state[f"window.{name}"] = window.clone()
        return state

    def load_state_dict(self, state: Mapping[str, Tensor | int]) -> None:
        """Restore a :meth:`state_dict` of an instance with the same blocks, ``m`` and mode (validated first)."""
        expected = {"num_grads", "position", "count", "gram", *(f"window.{name}" for name in self._window)}
        if set(state) != expected:
            raise ValueError(
                f"state_dict keys mismatch: missing {sorted(expected - set(state))}, "
                f"unexpected {sorted(set(state) - expected)}"
            )
        m, position, count = state["num_grads"], state["position"], state["count"]
        if m != self._m:
            raise ValueError(f"state_dict has num_grads={m}, this instance has {self._m}")
        if not isinstance(position, int) or not isinstance(count, int) or not 0 <= count <= m or not 0 <= position < m:
            raise ValueError(f"state_dict has invalid position={position!r} / count={count!r} for m={m}")
        if count < m and position != count:
            raise ValueError(f"state_dict: a partially filled window (count={count}) must have position == count")
        tensors = {"gram": (state["gram"], tuple(self._gram.shape))}
        tensors.update({f"window.{n}": (state[f"window.{n}"], tuple(w.shape)) for n, w in self._window.items()})
        for key, (t, shape) in tensors.items():
            if not isinstance(t, Tensor) or tuple(t.shape) != shape:
                raise ValueError(f"state_dict[{key!r}] must be a tensor of shape {shape}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"state_dict[{key!r}] has non-finite entries")
        self._gram.copy_(state["gram"])  # type: ignore[arg-type]
        for name, window in self._window.items():
            window.copy_(state[f"window.{name}"])  # type: ignore[arg-type]
        self._position, self._count = position, count
        self._factors = [None] * len(self._groups)
