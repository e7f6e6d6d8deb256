"""Coverage: the share of trainable parameters K-FAC preconditions on the architectures people train (issue 15).

Models are built from random configurations (no downloads): torchvision's resnet18, mobilenet_v3_small,
efficientnet_b0, convnext_tiny and vit_b_16; ``nn.TransformerEncoder``; a 1-d convolutional network; and, where
``transformers`` is installed, tiny GPT-2, BERT and Llama configurations. For each: the preconditioned fraction,
and the parameters left out grouped by reason (``KFACPreconditioner.skipped``), counted after one training step
on a batch of two random inputs (a block that cannot collect its statistics, e.g. loose parameters whose
per-example gradients fail, is untracked at its first statistics step and counted as left out).

    python benchmarks/cpu/coverage.py [--out-dir benchmarks/cpu/results]
"""

from __future__ import annotations

import argparse
import collections
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import kfac  # noqa: E402
from benchmarks.common import machine_info, save_png, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def conv1d_net() -> nn.Module:
    return nn.Sequential(nn.Conv1d(8, 32, 5, padding=2), nn.ReLU(), nn.Conv1d(32, 32, 5, padding=2), nn.ReLU(),
                         nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, 10))


def transformer_encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, num_layers=2), nn.Linear(64, 10))


def models() -> dict[str, Callable[[], nn.Module]]:
    out: dict[str, Callable[[], nn.Module]] = {"conv1d net": conv1d_net, "nn.TransformerEncoder": transformer_encoder}
    try:
        import torchvision.models as tv

        out.update({"resnet18": tv.resnet18, "mobilenet_v3_small": tv.mobilenet_v3_small,
                    "efficientnet_b0": tv.efficientnet_b0, "convnext_tiny": tv.convnext_tiny, "vit_b_16": tv.vit_b_16})
    except ImportError:
        print("note: torchvision not installed, its models skipped")
    try:
        import transformers as hf

        out.update({
            "gpt2 (tiny)": lambda: hf.GPT2LMHeadModel(hf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500,
                                                                             bos_token_id=0, eos_token_id=0)),
            "bert (tiny)": lambda: hf.BertForMaskedLM(hf.BertConfig(num_hidden_layers=2, hidden_size=64,
                                                                    num_attention_heads=4, intermediate_size=128,
                                                                    vocab_size=500)),
            "llama (tiny)": lambda: hf.LlamaForCausalLM(hf.LlamaConfig(num_hidden_layers=2, hidden_size=64,
                                                                       num_attention_heads=4, intermediate_size=128,
                                                                       vocab_size=500))})
    except ImportError:
        print("note: transformers not installed, GPT-2 / BERT / Llama skipped")
    return out


def example_batch(name: str) -> dict[str, torch.Tensor]:
    """Two random inputs of the shape ``name`` takes (images at 64x64 where the network pools adaptively)."""
    if name == "conv1d net":
        return {"input": torch.randn(2, 8, 16)}
    if name == "nn.TransformerEncoder":
        return {"input": torch.randn(2, 5, 64)}
    if name in ("gpt2 (tiny)", "bert (tiny)", "llama (tiny)"):
        return {"input_ids": torch.randint(0, 500, (2, 8))}
    side = 224 if name == "vit_b_16" else 64
    return {"input": torch.randn(2, 3, side, side)}


def train_step(model: nn.Module, pre: kfac.KFACPreconditioner, batch: dict[str, torch.Tensor]) -> None:
    """One statistics step on a regression of the outputs to zero: factors updated (a block with bad statistics
    is untracked there), no decompositions (``update()``, not ``step()``: ``eigh`` of the largest factors would
    take minutes)."""
    model.train()
    out = model(*batch.values()) if "input" in batch else model(**batch)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    logits.float().square().mean().backward()
    pre.update()


def coverage(model: nn.Module, batch: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    total = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pre = kfac.KFACPreconditioner(model)
        if batch is not None:
            train_step(model, pre, batch)
    seen = {id(p) for params in pre.parameters_of().values() for p in params}
    covered = sum(p.numel() for params in pre.parameters_of().values() for p in params)
    named = dict(model.named_modules())
    by_reason: dict[str, int] = collections.Counter()
    for name, reason in pre.skipped:  # each left-out parameter counted once, under its first module's reason
        for p in named[name].parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                by_reason[reason.split(": ")[0].split(" (")[0]] += p.numel()
    pre.remove()
    return {"parameters": total, "preconditioned": covered, "fraction": covered / total,
            "skipped_parameters_by_reason": dict(by_reason)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = {}
    print(f"{'model':24s} {'parameters':>12s} {'preconditioned':>15s}  largest gap")
    for name, build in models().items():
        row = coverage(build(), example_batch(name))
        rows[name] = row
        gap = max(row["skipped_parameters_by_reason"].items(), key=lambda kv: kv[1], default=("-", 0))
        print(f"{name:24s} {row['parameters']:12,d} {100 * row['fraction']:14.1f}%  {gap[0]} ({gap[1]:,d})",
              flush=True)
    write_json(args.out_dir / "coverage.json", {"machine": machine_info(), "models": rows}, indent=1)
    plot(rows, args.out_dir / "coverage.png")


def plot(rows: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.4 * len(rows) + 1))
    names = list(rows)
    ax.barh(names, [100 * rows[n]["fraction"] for n in names])
    ax.axvline(99, color="grey", linestyle=":", label="goal 99%")
    ax.set_xlabel("trainable parameters preconditioned (%)")
    ax.set_xlim(0, 100)
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    fig.tight_layout()
    save_png(fig, path, dpi=90)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
