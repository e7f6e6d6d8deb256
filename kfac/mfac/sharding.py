"""Where M-FAC's windows live in a distributed run, how results reach every rank, and the state dict.

Blocks are assigned to ranks by LPT on their size ``d_b`` (ties by name): the owner of a block holds its window
(``m x d_b``) and computes its part of every product. :meth:`Sharding.exchange` gives every rank the owners' tensors
(one broadcast bucket per source rank). The state dict is either a rank's *shard* (its own windows, loadable only
by the same rank of the same assignment) or *consolidated*: every block's window ``m x d_b`` and the float64 Gram
matrices (``groups x m x m``: one group in global mode, one per block otherwise), loadable at any world size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..distributed.comm import Communicator
from ..planner import lpt
from .blocks import Block

__all__ = ["STATE_KEYS", "Sharding"]

STATE_KEYS = frozenset({"steps", "skipped_steps", "blocks", "block_shapes", "mode", "num_grads", "position", "count",
                        "window", "gram"})
"""The keys of a consolidated M-FAC state (besides ``method``)."""


@dataclass(eq=False)
class Sharding:
    """The blocks of one M-FAC preconditioner over the ranks of ``comm`` (``owner``: block -> rank); ``mode`` is
    ``"global"`` or ``"per_layer"``, ``num_grads`` the window length ``m``, ``dtype``/``device`` the window's."""

    comm: Communicator
    blocks: list[Block]
    owner: dict[str, int]
    mode: str
    num_grads: int
    dtype: torch.dtype
    device: torch.device
    owned: list[Block] = field(init=False)

    def __post_init__(self) -> None:
        self.owned = [b for b in self.blocks if self.owner[b.name] == self.comm.rank]

    @classmethod
    def by_lpt(cls, comm: Communicator, blocks: list[Block], *, mode: str, num_grads: int, dtype: torch.dtype,
               device: torch.device) -> Sharding:
        """Assign ``blocks`` to the ranks of ``comm`` by LPT on ``d_b`` (ties by name); all to rank 0 if alone."""
        names = [b.name for b in blocks]
        sizes = [b.size for b in blocks]
        world = comm.world_size
        owner = dict(zip(names, lpt(sizes, world, names=names))) if world > 1 else dict.fromkeys(names, 0)
        return cls(comm, blocks, owner, mode, num_grads, dtype, device)

    @property
    def layers(self) -> list[str]:
        return [b.name for b in self.blocks]

    def shard_id(self) -> dict[str, Any]:
        """What a shard is only valid for: this rank of this world size and assignment."""
        return {"rank": self.comm.rank, "world_size": self.comm.world_size, "owner": self.owner, "mode": self.mode,
                "num_grads": self.num_grads}

    # -- exchange -----------------------------------------------------------------------------------------------
    def _broadcast(self, names: Sequence[str],
                   payloads: Sequence[tuple[Mapping[str, Tensor], Callable[[Block], Tensor]]], category: str,
                   ) -> list[dict[str, Tensor]]:
        """For each source rank in order and each ``(local, empty)`` payload in order, one broadcast bucket of the
        source's blocks among ``names``: this rank sends ``local[name]``, receives into ``empty(block)``."""
        wanted = set(names)
        outs: list[dict[str, Tensor]] = [{} for _ in payloads]
        for src in range(self.comm.world_size):
            mine = [b for b in self.blocks if self.owner[b.name] == src and b.name in wanted]
            if not mine:
                continue
            for (local, empty), out in zip(payloads, outs):
                tensors = [local[b.name] for b in mine] if src == self.comm.rank else [empty(b) for b in mine]
                for b, t in zip(mine, self.comm.broadcast(tensors, src=src, category=category)):
                    out[b.name] = t
        return outs

    def exchange(self, local: Mapping[str, Tensor], names: list[str], category: str) -> dict[str, Tensor]:
        """The tensors of blocks ``names`` on every rank (block shape, window dtype): each owner broadcasts its
        blocks' tensors from ``local`` (one bucket per source rank). Alone: ``local`` as it is."""
        if not self.comm.enabled:
            return dict(local)
        wanted = set(names)
        sent = {b.name: local[b.name].reshape(b.shape).to(self.dtype) for b in self.owned if b.name in wanted}
        return self._broadcast(names, [(sent, lambda b: torch.empty(b.shape, dtype=self.dtype,
                                                                    device=self.device))], category)[0]

    # -- state --------------------------------------------------------------------------------------------------
    def consolidate(self, local: Mapping[str, Any]) -> tuple[dict[str, Tensor], Tensor]:
        """Every block's window (``{name: m x d_b}``, in block order) and the Gram matrices (``groups x m x m``)
        from this rank's :meth:`SlidingWindowFisher.state_dict` ``local``; collective when distributed (category
        ``"state"``). Tensors are copies."""
        per_block = self.mode == "per_layer"
        m = self.num_grads
        windows = {b.name: local[f"window.{b.name}"] for b in self.owned}
        grams = {b.name: local["gram"][i] for i, b in enumerate(self.owned)} if per_block else {}
        if self.comm.enabled:
            payloads = [(windows, lambda b: torch.empty(m, b.size, dtype=self.dtype, device=self.device))]
            if per_block:  # a second bucket: the Gram matrices are float64 whatever the window dtype
                payloads.append((grams, lambda b: torch.empty(m, m, dtype=torch.float64, device=self.device)))
            received = self._broadcast(self.layers, payloads, "state")
            windows = {**windows, **{n: t.clone() for n, t in received[0].items()}}
            if per_block:
                grams = {**grams, **{n: t.clone() for n, t in received[1].items()}}
        gram = torch.stack([grams[n] for n in self.layers]) if per_block else local["gram"]
        return {n: windows[n] for n in self.layers}, gram

    def validate(self, state: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` if ``state`` (a shard or a consolidated state) does not fit these blocks."""
        if state.get("shard") is not None:
            if state["shard"] != self.shard_id():
                raise ValueError(f"this M-FAC state is the shard of rank {state['shard'].get('rank')} of "
                                 f"{state['shard'].get('world_size')} (saved by state_dict()); it loads only into "
                                 f"that rank of the same block assignment (this is rank {self.comm.rank} of "
                                 f"{self.comm.world_size}). Save consolidated_state_dict() on every rank to resume "
                                 "elsewhere")
            return
        missing = STATE_KEYS - set(state)
        if missing:
            raise ValueError(f"M-FAC state is missing keys {sorted(missing)}")
        if list(state["blocks"]) != self.layers:
            expected, got = set(self.layers), set(state["blocks"])
            raise ValueError(f"M-FAC state was saved for different blocks: missing {sorted(expected - got)}, "
                             f"unexpected {sorted(got - expected)}" + ("" if expected != got else " (order differs)"))
        shapes = {n: tuple(s) for n, s in state["block_shapes"].items()}
        bad = {b.name: (shapes.get(b.name), b.shape) for b in self.blocks if shapes.get(b.name) != b.shape}
        if bad:
            raise ValueError(f"M-FAC state has different block shapes {{block: (saved, expected)}}: {bad}")
        m = self.num_grads
        if state["num_grads"] != m:
            raise ValueError(f"M-FAC state has num_grads={state['num_grads']}, this preconditioner has {m}")
        if state["mode"] != self.mode:
            raise ValueError(f"M-FAC state has blocks={state['mode']!r}, this preconditioner has {self.mode!r}")
        position, count = state["position"], state["count"]
        if not isinstance(position, int) or not isinstance(count, int) or not (0 <= count <= m and 0 <= position < m) \
                or (count < m and position != count):
            raise ValueError(f"M-FAC state has invalid position={position!r} / count={count!r} for num_grads={m}")
        groups = 1 if self.mode == "global" else len(self.blocks)
        tensors: dict[str, tuple[Any, tuple[int, ...]]] = {
            f"window[{b.name!r}]": (state["window"].get(b.name), (m, b.size)) for b in self.blocks}
        tensors["gram"] = (state["gram"], (groups, m, m))
        for key, (t, shape) in tensors.items():
            if not isinstance(t, Tensor) or tuple(t.shape) != shape:
                found = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"M-FAC state {key} must be a tensor of shape {shape}, got {found}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"M-FAC state {key} has non-finite entries")

    def local_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """This rank's share of a consolidated ``state``, in :class:`SlidingWindowFisher`'s ``state_dict`` format."""
        gram = state["gram"].to(device=self.device, dtype=torch.float64)
        if self.mode == "per_layer":
            index = {n: i for i, n in enumerate(self.layers)}
            gram = gram[[index[b.name] for b in self.owned]]
        local: dict[str, Any] = {"num_grads": int(state["num_grads"]), "position": int(state["position"]),
                                 "count": int(state["count"]), "gram": gram}
        for b in self.owned:
            local[f"window.{b.name}"] = state["window"][b.name].to(device=self.device, dtype=self.dtype)
        return local
