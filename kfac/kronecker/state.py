"""Checkpoints of a K-FAC preconditioner: a local ``state_dict`` (never a collective; a shard under a sharded
plan), the collective ``consolidated_state_dict`` (complete on every rank, loadable at any world size), and
loading with validation (nothing changes unless the whole state fits)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..tracking import rename_map
from . import keyed

if TYPE_CHECKING:
    from ..distributed.comm import Communicator
    from ..planner import Plan
    from .engine import CurvatureEngine
    from .layer import LayerState

__all__ = ["StateMixin"]

logger = logging.getLogger("kfac")


class StateMixin:
    """The state methods of :class:`kfac.KFACPreconditioner` (which provides the attributes declared here)."""

    engine: "CurvatureEngine"
    _comm: "Communicator"
    _layers: "list[LayerState]"
    _model: Any
    _seen: set[str]
    _warned_shard: bool
    _reported_unused: bool
    _checked_execution: bool
    _capture_step: int | None
    _written: tuple[tuple[Any, int], ...]
    steps: int
    skipped_steps: int
    not_executed: list[str]
    method: Any

    if TYPE_CHECKING:
        @property
        def layers(self) -> list[str]: ...

        @property
        def plan(self) -> "Plan": ...

        @property
        def rank(self) -> int: ...

        @property
        def world_size(self) -> int: ...

        def _drop_unexecuted(self, names: Iterable[str]) -> None: ...

        def discard_pending_statistics(self) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """Step counters and the factors and decompositions this rank holds (tensors referenced, not copied).

        Never communicates, so ``if rank == 0: torch.save(opt.state_dict(), path)`` is safe. When this rank holds
        everything (a single process, or ``strategy="comm-opt"``) the state is complete and loads at any world
        size; otherwise it is this rank's *shard* (``state["shard"]`` names the rank, world size and plan) and loads
        only into the same rank of the same plan -- for a portable checkpoint call :meth:`consolidated_state_dict`
        on every rank instead.
        """
        complete = self.engine.holds_everything(self.layers)
        shard = None if complete or not self._comm.enabled else {
            "rank": self.rank, "world_size": self.world_size, "plan": self.plan.digest()}
        if shard is not None and not self._warned_shard:
            self._warned_shard = True
            logger.warning("kfac: the 'kfac' entry of state_dict() on rank %d holds only this rank's shard of the "
                           "K-FAC state (strategy %r): with torch.save, resume it with every rank loading its own "
                           "file at the same world size, or save consolidated_state_dict() (a collective) for a "
                           "portable checkpoint; torch.distributed.checkpoint (get_state_dict + dcp.save on every "
                           "rank) keeps the complete state at any world size", self.rank, self.plan.strategy)
        return self._state(self.engine.store.state_dict(), shard)

    def consolidated_state_dict(self) -> dict[str, Any]:
        """The complete state on every rank, loadable at any world size. A collective: every rank must call it
        (each factor's owner sends its state); in a single process it equals :meth:`state_dict`."""
        return self._state(self.engine.consolidated_store_state(), None)

    def _state(self, store: dict[str, Any], shard: dict[str, Any] | None) -> dict[str, Any]:
        return {"steps": self.steps, "skipped_steps": self.skipped_steps, "layers": self.layers,
                "not_executed": list(self.not_executed), "method": self.method.name, "store": store,
                "seen": sorted(self._seen), "shard": shard}

    def keyed_state_dict(self) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """The state in :mod:`kfac.kronecker.keyed`'s layout (for DCP): per layer, the fixed-shape pieces this rank
        writes; and the step counters (the same on every rank). Never communicates."""
        pieces = {layer.name: keyed.write(layer.entry, self.method, self.plan, self.rank,
                                          dtype=self.engine.factor_dtype, device=layer.adapter.weight.device)
                  for layer in self._layers}
        return pieces, {"steps": self.steps, "skipped_steps": self.skipped_steps, "method": self.method.name}

    def load_keyed_state_dict(self, pieces: Mapping[str, Mapping[str, Any]], meta: Mapping[str, Any]) -> None:
        """Restore :meth:`keyed_state_dict` output saved at any world size and plan (a collective: every rank
        passes the pieces its own :meth:`keyed_state_dict` asked for)."""
        if meta.get("method", self.method.name) != self.method.name:
            raise ValueError(f"K-FAC state was saved with method={meta['method']!r}, this is {self.method.name!r}")
        store = keyed.gather({layer.name: layer.entry for layer in self._layers}, self.method, self.plan, self._comm,
                             pieces, dtype=self.engine.factor_dtype,
                             devices={layer.name: layer.adapter.weight.device for layer in self._layers})
        self.load_state_dict({"steps": meta["steps"], "skipped_steps": meta.get("skipped_steps", 0),
                              "layers": self.layers, "not_executed": [], "method": self.method.name, "store": store,
                              "seen": self.layers, "shard": None})

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` / :meth:`consolidated_state_dict` output; the tracked layers must match
        (clear error otherwise)."""
        state = self._with_new_blocks(self._renamed(state), warn=True)
        self.validate_state_dict(state)
        self._drop_unexecuted(state.get("not_executed", ()))
        self.engine.load_store_state(state["store"],
                                     {layer.name: layer.adapter.weight.device for layer in self._layers})
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
        state = self._with_new_blocks(self._renamed(state))
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
        self.engine.validate_store_state(state["store"], [layer.entry for layer in self._layers
                                                          if layer.name in expected])

    def _with_new_blocks(self, state: Mapping[str, Any], warn: bool = False) -> Mapping[str, Any]:
        """``state`` with fresh entries for tracked layers of a kind earlier versions did not track
        (:attr:`kfac.ModuleAdapter.absent_from_old_checkpoints`) that it lacks: such a checkpoint loads, they
        start from no factors (their plain gradient until their first factor update)."""
        saved = set(state.get("layers", ())) | set(state.get("not_executed", ()))
        new = [layer for layer in self._layers if layer.name not in saved
               and layer.adapter.absent_from_old_checkpoints and "layers" in state and "store" in state]
        if not new:
            return state
        if warn:
            logger.warning("kfac: the checkpoint has no state for %s (a kind of block earlier versions did not "
                           "track); they start from fresh factors", [layer.name for layer in new])
        entries = dict(state["store"]["entries"])
        for layer in new:
            entries[layer.name] = {"meta": {**layer.entry.meta(), "num_updates": 0, "owner": None}, "tensors": {}}
        return {**state, "layers": [*state["layers"], *(layer.name for layer in new)],
                "store": {**state["store"], "entries": entries}}

    def _renamed(self, state: Mapping[str, Any]) -> Mapping[str, Any]:
        """``state`` with its layer names translated to this model's where they differ only by wrapper modules
        (saved from a DDP-, compile- or FSDP1-wrapped model, loaded into the unwrapped one, or the reverse)."""
        model = self._model()
        if model is None or "layers" not in state or "store" not in state:
            return state
        saved = [*state["layers"], *state.get("not_executed", ())]
        names = rename_map(saved, (n for n, _ in model.named_modules()))
        if not names:
            return state
        entries = {names.get(n, n): e for n, e in state["store"]["entries"].items()}
        return {**state, "layers": [names[n] for n in state["layers"]],
                "not_executed": [names[n] for n in state.get("not_executed", ())],
                "seen": [names.get(n, n) for n in state.get("seen", ())],
                "store": {**state["store"], "entries": entries}}
