"""Static M-FAC (Frantar, Kurtic & Alistarh, NeurIPS 2021): a fixed set of ``k`` gradients, factorised once.

``F = λ I + (1/k) G^T G`` with ``G`` (``k x d``) the gradients. With ``M = kλ I + G G^T = L L^T`` (float64) and
``B^T = L^{-1} G`` (``k x d``), ``F^{-1} = (I - B B^T) / λ``: an IHVP or the diagonal costs O(d k) after an O(d k^2)
setup (see :mod:`kfac.mfac.woodbury`). Blocks, modes and the ``all_reduce`` hook as in :mod:`kfac.mfac.fisher`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .woodbury import FLAT_BLOCK, AllReduce, BlockFisher, BlockMode, GramFactor, Vectors, check_damping

__all__ = ["StaticFisher"]


class StaticFisher(BlockFisher):
    """Static M-FAC: a fixed set of ``k`` gradients and fixed ``λ``; ``F = λ I + (1/k) G^T G``.

    Setup, O(d k^2): ``M = kλI + G G^T = L L^T`` (float64) and ``B^T = L^{-1} G`` (``k x d``, stored in the working
    dtype; ``G`` itself is not kept). Then ``F^{-1} v = (v - B (B^T v)) / λ`` in O(d k) and
    ``diag(F^{-1}) = (1 - rowsum(B ∘ B)) / λ`` in O(d k).

    Args:
        grads: ``{name: (k, *block_shape) tensor}`` (the same ``k >= 1`` for every block; dtype and device are
            taken from these) or one ``(k, d)`` tensor (a single block named ``"params"``). Under sharding, only
            this rank's blocks (at least one).
        damping: ``λ > 0``. blocks / all_reduce: as for :class:`SlidingWindowFisher`; in global mode the
            constructor issues one ``k x k`` reduction (the Gram matrix) and each :meth:`ihvp` one of ``k``.
    """

    def __init__(
        self,
        grads: Mapping[str, Tensor] | Tensor,
        *,
        damping: float,
        blocks: BlockMode = "global",
        all_reduce: AllReduce | None = None,
    ) -> None:
        if isinstance(grads, Tensor):
            if grads.dim() != 2:
                raise ValueError(f"a flat gradient matrix must be (k, d), got shape {tuple(grads.shape)}")
            grads = {FLAT_BLOCK: grads}
        if not isinstance(grads, Mapping) or not grads:
            raise ValueError(
                "grads must be a non-empty mapping of block name -> (k, *shape) tensor, or a (k, d) tensor"
            )
        first = next(iter(grads.values()))
        if not isinstance(first, Tensor) or first.dim() < 1 or first.shape[0] < 1:
            raise ValueError("each block of grads must be a (k, *shape) tensor with k >= 1")
        k = first.shape[0]
        for name, g in grads.items():
            if not isinstance(g, Tensor) or g.dim() < 1 or g.shape[0] != k:
                raise ValueError(f"grads[{name!r}] must be a ({k}, *shape) tensor like the first block")
            if g.dtype != first.dtype or g.device != first.device:
                raise ValueError(
                    f"grads[{name!r}] has dtype/device {g.dtype}/{g.device}, expected {first.dtype}/{first.device}"
                )
        super().__init__(
            {name: tuple(g.shape[1:]) for name, g in grads.items()},
            blocks=blocks,
            all_reduce=all_reduce,
            dtype=first.dtype,
            device=first.device,
        )
        self.damping = check_damping(damping)
        self._k = k
        mats = {name: g.reshape(k, -1) for name, g in grads.items()}
        gram = torch.zeros(len(self._groups), k, k, dtype=torch.float64, device=self.device)
        for j, names in enumerate(self._groups):
            for name in names:
                g64 = mats[name].to(torch.float64)
                gram[j] += g64 @ g64.mT
        gram = self._reduce(gram)
        if not bool(torch.isfinite(gram).all()):
            bad = [name for name, g in mats.items() if not bool(torch.isfinite(g).all())]
            where = f"in block(s) {bad}" if bad else "(overflow, or a non-finite gradient on another rank)"
            raise ValueError(f"non-finite gradient {where}")
        self._bt: dict[str, Tensor] = {}
        for j, names in enumerate(self._groups):
            factor = GramFactor(gram[j], self.damping)
            for name in names:
                self._bt[name] = factor.whiten(mats[name].to(torch.float64)).to(self.dtype)

    @property
    def num_grads(self) -> int:
        """Number ``k`` of gradients (= :attr:`count`)."""
        return self._k

    @property
    def count(self) -> int:
        return self._k

    @property
    def nbytes(self) -> int:
        """Bytes held (the ``k x d`` whitened gradients ``B^T``)."""
        return sum(t.numel() * t.element_size() for t in self._bt.values())

    def _check_damping_arg(self, damping: float | None) -> None:
        if damping is not None and check_damping(damping) != self.damping:
            raise ValueError(f"StaticFisher is factorised for damping={self.damping}; build a new one for {damping}")

    def partial_projection(self, vectors: Vectors) -> Tensor:
        """This rank's share of ``B^T v``: (groups, k) float64; O(d k)."""
        flat = self._inputs(vectors, "vectors")
        proj = torch.zeros(len(self._groups), self._k, dtype=torch.float64, device=self.device)
        for j, names in enumerate(self._groups):
            for name in names:
                proj[j] += (self._bt[name] @ flat[name]).to(torch.float64)
        return proj

    def finish_ihvp(self, vectors: Vectors, projection: Tensor, *, damping: float | None = None) -> Vectors:
        """``F^{-1} v = (v - B c) / λ`` given ``c = B^T v`` summed over ranks; O(d k)."""
        self._check_damping_arg(damping)
        flat = self._inputs(vectors, "vectors")
        shape = (len(self._groups), self._k)
        if tuple(projection.shape) != shape:
            raise ValueError(f"projection has shape {tuple(projection.shape)}, expected {shape}")
        out = {}
        for j, names in enumerate(self._groups):
            c = projection[j].to(device=self.device, dtype=self.dtype)
            for name in names:
                out[name] = torch.addmv(flat[name], self._bt[name].mT, c, alpha=-1) / self.damping
        return self._layout.restore(vectors, out)

    def diag(self, *, damping: float | None = None) -> dict[str, Tensor]:
        """``diag(F^{-1}) = (1 - rowsum(B ∘ B)) / λ`` per held block, in the block's shape; O(d k), no reduction."""
        self._check_damping_arg(damping)
        return {
            name: ((1 - bt.square().sum(0)) / self.damping).reshape(self._layout.shapes[name])
            for name, bt in self._bt.items()
        }
