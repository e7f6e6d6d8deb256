"""One configuration of the step-overhead benchmark: ours in this process (:class:`Runner`), KAISA's in a worker
process (:class:`KaisaRunner`, see ``benchmarks/cpu/kaisa_worker.py``); :func:`time_window` times a window of steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kfac
from benchmarks.common import REPO_ROOT, build_model, count_events, gc_paused
from benchmarks.cpu.overhead.configs import KFAC_KWARGS, SGD_KWARGS, TRUNCATE, Config

KAISA_WORKER = Path(__file__).resolve().parents[1] / "kaisa_worker.py"


@dataclass
class Runner:
    """A model, its optimizer and a cursor into the shared batch pool."""

    config: Config
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: list[tuple[Tensor, Tensor]]
    cursor: int = 0
    steps: int = 0

    def step(self) -> None:
        x, y = self.batches[self.cursor]
        self.cursor = (self.cursor + 1) % len(self.batches)
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(x), y).backward()
        self.optimizer.step()
        self.steps += 1

    @property
    def preconditioner(self) -> kfac.KFACPreconditioner | None:
        return self.optimizer.preconditioner if isinstance(self.optimizer, kfac.KFAC) else None


class KaisaRunner:
    """KAISA's preconditioner for one configuration, in its own worker process (see ``kaisa_worker.py``)."""

    def __init__(self, config: Config, kaisa: Path, payload: Path, threads: int) -> None:
        self.config = config
        spec = {"threads": threads, "payload": str(payload), "sgd": SGD_KWARGS, "kfac": KFAC_KWARGS,
                "factor_update_steps": config.factor_update_steps, "inv_update_steps": config.inv_update_steps,
                "method": config.method.removeprefix("kaisa-")}
        env = {**os.environ, "PYTHONPATH": str(kaisa)}
        self.proc = subprocess.Popen([sys.executable, str(KAISA_WORKER),
                                      json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=str(kaisa))
        hello = self._read()
        if "error" in hello:
            raise RuntimeError(f"KAISA worker for {config.key} failed to start:\n{hello['error']}")
        origin = Path(hello["kaisa"]).resolve()
        if REPO_ROOT in origin.parents:
            raise RuntimeError(f"--kaisa {kaisa}: the worker imported this repository's kfac ({origin})")
        self.origin, self.version = str(origin.parent), hello.get("version")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"KAISA worker for {self.config.key} exited (code {self.proc.wait()})")
        out: dict[str, Any] = json.loads(line)
        return out

    def run(self, steps: int) -> dict[str, Any]:
        """Run ``steps`` steps in the worker (garbage collector paused there); its ``seconds`` and ``first_step``."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": "steps", "steps": steps}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()



def make_runner(config: Config, batches: list[tuple[Tensor, Tensor]], *, quick: bool, seed: int) -> Runner:
    model = build_model(quick, seed).train()
    base = torch.optim.SGD(model.parameters(), **SGD_KWARGS)
    if config.method == "sgd":
        opt: torch.optim.Optimizer = base
    else:
        extra = TRUNCATE if config.method == "eigen-truncated" else {}
        opt = kfac.KFAC(model, base, factor_update_steps=config.factor_update_steps,
                        inv_update_steps=config.inv_update_steps, method=config.method.split("-")[0],
                        **KFAC_KWARGS, **extra)
    return Runner(config=config, model=model, optimizer=opt, batches=batches)


def time_window(runner: Runner | KaisaRunner, steps: int) -> dict[str, Any]:
    """Run ``steps`` training steps with the garbage collector paused; return the wall time and schedule facts."""
    if isinstance(runner, KaisaRunner):
        out = runner.run(steps)
        cfg = runner.config
        return {"seconds": out["seconds"], "steps": steps, "ms_per_step": 1e3 * out["seconds"] / steps,
                "first_step": out["first_step"], "load_average_1min_after": os.getloadavg()[0],
                "refreshes": count_events(out["first_step"], steps, cfg.inv_update_steps),
                "factor_updates": count_events(out["first_step"], steps, cfg.factor_update_steps)}
    pre = runner.preconditioner
    start = pre.steps if pre is not None else runner.steps
    skipped_before = pre.skipped_steps if pre is not None else 0
    with gc_paused():
        t0 = time.perf_counter()
        for _ in range(steps):
            runner.step()
        seconds = time.perf_counter() - t0
    record: dict[str, Any] = {"seconds": seconds, "steps": steps, "ms_per_step": 1e3 * seconds / steps,
                              "first_step": start, "load_average_1min_after": os.getloadavg()[0]}
    if pre is not None:
        cfg = runner.config
        record["refreshes"] = count_events(start, steps, cfg.inv_update_steps)
        record["factor_updates"] = count_events(start, steps, cfg.factor_update_steps)
        record["skipped_steps"] = pre.skipped_steps - skipped_before
    return record


