"""The time-to-result workloads: data, model, loss and metric, all offline and deterministic given the seed.

Conventions. A batch is ``(inputs, targets)``; ``loss(model, batch)`` runs the forward pass and returns the mean
loss *without* calling ``backward`` (the closure adaptive K-FAC wants; ``adaptive_loss`` names it for
``AdaptiveConfig``). ``sample(generator, batch)`` draws a batch with replacement from the training data, the
generator seeded per run so every optimizer sees the same batches. ``measure(model)`` returns the metric (key
``"metric"``, direction ``higher_is_better``) and the extras (further numbers reported beside it, directions in
``extras_higher_is_better``), in eval mode without gradients, the model's mode restored. ``matrices(model)`` are the
parameters Muon orthogonalises. ``model(seed)`` seeds ``torch.manual_seed`` before building, so one seed gives one
initialisation.

* ``autoencoder``: digits (scikit-learn's bundled 1797 8x8 images, scaled to [0, 1]), the deep autoencoder
  64-128-64-32-8-32-64-128-64 (tanh) with the Bernoulli loss, batch 256; metric: full-data loss (lower is better).
* ``classification``: digits, MLP 64-256-256-10 (tanh), cross-entropy, batch 512 on a fixed 1437/360 split; metric:
  test accuracy.
* ``cnn``: digits as 1x8x8 images, the same split, a CNN with normalisation layers (BatchNorm2d, GroupNorm),
  cross-entropy, batch 128; metric: the full training-set loss (test accuracy saturates near 100%), computed with
  batch norm normalising by the whole training set (the objective's normalisation, no lag of the running
  statistics) and in float64 from the logits (the loss reaches 1e-6, below float32's resolution of a log-softmax);
  test accuracy and loss (eval mode) among the extras.
* ``lm``: a character-level causal transformer language model (2 pre-norm ``TransformerEncoderLayer``, d_model 64,
  context 32) on the source text of a few standard-library modules of the running Python (the text, hence the
  numbers, depend on the Python version; ``info()`` records it), batch 32; metric: held-out loss (nats/character) on
  a fixed slice at the end of the text.

Step budgets and evaluation intervals are sized for the run times of the scripts' docstrings on 2 CPU cores (the
per-step times are in ``benchmarks/cpu/time_to_result.py``); ``build(..., quick=True)`` gives a 20-step smoke test.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Batch = tuple[Tensor, Tensor]
"""``(inputs, targets)`` of one step."""

SPLIT_SEED = 1234  # the fixed 1437/360 digits split
TRAIN = 1437


def digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits: ``(1797, 64)`` pixel intensities in [0, 1] and the labels."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def split(n: int) -> tuple[Tensor, Tensor]:
    """The fixed train/test indices (first 1437 / rest of a seeded permutation)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return perm[:TRAIN], perm[TRAIN:]


class Workload(ABC):
    """One workload at one batch size; subclasses set the class attributes and implement the abstract methods."""

    name: str
    default_batch: int
    default_steps: int
    default_eval_every: int
    metric_name: str
    higher_is_better: bool
    adaptive_loss: str
    extras_higher_is_better: dict[str, bool] = {}  # the extras ``evaluate`` returns, and their directions

    def __init__(self, *, batch: int | None = None, steps: int | None = None, eval_every: int | None = None) -> None:
        self.batch = batch or self.default_batch
        self.steps = steps or self.default_steps
        self.eval_every = eval_every or self.default_eval_every

    @abstractmethod
    def model(self, seed: int) -> nn.Module:
        """A fresh model, initialised from ``torch.manual_seed(seed)``."""

    @abstractmethod
    def sample(self, generator: torch.Generator, batch: int) -> Batch:
        """``batch`` training examples drawn with replacement."""

    @abstractmethod
    def criterion(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The mean loss of ``outputs`` (the model's) against ``targets``."""

    @abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """The metric (key ``"metric"``) and the extras; :meth:`measure` calls it in eval mode without gradients."""

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return self.criterion(model(batch[0]), batch[1])

    def measure(self, model: nn.Module) -> dict[str, float]:
        """:meth:`evaluate` in eval mode without gradients, the model's mode restored."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return {k: float(v) for k, v in self.evaluate(model).items()}
        finally:
            model.train(was_training)

    def matrices(self, model: nn.Module) -> list[nn.Parameter]:
        """Muon's parameters: every 2-d weight (the output layer's included; conv kernels, 4-d, are not)."""
        return [p for p in model.parameters() if p.dim() == 2]

    def info(self) -> dict[str, Any]:
        return {"metric": self.metric_name, "higher_is_better": self.higher_is_better, "batch": self.batch,
                "default_batch": self.default_batch, "steps": self.steps, "eval_every": self.eval_every,
                "adaptive_loss": self.adaptive_loss}


class _Digits(Workload):
    """Digits with the fixed split; batches are drawn from the training indices."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.x, self.y = digits()
        self.train, self.test = split(len(self.x))

    def sample(self, generator: torch.Generator, batch: int) -> Batch:
        idx = self.train[torch.randint(0, len(self.train), (batch,), generator=generator)]
        return self.x[idx], self.y[idx]


def mlp(dims: list[int]) -> nn.Sequential:
    """Linear layers of widths ``dims`` with tanh between them."""
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


class Autoencoder(_Digits):
    name, default_batch, default_steps, default_eval_every = "autoencoder", 256, 300, 10
    metric_name, higher_is_better, adaptive_loss = "full-data Bernoulli loss", False, "bernoulli"
    dims = [64, 128, 64, 32, 8, 32, 64, 128, 64]

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return mlp(self.dims)

    def sample(self, generator: torch.Generator, batch: int) -> Batch:
        x = super().sample(generator, batch)[0]
        return x, x

    def criterion(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(outputs, targets)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"metric": float(self.criterion(model(self.x), self.x))}


class Classification(_Digits):
    name, default_batch, default_steps, default_eval_every = "classification", 512, 200, 10
    metric_name, higher_is_better, adaptive_loss = "test accuracy", True, "cross_entropy"
    dims = [64, 256, 256, 10]

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return mlp(self.dims)

    def criterion(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"metric": float((model(self.x[self.test]).argmax(1) == self.y[self.test]).float().mean())}


def batch_statistics_forward(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)`` in train mode, batch norm normalising by the statistics of ``x`` (the training objective's
    normalisation) without touching its running statistics; the model's mode is restored."""
    was_training = model.training
    buffers = {name: b.clone() for name, b in model.named_buffers()}  # updated in place of the module's own
    model.train()
    try:
        return torch.func.functional_call(model, buffers, (x,))
    finally:
        model.train(was_training)


class CNN(_Digits):
    name, default_batch, default_steps, default_eval_every = "cnn", 128, 120, 5
    metric_name, higher_is_better, adaptive_loss = "full training-set loss", False, "cross_entropy"
    extras_higher_is_better = {"test_accuracy": True, "test_loss": False}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.x = self.x.reshape(-1, 1, 8, 8)

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(4, 32), nn.ReLU(), nn.MaxPool2d(2),  # 32x4x4
            nn.Flatten(), nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 10))

    def criterion(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        train = F.cross_entropy(batch_statistics_forward(model, self.x[self.train]).double(), self.y[self.train])
        test = model(self.x[self.test])
        accuracy = (test.argmax(1) == self.y[self.test]).float().mean()
        return {"metric": float(train), "test_accuracy": float(accuracy),
                "test_loss": float(F.cross_entropy(test.double(), self.y[self.test]))}


LM_MODULES = ("textwrap", "contextlib", "random", "string", "queue", "bisect", "sched", "glob", "fnmatch", "graphlib",
              "functools", "fractions", "heapq")
"""Standard-library modules whose source, concatenated in this order, is the language model's text."""


def stdlib_text(modules: tuple[str, ...] = LM_MODULES) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    return "".join((root / f"{m}.py").read_text(encoding="utf-8") for m in modules)


class TinyLM(nn.Module):
    """Token + learned position embeddings, pre-norm transformer encoder layers under a causal mask, LayerNorm, a
    linear head: ``(N, T)`` token ids -> ``(N, T, vocab)`` logits."""

    mask: Tensor

    def __init__(self, vocab: int, context: int, d_model: int = 64, heads: int = 4, ff: int = 128,
                 layers: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=ff, dropout=0.0, batch_first=True,
                                       norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        t = ids.shape[1]
        positions = torch.arange(t, device=ids.device).expand_as(ids)
        h = self.tok(ids) + self.pos(positions)
        for layer in self.layers:
            h = layer(h, src_mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


class LanguageModel(Workload):
    name, default_batch, default_steps, default_eval_every = "lm", 32, 200, 10
    metric_name, higher_is_better, adaptive_loss = "held-out loss (nats/char)", False, "cross_entropy"
    context = 32
    held_out = 0.1  # the last tenth of the text
    eval_windows = 256  # non-overlapping windows of the held-out slice, its start

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        text = stdlib_text()
        self.chars = sorted(set(text))
        ids = self._encode(text)
        cut = int(len(ids) * (1 - self.held_out))
        self.train_ids, held = ids[:cut], ids[cut:]
        n = min(self.eval_windows, (len(held) - 1) // self.context)
        starts = torch.arange(n) * self.context
        self.eval_batch = self._windows(held, starts)
        self.text_sha256 = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.text_chars = len(text)

    def _encode(self, text: str) -> Tensor:
        index = {c: i for i, c in enumerate(self.chars)}
        return torch.tensor([index[c] for c in text])

    def _windows(self, ids: Tensor, starts: Tensor) -> Batch:
        pos = starts[:, None] + torch.arange(self.context + 1)
        chunk = ids[pos]
        return chunk[:, :-1], chunk[:, 1:]

    def sample(self, generator: torch.Generator, batch: int) -> Batch:
        starts = torch.randint(0, len(self.train_ids) - self.context, (batch,), generator=generator)
        return self._windows(self.train_ids, starts)

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return TinyLM(len(self.chars), self.context)

    def criterion(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"metric": float(self.loss(model, self.eval_batch))}

    def matrices(self, model: nn.Module) -> list[nn.Parameter]:
        """The transformer layers' 2-d weights: embeddings and head stay with AdamW, as Muon's docs recommend."""
        assert isinstance(model, TinyLM)
        return [p for p in model.layers.parameters() if p.dim() == 2]

    def info(self) -> dict[str, Any]:
        return {**super().info(), "context": self.context, "vocab": len(self.chars), "text_chars": self.text_chars,
                "text_sha256_16": self.text_sha256, "text_modules": list(LM_MODULES),
                "python": sys.version.split()[0], "held_out_tokens": int(self.eval_batch[1].numel())}


WORKLOADS: dict[str, type[Workload]] = {w.name: w for w in (Autoencoder, Classification, CNN, LanguageModel)}


QUICK_STEPS, QUICK_EVAL_EVERY = 20, 5


def build(name: str, *, batch_multiplier: int = 1, quick: bool = False) -> Workload:
    """Workload ``name`` at ``batch_multiplier`` times its default batch (``quick``: a smoke-test budget)."""
    cls = WORKLOADS[name]
    batch = cls.default_batch * batch_multiplier
    return cls(batch=batch, steps=QUICK_STEPS, eval_every=QUICK_EVAL_EVERY) if quick else cls(batch=batch)
