"""What the torchrun ResNet examples share: flags, distributed set-up, data sharding, optimizer and LR schedule
construction, checkpointing, logging and the train/eval loop. The scripts (``torch_cifar10_resnet.py``,
``torch_imagenet_resnet.py``) only add their data sets, models and default hyperparameters.

Conventions (one place for each):

* ``--batch-size`` is the *global* batch: each of the ``N`` processes gets ``batch_size / N`` examples per step.
  Together with :class:`EpochSampler` (a ``DistributedSampler`` with ``drop_last``) the examples of global step
  ``k`` of an epoch are positions ``[k B, (k + 1) B)`` of that epoch's permutation whatever ``N`` is, so the number
  of steps per epoch, the data of every step and the LR schedule do not depend on the number of processes, and a
  checkpoint resumes at any ``--nproc_per_node`` (K-FAC's and M-FAC's state load at any world size too).
* Data augmentation is seeded per example by ``(seed, epoch, index)`` (:class:`SeededDataset`), so it depends
  neither on the number of processes nor on the number of loader workers nor on where a run was resumed.
* The LR schedule is per optimizer step: linear warm-up over ``--warmup-epochs``, then ``cosine``, ``multistep``
  (``--lr-milestones`` epochs, ``--lr-decay``) or ``constant``, over ``--epochs`` epochs. ``--max-steps`` only
  stops the run early; it does not change the schedule (so a run stopped and restarted with a larger
  ``--max-steps`` is the same as one uninterrupted run).
* A checkpoint (``checkpoint-<step>.pt`` in ``--checkpoint-dir``) holds the model, the optimizer (K-FAC/M-FAC state
  included), the LR scheduler, the AMP grad scaler, the step and every rank's RNG states; it is written by rank 0
  to a temporary file and renamed (atomic), at the end of every epoch, every ``--checkpoint-every`` steps and at
  the end of the run. At start the latest one is loaded if present. Every rank reads it: in a multi-node job the
  directory must be on a shared file system.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import kfac  # noqa: E402

__all__ = ["Data", "Env", "EpochSampler", "SeededDataset", "banner", "make_parser", "norm_layer", "run"]

OPTIMIZERS = ("sgd", "kfac", "ekfac", "mfac")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)\.pt$")
# flags that must not change when a run is resumed: they change what a step or the model is
RESUME_STRICT = ("model", "optimizer", "batch_size", "seed", "width", "norm", "kfac_method", "num_classes",
                 "image_size", "data", "mfac_blocks")


# -- data --------------------------------------------------------------------------------------------------------
@dataclass
class Data:
    """What a script's data builder returns. Items of ``train``/``test`` are ``(image tensor, int label)``;
    ``train`` must accept ``(epoch, index)`` keys (see :class:`SeededDataset`)."""

    train: Dataset
    test: Dataset
    num_classes: int
    name: str
    """Short identifier stored in checkpoints (resuming on other data is refused)."""
    description: str
    """Shown in the start-up banner: which data this run uses."""
    in_memory: bool = True
    """Decides the ``--workers`` default (0 for in-memory data, 4 otherwise)."""


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (2**63 - 1)


class SeededDataset(Dataset):
    """``base[index]`` with ``transform`` applied under a torch RNG seeded by ``(seed, epoch, index)``.

    Keys are ``(epoch, index)`` pairs (what :class:`EpochSampler` yields) or plain indices (epoch 0). The global
    RNG state of the calling process is left as it was (``torch.random.fork_rng``), so the augmentation of an
    example is the same in every process, loader worker and resumed run. ``transform`` may use torch's global RNG
    (torchvision's random transforms do)."""

    def __init__(self, base: Dataset, transform: Callable[[Any], Tensor] | None, seed: int) -> None:
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        x, y = self.base[index]
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, epoch, index))
                x = self.transform(x)
        return x, int(y)


class EpochSampler(Sampler):
    """This rank's share of one epoch, from global step ``start_step`` on, as ``(epoch, index)`` keys.

    ``DistributedSampler(shuffle=True, drop_last=True, seed=seed)`` at ``epoch``: rank ``r`` of ``W`` takes
    positions ``r, r + W, ...`` of the epoch's permutation (which does not depend on ``W``), so with ``B / W``
    examples per rank and step the ranks of global step ``k`` together take positions ``[k B, (k + 1) B)``."""

    def __init__(self, size: int, *, rank: int, world: int, seed: int, epoch: int, start_step: int,
                 local_batch: int) -> None:
        inner = DistributedSampler(range(size), num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                   drop_last=True)
        inner.set_epoch(epoch)
        self.epoch = epoch
        self.indices = list(inner)[start_step * local_batch:]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, i) for i in self.indices])

    def __len__(self) -> int:
        return len(self.indices)


def norm_layer(kind: str) -> Callable[[int], nn.Module]:
    """``batch``: BatchNorm2d (per-process batch statistics under DDP, unless ``--sync-bn``); ``group``:
    GroupNorm with ``gcd(32, channels)`` groups (per example, so independent of how the batch is split)."""
    if kind == "batch":
        return nn.BatchNorm2d
    if kind == "group":
        return lambda c: nn.GroupNorm(math.gcd(32, c), c)
    raise ValueError(f"unknown norm {kind!r}")


def banner(lines: list[str]) -> str:
    width = max(len(line) for line in lines) + 4
    bar = "=" * width
    return "\n".join([bar, *(f"| {line.ljust(width - 4)} |" for line in lines), bar])


# -- flags -------------------------------------------------------------------------------------------------------
def _milestones(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()] if text else []


def make_parser(description: str, *, kfac_damping: float = 0.003, **defaults: Any) -> argparse.ArgumentParser:
    """The flags both examples share; ``defaults`` overrides their defaults (per-script hyperparameters),
    ``kfac_damping`` is the script's K-FAC/EK-FAC damping when ``--damping`` is not given."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", type=Path, default=None, help="data set root (see the script's docstring); "
                   "without it the script's offline default is used and announced")
    g.add_argument("--workers", type=int, default=None, help="data loader workers per process "
                   "(default: 0 for in-memory data, 4 otherwise)")
    g.add_argument("--test-batch-size", type=int, default=256, help="evaluation batch per process")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=100, help="length of the run and of the LR schedule")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps in total (the schedule still spans --epochs)")
    g.add_argument("--batch-size", type=int, default=128,
                   help="GLOBAL batch per step (divided evenly among the processes)")
    g.add_argument("--lr", type=float, default=0.1, help="peak learning rate (for the global batch)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--nesterov", action="store_true")
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--warmup-epochs", type=float, default=5.0, help="linear warm-up from lr/warmup_steps to lr")
    g.add_argument("--lr-schedule", choices=("cosine", "multistep", "constant"), default="multistep")
    g.add_argument("--lr-milestones", type=_milestones, default="35,75,90",
                   help="multistep: comma-separated epochs at which the lr is multiplied by --lr-decay")
    g.add_argument("--lr-decay", type=float, default=0.1)
    g.add_argument("--seed", type=int, default=42, help="initial weights, data order and augmentation")
    g.add_argument("--amp", action="store_true",
                   help="CUDA only: float16 autocast + GradScaler (passed to K-FAC as grad_scaler=)")
    g.add_argument("--sync-bn", action="store_true", help="CUDA only: SyncBatchNorm across processes")
    g.add_argument("--norm", choices=("batch", "group"), default="batch", help="normalisation layers")
    g.add_argument("--no-cuda", action="store_true", help="run on the CPU (gloo) even if CUDA is available")
    g.add_argument("--deterministic", action="store_true", help="deterministic (slower) CUDA kernels")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    g.add_argument("--dist-timeout", type=float, default=1800.0, help="seconds before a stuck collective fails")
    g = p.add_argument_group("second-order optimizer (wraps SGD with --lr/--momentum/--weight-decay)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="kfac")
    g.add_argument("--kfac-method", choices=("eigen", "inverse"), default="eigen", help="--optimizer kfac only")
    g.add_argument("--factor-update-steps", type=int, default=10)
    g.add_argument("--inv-update-steps", type=int, default=100)
    g.add_argument("--damping", type=float, default=None,
                   help=f"K-FAC/EK-FAC/M-FAC damping (default: {kfac_damping:g} for K-FAC and EK-FAC, 1e-4 for M-FAC)")
    g.add_argument("--factor-decay", type=float, default=0.95)
    g.add_argument("--kl-clip", type=float, default=1e-3, help="0 disables the KL clipping")
    g.add_argument("--strategy", choices=("comm-opt", "mem-opt", "hybrid", "dp-kfac"), default=None,
                   help="distributed K-FAC strategy (default: the library's choice by world size; comm-opt "
                        "for EK-FAC)")
    g.add_argument("--grad-worker-fraction", type=float, default=None, help="hybrid strategy only")
    g.add_argument("--skip-layers", nargs="*", default=[], help="module names/classes/regexes K-FAC leaves alone")
    g.add_argument("--num-grads", type=int, default=32, help="M-FAC gradient window")
    g.add_argument("--mfac-blocks", choices=("global", "per_layer"), default="global",
                   help="M-FAC: one Fisher over the whole model or one per layer")
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="save every epoch (and --checkpoint-every steps); resume from the latest checkpoint here")
    g.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (0: off)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="how many to keep (0: all)")
    g.add_argument("--log-dir", type=Path, default=None, help="TensorBoard event files (rank 0)")
    g.add_argument("--log-interval", type=int, default=10, help="steps between train scalars")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.set_defaults(kfac_damping=kfac_damping, **defaults)
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size", "test_batch_size", "factor_update_steps", "inv_update_steps",
                 "num_grads", "log_interval"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_steps is not None and args.max_steps < 0:
        p.error("--max-steps must be >= 0")
    if args.checkpoint_every < 0 or args.keep_checkpoints < 0 or (args.workers or 0) < 0:
        p.error("--checkpoint-every, --keep-checkpoints and --workers must be >= 0")
    if args.warmup_epochs < 0 or not 0 <= args.label_smoothing < 1:
        p.error("--warmup-epochs must be >= 0 and --label-smoothing in [0, 1)")


# -- distributed -------------------------------------------------------------------------------------------------
@dataclass
class Env:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    distributed: bool

    @property
    def main(self) -> bool:
        return self.rank == 0

    def print(self, *a: Any) -> None:
        if self.main:
            print(*a, flush=True)


def setup(args: argparse.Namespace) -> Env:
    """Under torchrun (``WORLD_SIZE`` set): one process group (NCCL with one GPU per local rank, else gloo);
    under plain ``python``: one process, no process group."""
    use_cuda = torch.cuda.is_available() and not args.no_cuda
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if use_cuda:
        torch.backends.cudnn.benchmark = not args.deterministic
        torch.backends.cudnn.deterministic = args.deterministic
    if args.threads:
        torch.set_num_threads(args.threads)
    if "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        return Env(0, 1, 0, device, False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo",
                            timeout=datetime.timedelta(seconds=args.dist_timeout),
                            **({"device_id": device} if use_cuda else {}))
    return Env(dist.get_rank(), dist.get_world_size(), local_rank, device, True)


def teardown(env: Env) -> None:
    """Wait for every rank (rank 0 may still be writing the last checkpoint: a rank that destroys its gloo groups
    and exits while a peer is still connected can abort), then destroy the process groups."""
    if env.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_sum(env: Env, values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    if env.distributed:
        dist.all_reduce(t)
    return t.tolist()


def gather_objects(env: Env, obj: Any) -> list[Any]:
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


# -- optimizer and schedule --------------------------------------------------------------------------------------
def build_optimizer(args: argparse.Namespace, model: nn.Module, scaler: Any | None) -> torch.optim.Optimizer:
    """SGD, or K-FAC / EK-FAC / M-FAC wrapping that SGD (built on the unwrapped model on every rank, so layer
    names do not depend on DDP and checkpoints load with or without it)."""
    base = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
                           weight_decay=args.weight_decay)
    if args.optimizer == "sgd":
        return base
    kl_clip = args.kl_clip if args.kl_clip > 0 else None
    if args.optimizer == "mfac":
        damping = 1e-4 if args.damping is None else args.damping
        return kfac.MFAC(model, base, num_grads=args.num_grads, damping=damping, kl_clip=kl_clip,
                         blocks=args.mfac_blocks, skip_layers=args.skip_layers)
    options: dict[str, Any] = {
        "factor_update_steps": args.factor_update_steps, "inv_update_steps": args.inv_update_steps,
        "damping": args.kfac_damping if args.damping is None else args.damping, "factor_decay": args.factor_decay,
        "kl_clip": kl_clip, "strategy": args.strategy, "grad_worker_fraction": args.grad_worker_fraction,
        "skip_layers": args.skip_layers, "grad_scaler": scaler,
    }
    if args.optimizer == "ekfac":
        options["strategy"] = args.strategy or "comm-opt"  # EK-FAC needs every rank to hold the eigenbases
        return kfac.EKFAC(model, base, **options)
    return kfac.KFAC(model, base, method=args.kfac_method, **options)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str, milestones: list[int],
              decay: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "multistep":
        return decay ** sum(step >= m for m in milestones)
    return 1.0


def build_scheduler(args: argparse.Namespace, opt: torch.optim.Optimizer, steps_per_epoch: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = round(args.warmup_epochs * steps_per_epoch)
    milestones = [round(m * steps_per_epoch) for m in args.lr_milestones]

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps=warmup, total_steps=total_steps, schedule=args.lr_schedule,
                         milestones=milestones, decay=args.lr_decay)

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# -- checkpoints -------------------------------------------------------------------------------------------------
def checkpoints(directory: Path | None) -> list[tuple[int, Path]]:
    """``(step, path)`` of the complete checkpoints in ``directory``, oldest first."""
    if directory is None or not directory.is_dir():
        return []
    found = [(int(m.group(1)), directory / name) for name in os.listdir(directory)
             if (m := CHECKPOINT_RE.match(name))]
    return sorted(found)


def _rng_state(env: Env) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if env.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(env.device)
    return state


def _set_rng_state(env: Env, state: dict[str, Any]) -> None:
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


# -- logging -----------------------------------------------------------------------------------------------------
class Logger:
    """TensorBoard scalars on rank 0 (``--log-dir``), optional."""

    def __init__(self, args: argparse.Namespace, env: Env, start_step: int) -> None:
        self.writer = None
        if args.log_dir is not None and env.main:
            from torch.utils.tensorboard import SummaryWriter

            # a killed run may have logged past its last checkpoint: on resume, drop its events after that step
            self.writer = SummaryWriter(str(args.log_dir), purge_step=start_step + 1 if start_step else None)
            if not start_step:
                self.writer.add_text("config", "```\n" + json.dumps(_jsonable(vars(args)), indent=1) + "\n```", 0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def comm_scalars(env: Env, opt: torch.optim.Optimizer) -> dict[str, float]:
    """``bytes_communicated`` by category, summed over ranks (total traffic since this process started), plus
    the preconditioner's memory and skipped steps. Collective in a distributed run."""
    pre = getattr(opt, "preconditioner", None)
    if pre is None:
        return {}
    total: Counter[str] = Counter()
    for part in gather_objects(env, dict(pre.bytes_communicated)):
        total.update(part)
    out = {f"kfac/bytes_communicated/{k}": float(v) for k, v in sorted(total.items())}
    out["kfac/bytes_communicated/total"] = float(sum(total.values()))
    out["kfac/memory_MiB"] = pre.memory_usage() / 2**20
    out["kfac/skipped_steps"] = float(pre.skipped_steps)
    return out


# -- evaluation --------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, data: Data, args: argparse.Namespace, env: Env, amp: bool) -> tuple[float, float]:
    """Cross-entropy (no label smoothing) and accuracy on the whole test set: each rank takes every
    ``world``-th example (no padding, no duplicates) and the sums are all-reduced. ``model`` is the module, not
    its DDP wrapper (ranks may run different numbers of batches)."""
    model.eval()
    shard = Subset(data.test, range(env.rank, len(data.test), env.world))  # type: ignore[arg-type]
    loader = DataLoader(shard, batch_size=args.test_batch_size, shuffle=False, num_workers=args.workers,
                        pin_memory=env.device.type == "cuda")
    loss_sum = correct = count = 0.0
    for x, y in loader:
        x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
        with torch.autocast(env.device.type, dtype=torch.float16, enabled=amp):
            out = model(x)
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        count += y.numel()
    model.train()
    loss_sum, correct, count = all_sum(env, [loss_sum, correct, count])
    return loss_sum / max(count, 1), correct / max(count, 1)


# -- the run -----------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace, *, build_data: Callable[[argparse.Namespace], Data],
        build_model: Callable[[argparse.Namespace, int], nn.Module], parser: argparse.ArgumentParser | None = None
        ) -> dict[str, Any]:
    """Set up, train, evaluate, checkpoint, tear down. Returns the final metrics (on every rank)."""
    if parser is not None:
        _check_args(parser, args)
    env = setup(args)
    result = _run(args, env, build_data, build_model)  # on an error the process exits and torchrun stops the rest
    teardown(env)
    return result


def _sync(env: Env) -> float:
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
    return time.perf_counter()


def _run(args: argparse.Namespace, env: Env, build_data: Callable[[argparse.Namespace], Data],
         build_model: Callable[[argparse.Namespace, int], nn.Module]) -> dict[str, Any]:
    amp = args.amp and env.device.type == "cuda"
    if args.amp and not amp:
        env.print("warning: --amp needs CUDA; running in float32")
    if args.sync_bn and (env.device.type != "cuda" or args.norm != "batch"):
        raise SystemExit("--sync-bn needs CUDA and --norm batch (torch's SyncBatchNorm has no CPU kernels; on CPU, "
                         "--norm group makes the model independent of how the batch is split)")
    if args.batch_size % env.world:
        raise SystemExit(f"--batch-size {args.batch_size} (global) must be divisible by the {env.world} processes")
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)

    data = build_data(args)
    args.num_classes = data.num_classes
    args.data = data.name
    if args.workers is None:
        args.workers = 0 if data.in_memory else 4
    steps_per_epoch = len(data.train) // args.batch_size  # type: ignore[arg-type]
    if steps_per_epoch < 1:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the {len(data.train)} training examples")
    total_steps = args.epochs * steps_per_epoch
    end_step = total_steps if args.max_steps is None else min(total_steps, args.max_steps)
    local_batch = args.batch_size // env.world

    torch.manual_seed(args.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(args, data.num_classes)
    if args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(env.device)
    ddp: nn.Module = model
    if env.distributed:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(env.device.type, enabled=amp)
    opt = build_optimizer(args, model, scaler if amp else None)
    scheduler = build_scheduler(args, opt, steps_per_epoch, total_steps)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    n_params = sum(p.numel() for p in model.parameters())
    backend = ("nccl" if env.device.type == "cuda" else "gloo") + ("" if env.distributed else ", no process group")
    env.print(banner([f"data:  {line}" if i == 0 else f"       {line}"
                      for i, line in enumerate(data.description.splitlines())] + [
        f"model: {args.model} ({n_params:,} parameters, {args.norm} norm), optimizer: {args.optimizer}",
        (f"run:   {env.world} process(es) on {env.device.type} ({backend}), global batch {args.batch_size} "
         f"({local_batch}/process), {steps_per_epoch} steps/epoch, {args.epochs} epochs, stopping at step {end_step}"),
    ]))
    if isinstance(getattr(opt, "preconditioner", None), kfac.KFACPreconditioner):
        pre = opt.preconditioner  # type: ignore[attr-defined]
        env.print(f"K-FAC: {len(pre.layers)} layers preconditioned, {len(pre.skipped)} left to SGD; "
                  f"strategy {pre.plan.strategy}")

    ckpt = Checkpointer(args, env)
    step = 0
    path, state = ckpt.latest()
    if state is not None:
        _check_resume(args, state, env)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _apply_flags(args, opt, scheduler)
        scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]
        _set_rng_state(env, rngs[env.rank] if env.rank < len(rngs) else rngs[0])
        step = ckpt.last_saved = int(state["step"])
        env.print(f"resumed from {path} at step {step} (epoch {step // steps_per_epoch}, batch "
                  f"{step % steps_per_epoch}; saved by {state['world_size']} process(es), now {env.world})")
        del state

    def checkpoint_state() -> dict[str, Any]:
        return {"format": "kfac-examples/1", "step": step, "epoch": step // steps_per_epoch,
                "model": model.state_dict(), "scheduler": scheduler.state_dict(),
                # K-FAC's complete state, loadable at any world size: a collective (every rank is here)
                "optimizer": (opt.consolidated_state_dict() if isinstance(opt, kfac.PreconditionedOptimizer)
                              else opt.state_dict()),
                "scaler": scaler.state_dict(), "rng": gather_objects(env, _rng_state(env)),
                "world_size": env.world, "config": _jsonable(vars(args))}

    log = Logger(args, env, step)

    def save_checkpoint() -> None:  # the event file is flushed first: what a checkpoint saw is on disk with it
        log.flush()
        ckpt.save(step, checkpoint_state)

    bar = None
    if env.main and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=end_step, initial=step, desc="train", dynamic_ncols=True, mininterval=1.0)
    acc_loss = torch.zeros((), dtype=torch.float64, device=env.device)
    acc_correct = torch.zeros((), dtype=torch.float64, device=env.device)
    acc_n, t_data, t_fb, t_opt, n_timed = 0, 0.0, 0.0, 0.0, 0
    metrics: dict[str, Any] = {}
    evaluated_at: int | None = None
    ddp.train()
    while step < end_step:
        epoch, start = divmod(step, steps_per_epoch)
        sampler = EpochSampler(len(data.train), rank=env.rank, world=env.world, seed=args.seed,  # type: ignore
                               epoch=epoch, start_step=start, local_batch=local_batch)
        loader = DataLoader(data.train, batch_size=local_batch, sampler=sampler, drop_last=True,
                            num_workers=args.workers, pin_memory=env.device.type == "cuda")
        batches = iter(loader)
        for _ in range(start, min(steps_per_epoch, end_step - epoch * steps_per_epoch)):
            t0 = _sync(env)
            x, y = next(batches)
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            t1 = _sync(env)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(env.device.type, dtype=torch.float16, enabled=amp):
                out = ddp(x)
                loss = criterion(out, y)
            scaler.scale(loss).backward()
            t2 = _sync(env)
            scaler.step(opt)  # unscales; skips the step (K-FAC included) on inf/NaN gradients
            scaler.update()
            t3 = _sync(env)
            scheduler.step()
            step += 1
            acc_loss += loss.detach().double() * y.numel()
            acc_correct += (out.detach().argmax(1) == y).sum()
            acc_n += y.numel()
            t_data, t_fb, t_opt, n_timed = t_data + t1 - t0, t_fb + t2 - t1, t_opt + t3 - t2, n_timed + 1
            if bar is not None:
                bar.update(1)
            if step % args.log_interval == 0 or step == end_step:
                loss_sum, correct, n = all_sum(env, [acc_loss.item(), acc_correct.item(), float(acc_n)])
                scalars = {"train/loss": loss_sum / n, "train/accuracy": correct / n,
                           "train/lr": opt.param_groups[0]["lr"], "train/epoch": step / steps_per_epoch,
                           "time/data_ms": 1e3 * t_data / n_timed,
                           "time/forward_backward_ms": 1e3 * t_fb / n_timed,
                           "time/optimizer_step_ms": 1e3 * t_opt / n_timed,
                           "time/step_ms": 1e3 * (t_data + t_fb + t_opt) / n_timed}
                scalars.update(comm_scalars(env, opt))
                log.scalars(step, scalars)
                metrics.update(step=step, train_loss=scalars["train/loss"], train_accuracy=scalars["train/accuracy"])
                if bar is not None:
                    bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", acc=f"{scalars['train/accuracy']:.3f}",
                                    lr=f"{scalars['train/lr']:.3g}", opt_ms=f"{scalars['time/optimizer_step_ms']:.0f}")
                acc_loss.zero_()
                acc_correct.zero_()
                acc_n, t_data, t_fb, t_opt, n_timed = 0, 0.0, 0.0, 0.0, 0
            if step % steps_per_epoch == 0:  # end of an epoch: evaluate and checkpoint
                metrics.update(_evaluate(model, data, args, env, amp, log, step, bar))
                evaluated_at = step
                save_checkpoint()
            elif args.checkpoint_every and step % args.checkpoint_every == 0:
                save_checkpoint()
        del batches, loader
    if evaluated_at != step:
        metrics.update(_evaluate(model, data, args, env, amp, log, step, bar))
    save_checkpoint()
    if bar is not None:
        bar.close()
    log.close()
    metrics["step"] = step
    env.print("final: " + json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}))
    return metrics


def _evaluate(model: nn.Module, data: Data, args: argparse.Namespace, env: Env, amp: bool, log: Logger, step: int,
              bar: Any) -> dict[str, float]:
    if env.distributed:  # DDP broadcasts rank 0's buffers (BatchNorm statistics) before each training forward, and
        for buf in model.buffers():  # every rank then updates its own: agree on rank 0's for evaluation and checkpoints
            dist.broadcast(buf, 0)
    loss, acc = evaluate(model, data, args, env, amp)  # the unwrapped model: no collectives per batch
    log.scalars(step, {"test/loss": loss, "test/accuracy": acc})
    line = f"step {step}: test loss {loss:.4f}, test accuracy {100 * acc:.2f}%"
    if bar is not None:
        bar.write(line)
    else:
        env.print(line)
    return {"test_loss": loss, "test_accuracy": acc}


def _apply_flags(args: argparse.Namespace, opt: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """After loading a checkpoint, the flags win over the saved SGD hyperparameters and base lr (the optimizer
    and scheduler state dicts carry them), so a changed ``--lr``/``--momentum``/... takes effect on resume."""
    for group in opt.param_groups:
        group.update(momentum=args.momentum, weight_decay=args.weight_decay, nesterov=args.nesterov,
                     initial_lr=args.lr)
    scheduler.base_lrs = [args.lr] * len(opt.param_groups)
    for group, lmbda in zip(opt.param_groups, scheduler.lr_lambdas):
        group["lr"] = args.lr * lmbda(scheduler.last_epoch)


def _check_resume(args: argparse.Namespace, state: dict[str, Any], env: Env) -> None:
    saved = state.get("config", {})
    now = _jsonable(vars(args))
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

