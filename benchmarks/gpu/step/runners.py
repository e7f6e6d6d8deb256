"""One configuration of the GPU step-time benchmark (model, optimizer, autocast, data pool), a per-step clock
(CUDA events, or ``perf_counter`` on CPU), and building and warming up every configuration."""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kfac
from benchmarks.common import log
from benchmarks.gpu.step.configs import KFAC_KWARGS, MFAC_KWARGS, SGD_KWARGS, Setup


class StepClock:
    """Marks between steps; ``elapsed_ms()`` gives the per-step times (CUDA events: no host sync per step)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def elapsed_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [1e3 * (b - a) for a, b in zip(self.marks, self.marks[1:])]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)



@dataclass
class Runner:
    name: str
    kind: str  # sgd | kfac-eigen | kfac-inverse | ekfac | mfac
    backend: str | None  # kfac.ext backend to run under (None: leave the process default)
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: list[tuple[Tensor, Tensor]]
    autocast: torch.dtype | None
    scaler: Any | None
    channels_last: bool
    schedule: tuple[int, int] | None
    cursor: int = 0
    steps: int = 0
    state_bytes: int = 0
    peaks_above_start: list[int] = field(default_factory=list)

    @property
    def preconditioner(self) -> Any | None:
        return getattr(self.optimizer, "preconditioner", None)

    def step_index(self) -> int:
        pre = self.preconditioner
        return pre.steps if pre is not None and hasattr(pre, "steps") else self.steps

    def context(self) -> contextlib.AbstractContextManager[Any]:
        return kfac.ext.backend(self.backend) if self.backend is not None else contextlib.nullcontext()

    def step(self) -> None:
        x, y = self.batches[self.cursor]
        self.cursor = (self.cursor + 1) % len(self.batches)
        self.optimizer.zero_grad(set_to_none=True)
        if self.autocast is not None:
            with torch.autocast(device_type=x.device.type, dtype=self.autocast):
                loss = F.cross_entropy(self.model(x), y)
        else:
            loss = F.cross_entropy(self.model(x), y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.steps += 1

    def kind_of_step(self, index: int) -> str:
        """``refresh``, ``factor_update`` or ``plain`` for the step with this preconditioner step index."""
        if self.schedule is None:
            return "plain"
        fus, ius = self.schedule
        if index % ius == 0:
            return "refresh"
        return "factor_update" if index % fus == 0 else "plain"


def build_model(setup: Setup, seed: int, quick: bool) -> nn.Module:
    import torchvision

    torch.manual_seed(seed)
    if quick:
        return torchvision.models.resnet18(num_classes=setup.num_classes)
    return torchvision.models.resnet50(weights=None)


def make_batches(setup: Setup, n: int, seed: int, device: torch.device, channels_last: bool
                 ) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(setup.batch, 3, setup.image, setup.image, generator=g).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append((x, torch.randint(0, setup.num_classes, (setup.batch,), generator=g).to(device)))
    return out


def make_runner(name: str, kind: str, backend: str | None, setup: Setup, batches: list[tuple[Tensor, Tensor]], *,
                device: torch.device, amp: str | None, channels_last: bool, seed: int, quick: bool) -> Runner:
    model = build_model(setup, seed, quick).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[amp]
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    base = torch.optim.SGD(model.parameters(), **SGD_KWARGS)
    schedule: tuple[int, int] | None = None
    if kind == "sgd":
        opt: torch.optim.Optimizer = base
    elif kind in ("kfac-eigen", "kfac-inverse", "ekfac"):
        fus, ius = setup.schedule
        schedule = setup.schedule
        kw: dict[str, Any] = dict(factor_update_steps=fus, inv_update_steps=ius, grad_scaler=scaler,
                                  skip_layers=list(setup.skip_layers), **KFAC_KWARGS)
        if kind == "ekfac":
            opt = kfac.EKFAC(model, base, **kw)
        else:
            opt = kfac.KFAC(model, base, method=kind.split("-", 1)[1], **kw)
    elif kind == "mfac":
        opt = kfac.MFAC(model, base, **{**MFAC_KWARGS, "num_grads": setup.mfac_num_grads},
                        skip_layers=list(setup.skip_layers))
    else:
        raise ValueError(f"unknown configuration {kind!r}")
    return Runner(name=name, kind=kind, backend=backend, model=model, optimizer=opt, batches=batches,
                  autocast=autocast, scaler=scaler, channels_last=channels_last, schedule=schedule)




def build_and_warm_up(names: list[tuple[str, str, str | None]], setup: Setup, batches: list[tuple[Tensor, Tensor]],
                      *, device: torch.device, amp: str | None, channels_last: bool, seed: int, quick: bool,
                      warmup: int) -> tuple[list[Runner], dict[str, str]]:
    """Every configuration ``(name, kind, ext backend)`` built and run for ``warmup`` untimed steps, its persistent
    CUDA memory recorded; returns the runners and, by name, why the others failed."""
    runners: list[Runner] = []
    failed: dict[str, str] = {}
    for name, kind, backend in names:
        gc.collect()
        sync(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        r = make_runner(name, kind, backend, setup, batches, device=device, amp=amp,
                        channels_last=channels_last, seed=seed, quick=quick)
        t0 = time.perf_counter()
        try:
            with r.context():
                for _ in range(warmup):
                    r.step()
            sync(device)
        except Exception as exc:  # noqa: BLE001 - record and go on with the other configurations
            failed[name] = f"warm-up: {type(exc).__name__}: {exc}"
            log(f"FAILED {name}: {failed[name]}")
            del r
            gc.collect()
            continue
        gc.collect()
        if device.type == "cuda":
            r.state_bytes = torch.cuda.memory_allocated(device) - before
        log(f"warm-up {name:<20s} {warmup} steps in {time.perf_counter() - t0:6.1f} s")
        runners.append(r)
    return runners, failed
