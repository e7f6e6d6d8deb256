"""Checkpoints: written atomically by rank 0, loaded by every rank at any world size, with every rank's RNG
states; what may and may not change when a run is resumed."""

from __future__ import annotations

import argparse
import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.env import Env, gather_objects

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)\.pt$")
# flags that must not change when a run is resumed: they change what a step or the model is
RESUME_STRICT = ("model", "optimizer", "batch_size", "seed", "width", "norm", "kfac_method", "num_classes",
                 "image_size", "data", "mfac_blocks")


def jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}



def checkpoints(directory: Path | None) -> list[tuple[int, Path]]:
    """``(step, path)`` of the complete checkpoints in ``directory``, oldest first."""
    if directory is None or not directory.is_dir():
        return []
    found = [(int(m.group(1)), directory / name) for name in os.listdir(directory)
             if (m := CHECKPOINT_RE.match(name))]
    return sorted(found)


def rng_state(env: Env) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if env.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(env.device)
    return state


def set_rng_state(env: Env, state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if env.device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], env.device)


class Checkpointer:
    def __init__(self, args: argparse.Namespace, env: Env) -> None:
        self.dir, self.keep, self.env = args.checkpoint_dir, args.keep_checkpoints, env
        self.last_saved: int | None = None
        if self.dir is not None and env.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(".checkpoint-*.tmp"):  # left by a run killed while saving
                stale.unlink(missing_ok=True)

    def save(self, step: int, state: Callable[[], dict[str, Any]]) -> None:
        """Collective (``state()`` gathers K-FAC/M-FAC state and RNG states from every rank); rank 0 writes."""
        if self.dir is None or self.last_saved == step:
            return
        payload = state()
        self.last_saved = step
        if not self.env.main:
            return
        final = self.dir / f"checkpoint-{step:08d}.pt"
        tmp = self.dir / f".{final.name}.{os.getpid()}.tmp"
        torch.save(payload, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)  # atomic: a kill leaves the previous checkpoint, never a partial one
        if self.keep:
            for _, old in checkpoints(self.dir)[:-self.keep]:
                old.unlink(missing_ok=True)

    def latest(self) -> tuple[Path | None, dict[str, Any] | None]:
        """Rank 0 picks the newest checkpoint, every rank loads it (to CPU; tensors move with load_state_dict)."""
        if self.dir is None:
            return None, None
        path = checkpoints(self.dir)[-1][1] if self.env.main and checkpoints(self.dir) else None
        path = gather_objects(self.env, path)[0]
        if path is None:
            return None, None
        # our own file (not an untrusted download): it also holds numpy/python RNG states, hence weights_only=False
        return path, torch.load(path, map_location="cpu", weights_only=False)



def check_resume(args: argparse.Namespace, state: dict[str, Any], env: Env) -> None:
    saved = state.get("config", {})
    now = jsonable(vars(args))
    bad = [f"--{k.replace('_', '-')}: saved {saved[k]!r}, now {now[k]!r}" for k in RESUME_STRICT
           if k in saved and k in now and saved[k] != now[k]]
    if bad:
        raise SystemExit("cannot resume: the checkpoint was written with other settings that change what a step "
                         "is:\n  " + "\n  ".join(bad) + "\n(use another --checkpoint-dir to start a new run)")
    ignore = {"max_steps", "checkpoint_dir", "log_dir", "workers", "no_progress", "threads", "checkpoint_every",
              "keep_checkpoints", "dist_timeout"}
    for k in sorted(set(saved) & set(now) - set(RESUME_STRICT) - ignore):
        if saved[k] != now[k]:
            env.print(f"note: --{k.replace('_', '-')} changed since the checkpoint: {saved[k]!r} -> {now[k]!r}")

