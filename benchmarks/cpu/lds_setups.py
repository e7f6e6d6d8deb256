"""The models of the LDS peer benchmark (``lds_peers.py``): data, the full model, the subset models and their losses.

Three settings, each trained deterministically from fixed initial weights, so that the training subset is the only
thing that differs between the full model and a subset model:

* ``logreg``: multinomial logistic regression ``nn.Linear(64, 10)`` on digits, full-batch L-BFGS on mean
  cross-entropy + ``weight_decay / 2 ||theta||^2`` (strongly convex: exact influence is well defined);
* ``mlp``: the MLP 64-128-10 (tanh) of ``influence.py``, trained the same way (``influence.py``'s own helpers);
* ``lm``: a tiny GPT (``examples/gpt_influence.py``'s ``GPT``: 1 layer, dim 32, 2 heads) on the first characters of
  ``gpt_influence.corpus()`` (standard-library docstrings), cut into sequences; full-batch AdamW for a fixed number
  of steps (deterministic; not to convergence: the default, 125, is where the full model's held-out query loss stops
  falling -- a training choice, made without the LDS subsets). A sequence's measurement is its summed next-token cross-entropy;
  the queries are the sequences that follow the training text.

Every training run also records a few checkpoints along its trajectory (for TracIn; the other methods use only the
final model). Subsets: ``count`` random subsets holding ``fraction`` of the training set (``torch.Generator``
seeded with ``seed + 1``, as in ``influence.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.cpu.influence import batches, choose_queries, make_model, per_example_loss, train_lbfgs
from _digits import load_data  # examples/ is on sys.path: influence.py puts it there
from gpt_influence import GPT, corpus, lm_loss, sequences

TRACIN_CHECKPOINTS = 4
"""Checkpoints TracIn sums over: evenly spaced along the training trajectory, the last one the final model."""


@dataclass
class Setting:
    """One model: its data, the trained full model, the queries and (after :func:`retrain_subsets`) the LDS data."""

    name: str
    description: str
    kind: str  # "classification" or "lm"
    model: nn.Module
    train_data: tuple[Tensor, ...]  # (x, y) or (ids,)
    query_data: tuple[Tensor, ...]
    batch_size: int
    weight_decay: float
    info: dict[str, Any]
    checkpoints: list[dict[str, Tensor]]
    n_wrong: int = 0  # misclassified queries (first in the query order)
    masks: Tensor | None = None
    losses: Tensor | None = None
    subsets: dict[str, Any] = field(default_factory=dict)
    recipe: Any = None  # the Recipe that trained it (subset models are trained the same way)

    @property
    def n_train(self) -> int:
        return len(self.train_data[0])

    def batched(self, data: tuple[Tensor, ...]) -> list[Any]:
        """Batches as ``InfluenceAnalyzer`` takes them: ``(x, y)`` tuples or id tensors."""
        if self.kind == "lm":
            ids = data[0]
            return [ids[i:i + self.batch_size] for i in range(0, len(ids), self.batch_size)]
        return batches(*data, self.batch_size)


class Trajectory:
    """Snapshots of the parameters at each forward pass of training (a forward pre-hook), for TracIn."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.flat = model, []
        self.handle = model.register_forward_pre_hook(lambda m, a: self.flat.append(self._vector()))

    def _vector(self) -> Tensor:
        return torch.cat([p.detach().flatten() for p in self.model.parameters()]).clone()

    def close(self, count: int) -> list[dict[str, Tensor]]:
        """``count`` checkpoints evenly spaced over the recorded passes, the last one the final parameters."""
        self.handle.remove()
        self.flat.append(self._vector())
        picks = [round(len(self.flat) * (i + 1) / count) - 1 for i in range(count)]
        out = []
        for k in picks:
            vec, state, offset = self.flat[k], {}, 0
            for name, p in self.model.named_parameters():
                state[name] = vec[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()
            out.append(state)
        self.flat = []
        return out


# ---- models and training ----------------------------------------------------------------------------------------

def make_logreg(seed: int) -> nn.Module:
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    finally:
        torch.random.set_rng_state(state)


def make_lm(vocab: int, seq_len: int, seed: int) -> nn.Module:
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return GPT(vocab, seq_len, dim=32, heads=2, layers=1)
    finally:
        torch.random.set_rng_state(state)


def train_lm(model: nn.Module, ids: Tensor, *, steps: int, lr: float, weight_decay: float) -> dict[str, float]:
    """Full-batch AdamW on the mean next-token cross-entropy (deterministic)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = lm_loss(model, ids)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        final = float(lm_loss(model, ids))
    return {"iterations": steps, "objective": final, "wall_s": time.perf_counter() - start}


@torch.no_grad()
def sequence_loss(model: nn.Module, ids: Tensor) -> Tensor:
    """Summed next-token cross-entropy of each sequence (``CausalLMTask``'s loss and measurement)."""
    model.eval()
    logits = model(ids)[:, :-1]
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").sum(1)


class Recipe:
    """How one setting builds, trains and measures a model (the same for the full model and every subset)."""

    def __init__(self, name: str, args: Any) -> None:
        self.name, self.args = name, args
        if name == "lm":
            text = corpus()[: args.lm_chars]
            self.chars, ids = sequences(text, args.lm_seq_len)
            self.n_query = min(args.lm_queries, len(ids) // 4)
            self.train_data: tuple[Tensor, ...] = (ids[: len(ids) - self.n_query],)
            self.query_pool: tuple[Tensor, ...] = (ids[len(ids) - self.n_query:],)
        else:
            data = load_data()
            self.train_data = (data.x_train, data.y_train)
            self.query_pool = (data.x_test, data.y_test)

    def model(self) -> nn.Module:
        a = self.args
        if self.name == "logreg":
            return make_logreg(a.seed)
        if self.name == "mlp":
            return make_model("mlp", a.seed, a.hidden)
        return make_lm(len(self.chars), a.lm_seq_len, a.seed)

    def train(self, model: nn.Module, data: tuple[Tensor, ...]) -> dict[str, float]:
        a = self.args
        if self.name == "lm":
            return train_lm(model, data[0], steps=a.lm_steps, lr=a.lm_lr, weight_decay=a.lm_weight_decay)
        return train_lbfgs(model, *data, weight_decay=a.weight_decay, max_iter=a.max_iter)

    def measure(self, model: nn.Module, data: tuple[Tensor, ...]) -> Tensor:
        return sequence_loss(model, data[0]) if self.name == "lm" else per_example_loss(model, *data)

    def description(self, model: nn.Module) -> str:
        a, p = self.args, sum(q.numel() for q in model.parameters())
        if self.name == "logreg":
            return f"logistic regression 64->10 on digits ({p} parameters)"
        if self.name == "mlp":
            return f"MLP 64-{a.hidden}-10 tanh on digits ({p} parameters)"
        return (f"GPT 1 layer, dim 32, 2 heads, seq_len {a.lm_seq_len} on {a.lm_chars} characters of stdlib "
                f"docstrings ({p} parameters)")


def build(name: str, args: Any) -> Setting:
    """Train the full model of setting ``name`` and choose its queries."""
    recipe = Recipe(name, args)
    model = recipe.model()
    trajectory = Trajectory(model)
    info = recipe.train(model, recipe.train_data)
    checkpoints = trajectory.close(TRACIN_CHECKPOINTS)
    n_wrong = 0
    if name == "lm":
        query = recipe.query_pool
        info["query_loss_per_token"] = float(recipe.measure(model, query).mean() / (args.lm_seq_len - 1))
        wd, bs = args.lm_weight_decay, args.lm_batch_size
    else:
        xt, yt = recipe.query_pool
        with torch.no_grad():
            model.eval()
            pred = model(xt).argmax(1)
        info["test_accuracy"] = float((pred == yt).float().mean())
        q_idx, n_wrong = choose_queries(pred, yt, args.queries, args.seed)
        query = (xt[q_idx], yt[q_idx])
        info["query_test_indices"] = q_idx.tolist()
        wd, bs = args.weight_decay, args.batch_size
    model.eval()
    return Setting(name, recipe.description(model), "lm" if name == "lm" else "classification", model,
                   recipe.train_data, query, bs, wd, info, checkpoints, n_wrong, recipe=recipe)


def retrain_subsets(setting: Setting, count: int, fraction: float, seed: int, log: Any) -> None:
    """Train a model on each of ``count`` random subsets (same initial weights and recipe); record the queries'
    measurements in ``setting.losses`` ``[count, Q]`` and the subsets in ``setting.masks`` ``[count, n]``."""
    recipe: Recipe = setting.recipe
    n = setting.n_train
    gen = torch.Generator().manual_seed(seed + 1)
    size = round(fraction * n)
    masks = torch.zeros(count, n, dtype=torch.bool)
    losses = torch.empty(count, len(setting.query_data[0]), dtype=torch.float64)
    start = time.perf_counter()
    for k in range(count):
        masks[k, torch.randperm(n, generator=gen)[:size]] = True
        m = recipe.model()
        recipe.train(m, tuple(t[masks[k]] for t in setting.train_data))
        losses[k] = recipe.measure(m, setting.query_data).double()
        if (k + 1) % max(1, count // 4) == 0:
            log(f"  {setting.name}: subset models {k + 1}/{count} ({time.perf_counter() - start:.1f}s)")
    setting.masks, setting.losses = masks, losses
    setting.subsets = {"count": count, "fraction": fraction, "size": size, "train_s": time.perf_counter() - start,
                       "init": f"same initial weights (seed {seed}) and training recipe as the full model"}
