"""CIFAR-10 ResNets with SGD, K-FAC, EK-FAC or M-FAC, under DDP (torchrun) or in one process.

Usage::

    torchrun --nproc_per_node=4 examples/torch_cifar10_resnet.py --data-dir ~/data/cifar10 \\
        --model resnet32 --optimizer kfac --checkpoint-dir runs/c10/ckpt --log-dir runs/c10/tb
    python examples/torch_cifar10_resnet.py --epochs 5            # 1 process, offline digits data

Data: ``--data-dir`` is the root that ``torchvision.datasets.CIFAR10(root, download=False)`` reads (the
``cifar-10-batches-py`` folder inside it); nothing is downloaded. Training augmentation: random crop (padding 4) and
horizontal flip; both sets are normalised with the CIFAR-10 channel statistics. Without ``--data-dir`` the run uses
an offline stand-in, announced at start-up: scikit-learn's bundled digits (real handwritten digits, 10 classes,
1347 train / 450 test, see ``_digits.py``) upscaled bilinearly from 8x8 to 32x32 and repeated over 3 channels
(augmentation: random crop only, since mirrored digits are other symbols).

Models (``--model``): ``resnet<6n+2>`` (``resnet20``, ``resnet32``, ``resnet44``, ``resnet56``, ``resnet110``, ...:
He et al. 2016's CIFAR ResNets, 3 stages of ``n`` basic blocks, parameter-free "option A" shortcuts, ``--width``
channels in the first stage), or ``resnet18``/``resnet34``/``resnet50`` (torchvision's, with a 3x3 stride-1 stem
convolution and no max-pool, for 32x32 inputs).

Defaults follow KAISA's CIFAR-10 example: global batch 128, lr 0.1 with 5 warm-up epochs and x0.1 at epochs 35, 75
and 90 of 100, weight decay 5e-4; K-FAC factors every 10 steps, decompositions every 100, damping 0.003 (the
package's defaults are 1, 10 and 1e-2; every other second-order option defaults to the package's). Every flag is in
``--help``; the shared machinery (checkpoints, logging, schedule, ...) is documented in the ``training/`` package.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training.data import Data, SeededDataset, norm_layer  # noqa: E402
from training.loop import run  # noqa: E402
from training.options import Recipe, make_parser  # noqa: E402

RECIPE = Recipe("KAISA's CIFAR-10 recipe",
                {"factor_update_steps": 10, "inv_update_steps": 100, "damping": 0.003})
"""The K-FAC settings of KAISA's CIFAR-10 example, which these defaults reproduce (``--help`` names the package's)."""

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


# -- data --------------------------------------------------------------------------------------------------------
class Images(Dataset):
    """Images held as one tensor ``(N, C, H, W)`` and their labels."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


def uint8_to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255)


def cifar10(root: Path, seed: int) -> Data:
    import torchvision.transforms as tf
    from torchvision.datasets import CIFAR10

    try:
        train, test = CIFAR10(str(root), train=True, download=False), CIFAR10(str(root), train=False, download=False)
    except (RuntimeError, OSError) as e:
        raise SystemExit(f"--data-dir {root}: {e} (expected torchvision's CIFAR-10 layout: "
                         f"{root}/cifar-10-batches-py/data_batch_1 ...; this example never downloads)") from None

    def images(ds) -> Images:  # uint8 HWC numpy -> uint8 CHW tensor, once
        return Images(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets))

    normalize = tf.Normalize(CIFAR_MEAN, CIFAR_STD)
    augment = tf.Compose([tf.Lambda(uint8_to_float), tf.RandomCrop(32, padding=4), tf.RandomHorizontalFlip(),
                          normalize])
    plain = tf.Compose([tf.Lambda(uint8_to_float), normalize])
    return Data(train=SeededDataset(images(train), augment, seed), test=SeededDataset(images(test), plain, seed),
                  num_classes=10, name="cifar10",
                  description=f"CIFAR-10 from {root} ({len(train)} train / {len(test)} test images)")


def digits(seed: int) -> Data:
    import torchvision.transforms as tf
    from _digits import load_data

    d = load_data()

    def upscale(x: torch.Tensor) -> torch.Tensor:  # standardised (N, 1, 8, 8) -> (N, 3, 32, 32)
        return F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1).contiguous()

    train, test = Images(upscale(d.x_train), d.y_train), Images(upscale(d.x_test), d.y_test)
    return Data(train=SeededDataset(train, tf.RandomCrop(32, padding=4), seed), test=test, num_classes=10,
                  name="sklearn-digits-32",
                  description=(f"OFFLINE DEFAULT (no --data-dir): scikit-learn digits, NOT CIFAR-10\n"
                               f"real 8x8 handwritten digits upscaled to 32x32x3, 10 classes, {len(train)} train / "
                               f"{len(test)} test\npass --data-dir /path/to/cifar10 to train on CIFAR-10"))


def build_data(args: argparse.Namespace) -> Data:
    return digits(args.seed) if args.data_dir is None else cifar10(args.data_dir, args.seed)


# -- models ------------------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """3x3 conv - norm - ReLU - 3x3 conv - norm, plus the input (strided and zero-padded in channels when the shape
    changes: He et al.'s option A, no parameters)."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm(c_out)
        self.stride, self.pad = stride, c_out - c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.stride != 1 or self.pad:
            shortcut = x[:, :, ::self.stride, ::self.stride]
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (He et al. 2016, section 4.2): widths w, 2w, 4w."""

    def __init__(self, n: int, num_classes: int, width: int = 16, norm=nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = norm(width)
        blocks, c = [], width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                blocks.append(BasicBlock(c, c_out, 2 if stage and not i else 1, norm))
                c = c_out
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    norm = norm_layer(args.norm)
    m = re.fullmatch(r"resnet(\d+)", args.model)
    if m and args.model not in ("resnet18", "resnet34", "resnet50"):
        depth = int(m.group(1))
        if depth < 8 or (depth - 2) % 6:
            raise SystemExit(f"--model {args.model}: CIFAR ResNets have depth 6n+2 (8, 14, 20, 32, 44, 56, 110, ...)")
        return CifarResNet((depth - 2) // 6, num_classes, width=args.width, norm=norm)
    if args.model in ("resnet18", "resnet34", "resnet50"):
        import torchvision

        model = torchvision.models.get_model(args.model, num_classes=num_classes, norm_layer=norm)
        model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)  # CIFAR stem: keep 32x32
        model.maxpool = nn.Identity()
        return model
    raise SystemExit(f"unknown --model {args.model!r}: resnet<6n+2> (e.g. resnet20, resnet32) or resnet18/34/50")


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__.split("\n\n", 1)[0], recipe=RECIPE)
    parser.add_argument("--model", default="resnet32", help="resnet<6n+2> (CIFAR ResNet) or resnet18/34/50")
    parser.add_argument("--width", type=int, default=16, help="channels of the first stage (resnet<6n+2> only)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run(args, build_data=build_data, build_model=build_model, parser=parser)


if __name__ == "__main__":
    main()
