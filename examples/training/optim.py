"""The optimizer (SGD, or K-FAC / EK-FAC / M-FAC around it) and the per-step learning-rate schedule."""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
from torch import nn

import kfac


def build_optimizer(args: argparse.Namespace, model: nn.Module, scaler: Any | None) -> torch.optim.Optimizer:
    """SGD, or K-FAC / EK-FAC / M-FAC wrapping that SGD (built on the unwrapped model on every rank, so layer
    names do not depend on DDP and checkpoints load with or without it)."""
    base = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
                           weight_decay=args.weight_decay)
    if args.optimizer == "sgd":
        return base
    kl_clip = args.kl_clip if args.kl_clip > 0 else None
    if args.optimizer == "mfac":
        damping = args.mfac_damping if args.damping is None else args.damping
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



def apply_flags(args: argparse.Namespace, opt: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """After loading a checkpoint, the flags win over the saved SGD hyperparameters and base lr (the optimizer
    and scheduler state dicts carry them), so a changed ``--lr``/``--momentum``/... takes effect on resume."""
    for group in opt.param_groups:
        group.update(momentum=args.momentum, weight_decay=args.weight_decay, nesterov=args.nesterov,
                     initial_lr=args.lr)
    scheduler.base_lrs = [args.lr] * len(opt.param_groups)
    for group, lmbda in zip(opt.param_groups, scheduler.lr_lambdas):
        group["lr"] = args.lr * lmbda(scheduler.last_epoch)


