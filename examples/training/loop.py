"""The run: set up, build data, model, optimizer and schedule, resume, train with periodic logging, evaluation and
checkpoints, tear down."""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

import kfac
from training.checkpoint import Checkpointer, check_resume, jsonable, rng_state, set_rng_state
from training.data import Data, EpochSampler
from training.env import Env, all_sum, gather_objects, setup, teardown
from training.optim import apply_flags, build_optimizer, build_scheduler
from training.options import check_args
from training.tblog import Logger, comm_scalars


def banner(lines: list[str]) -> str:
    width = max(len(line) for line in lines) + 4
    bar = "=" * width
    return "\n".join([bar, *(f"| {line.ljust(width - 4)} |" for line in lines), bar])



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
        check_args(parser, args)
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
        check_resume(args, state, env)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        apply_flags(args, opt, scheduler)
        scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]
        set_rng_state(env, rngs[env.rank] if env.rank < len(rngs) else rngs[0])
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
                "scaler": scaler.state_dict(), "rng": gather_objects(env, rng_state(env)),
                "world_size": env.world, "config": jsonable(vars(args))}

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


