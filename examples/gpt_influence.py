"""A small GPT on text that ships with Python, trained by AdamW and by K-FAC; then influence: which training
sequences most support a generated continuation, token by token.

1. Corpus: the docstrings of a few standard-library modules (offline), character-level, cut into sequences of
   ``--seq-len`` characters.
2. Model: a causal transformer (token and position embeddings, ``nn.TransformerEncoder`` with a causal mask, a
   linear head). K-FAC preconditions the embeddings, the attention in/out projections, the MLPs and the head
   (LayerNorms keep their plain gradients). AdamW and K-FAC (around SGD with momentum) train the same
   initialisation on the same batches; the table gives both losses.
3. Influence on the K-FAC-trained model: ``InfluenceAnalyzer(model, CausalLMTask(), method="ekfac")`` fits once;
   a continuation is generated greedily from ``--prompt``; ``per_token_scores`` splits each training sequence's
   score over its characters, and the top sequences are printed with their most influential characters marked.

Writes ``gpt_influence.json`` to ``--out-dir``. Offline, about a minute on 2 cores (``--quick``: seconds).

    python examples/gpt_influence.py [--steps 300] [--prompt "The "] [--out-dir examples/output]
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kfac
from kfac.influence import CausalLMTask, InfluenceAnalyzer

DEFAULT_OUT = Path(__file__).resolve().parent / "output"
MODULES = ("string", "textwrap", "json", "functools", "collections", "itertools", "pathlib", "argparse", "inspect")


def corpus(modules: tuple[str, ...] = MODULES) -> str:
    """Docstrings of standard-library ``modules`` and their public functions/classes (offline, deterministic)."""
    import importlib

    parts = []
    for name in modules:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(dir(module)):
            obj = getattr(module, attr)
            if not attr.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)):
                parts.append(inspect.getdoc(obj) or "")
    text = " ".join(" ".join(p.split()) for p in parts if p)
    return "".join(c for c in text if 32 <= ord(c) < 127)


class GPT(nn.Module):
    def __init__(self, vocab: int, seq_len: int, dim: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq_len, dim)
        block = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        t = ids.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(t, dtype=self.head.weight.dtype)
        h = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))
        return self.head(self.norm(self.body(h, mask=causal, is_causal=True)))


def sequences(text: str, seq_len: int) -> tuple[list[str], Tensor]:
    """The text's symbols (sorted) and its characters as ids, cut into ``(n, seq_len)`` sequences."""
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    encoded = torch.tensor([index[c] for c in text])
    n = (len(encoded) - 1) // seq_len
    return chars, encoded[: n * seq_len].reshape(n, seq_len)


def lm_loss(model: nn.Module, ids: Tensor) -> Tensor:
    logits = model(ids)[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train(name: str, model: nn.Module, data: Tensor, steps: int, batch: int, seed: int) -> list[float]:
    if name == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LayerNorms keep their plain gradients (listed in .skipped)
            opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9), inv_update_steps=10)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        ids = data[torch.randint(0, len(data), (batch,), generator=g)]
        opt.zero_grad()
        loss = lm_loss(model, ids)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def generate(model: nn.Module, prompt: Tensor, length: int, seq_len: int) -> Tensor:
    ids = prompt[None]
    while ids.shape[1] < min(len(prompt) + length, seq_len):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[0]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--prompt", default="Return the ")
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--quick", action="store_true", help="a few steps on a short corpus (tests)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    text = corpus()[: 4000 if args.quick else 40000]
    chars, data = sequences(text, args.seq_len)
    index, n = {c: i for i, c in enumerate(chars)}, len(data)
    steps = 10 if args.quick else args.steps
    print(f"corpus: {len(text)} characters of standard-library docstrings, {len(chars)} symbols, {n} sequences of "
          f"{args.seq_len}")

    results: dict[str, Any] = {"steps": steps, "sequences": n}
    models = {}
    for name in ("adamw", "kfac"):
        torch.manual_seed(args.seed)
        model = GPT(len(chars), args.seq_len)
        start = time.perf_counter()
        losses = train(name, model, data, steps, args.batch_size, args.seed)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            full = float(lm_loss(model, data))
        models[name] = model
        results[name] = {"final_batch_loss": losses[-1], "corpus_loss": full, "seconds": seconds}
        print(f"{name:6s} corpus loss after {steps} steps: {full:.3f}  ({1000 * seconds / steps:.0f} ms/step)")

    model = models["kfac"].eval()
    prompt = torch.tensor([index.get(c, 0) for c in args.prompt])
    query = generate(model, prompt, args.seq_len - len(prompt), args.seq_len)
    continuation = "".join(chars[i] for i in query.tolist())
    print(f"\nK-FAC model continues {args.prompt!r} as {continuation!r}")
    train_batches = [data[i:i + 64] for i in range(0, n, 64)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LayerNorms get no influence (listed in analyzer.skipped)
        analyzer = InfluenceAnalyzer(model, CausalLMTask(), method="ekfac", progress=False).fit(train_batches)
    tokens = analyzer.per_token_scores([query[None]], train_batches)[0]   # [n, seq_len]
    totals = tokens.sum(-1)
    top = torch.topk(totals, min(args.top_k, n)).indices.tolist()
    rows = []
    print("\nmost supporting training sequences (score; the 4 most influential characters in [brackets]):")
    for j in top:
        seq = "".join(chars[i] for i in data[j].tolist())
        marks = set(torch.topk(tokens[j], 4).indices.tolist())
        shown = "".join(f"[{c}]" if t in marks else c for t, c in enumerate(seq))
        print(f"  #{j:4d} {float(totals[j]):9.3g}  {shown!r}")
        rows.append({"sequence": j, "text": seq, "score": float(totals[j]),
                     "per_token": [float(v) for v in tokens[j]]})
    results.update(prompt=args.prompt, continuation=continuation, top=rows)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "gpt_influence.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {args.out_dir / 'gpt_influence.json'}")
    return results


if __name__ == "__main__":
    main()
