"""What a script's data builder returns (:class:`Data`), augmentation seeded per example
(:class:`SeededDataset`), this rank's share of an epoch (:class:`EpochSampler`) and the ``--norm`` layers."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, DistributedSampler, Sampler


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

