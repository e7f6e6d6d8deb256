"""ImageNet ResNets (torchvision) with SGD, K-FAC, EK-FAC or M-FAC, under DDP (torchrun) or in one process.

Usage::

    torchrun --nproc_per_node=8 examples/torch_imagenet_resnet.py --data-dir ~/data/imagenet \\
        --model resnet50 --optimizer kfac --amp --checkpoint-dir runs/in1k/ckpt --log-dir runs/in1k/tb
    python examples/torch_imagenet_resnet.py --synthetic --image-size 32 --model resnet18 --max-steps 10

Data: ``--data-dir`` holds ``train/`` and ``val/`` in ``torchvision.datasets.ImageFolder`` layout (one folder per
class; the usual ``valprep.sh`` arrangement of the validation images). Training: ``RandomResizedCrop(image_size)``
and horizontal flip; validation: resize to ``image_size * 256/224`` and centre crop; ImageNet channel statistics.
Without ``--data-dir`` (or with ``--synthetic``) the run uses SYNTHETIC data, announced at start-up: random
Gaussian ``3 x image_size x image_size`` images with random labels (``--synthetic-size`` training images, a tenth of
that for testing, ``--num-classes`` classes), generated per index from ``--seed``. It exercises the whole pipeline
(and measures speed) but nothing can be learned from it: its accuracy is meaningless.

Models (``--model``): any torchvision ResNet-family name (``resnet18`` ... ``resnet152``, ``resnext50_32x4d``,
``wide_resnet50_2``, ...), randomly initialised.

Defaults follow KAISA's ImageNet example: global batch 256, lr 0.1 with 5 warm-up epochs and x0.1 at epochs 25, 35,
40, 45 and 50 of 55, weight decay 5e-5, label smoothing 0.1; K-FAC factors every 10 steps, decompositions every
100, damping 0.001 (the package's defaults are 1, 10 and 1e-2; every other second-order option defaults to the
package's). Every flag is in ``--help``; the shared machinery is documented in the ``training/`` package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training.data import Data, SeededDataset, norm_layer, sample_seed  # noqa: E402
from training.loop import run  # noqa: E402
from training.options import Recipe, make_parser  # noqa: E402

RECIPE = Recipe("KAISA's ImageNet recipe",
                {"factor_update_steps": 10, "inv_update_steps": 100, "damping": 0.001})
"""The K-FAC settings of KAISA's ImageNet example, which these defaults reproduce (``--help`` names the package's)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODEL_PREFIXES = ("resnet", "resnext", "wide_resnet")


class SyntheticImages(Dataset):
    """``n`` random N(0, 1) images of shape ``(3, size, size)`` with uniform random labels, a pure function of
    ``(seed, index)`` (nothing is stored)."""

    def __init__(self, n: int, size: int, num_classes: int, seed: int) -> None:
        self.n, self.size, self.num_classes, self.seed = n, size, num_classes, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        g = torch.Generator().manual_seed(sample_seed(self.seed, -1, i))
        return (torch.randn(3, self.size, self.size, generator=g),
                int(torch.randint(self.num_classes, (), generator=g)))


def synthetic(args: argparse.Namespace) -> Data:
    import torchvision.transforms as tf

    n_test = max(args.synthetic_size // 10, 1)
    train = SyntheticImages(args.synthetic_size, args.image_size, args.num_classes, args.seed)
    test = SyntheticImages(n_test, args.image_size, args.num_classes, args.seed + 1)
    why = "--synthetic" if args.synthetic else "no --data-dir"
    return Data(train=SeededDataset(train, tf.RandomHorizontalFlip(), args.seed), test=test,
                  num_classes=args.num_classes, name=f"synthetic-{args.image_size}",
                  description=(f"SYNTHETIC DATA ({why}): random images, NOT ImageNet; accuracy is meaningless\n"
                               f"{args.synthetic_size} train / {n_test} test images of 3x{args.image_size}x"
                               f"{args.image_size}, {args.num_classes} classes, random labels\n"
                               "pass --data-dir /path/to/imagenet (train/ and val/ ImageFolders) for real data"))


def imagenet(args: argparse.Namespace) -> Data:
    import torchvision.transforms as tf
    from torchvision.datasets import ImageFolder

    root, size = args.data_dir, args.image_size
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise SystemExit(f"--data-dir {root}: no {split}/ folder (expected ImageFolder layout "
                             f"{root}/{{train,val}}/<class>/<image>)")
    normalize = tf.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = ImageFolder(str(root / "train"))
    augment = tf.Compose([tf.RandomResizedCrop(size), tf.RandomHorizontalFlip(), tf.ToTensor(), normalize])
    test = ImageFolder(str(root / "val"), transform=tf.Compose([tf.Resize(round(size * 256 / 224)),
                                                               tf.CenterCrop(size), tf.ToTensor(), normalize]))
    if test.classes != train.classes:
        raise SystemExit(f"--data-dir {root}: train/ and val/ have different class folders")
    return Data(train=SeededDataset(train, augment, args.seed), test=test, num_classes=len(train.classes),
                  name="imagefolder", in_memory=False,
                  description=(f"ImageNet-style ImageFolder {root}: {len(train)} train / {len(test)} val images, "
                               f"{len(train.classes)} classes, {size}x{size} crops"))


def build_data(args: argparse.Namespace) -> Data:
    if args.synthetic and args.data_dir is not None:
        raise SystemExit("--synthetic and --data-dir exclude each other")
    return synthetic(args) if args.data_dir is None else imagenet(args)


def build_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    import torchvision

    if not args.model.startswith(MODEL_PREFIXES) or args.model not in torchvision.models.list_models():
        raise SystemExit(f"--model {args.model!r}: expected a torchvision ResNet-family model "
                         f"(e.g. resnet18, resnet50, resnext50_32x4d, wide_resnet50_2)")
    return torchvision.models.get_model(args.model, num_classes=num_classes, norm_layer=norm_layer(args.norm))


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        __doc__.split("\n\n", 1)[0], recipe=RECIPE, epochs=55, batch_size=256, lr=0.1, weight_decay=5e-5,
        label_smoothing=0.1, lr_milestones=[25.0, 35.0, 40.0, 45.0, 50.0], test_batch_size=128)
    parser.add_argument("--model", default="resnet50", help="torchvision ResNet-family model name")
    parser.add_argument("--image-size", type=int, default=224, help="training crop / synthetic image side")
    parser.add_argument("--synthetic", action="store_true", help="random images (the default without --data-dir)")
    parser.add_argument("--synthetic-size", type=int, default=2560, help="synthetic training images")
    parser.add_argument("--num-classes", type=int, default=1000, help="classes of the synthetic data")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.image_size < 8 or args.synthetic_size < 1 or args.num_classes < 2:
        parser.error("--image-size must be >= 8, --synthetic-size >= 1 and --num-classes >= 2")
    return run(args, build_data=build_data, build_model=build_model, parser=parser)


if __name__ == "__main__":
    main()
