"""Per-example gradients (EK-FAC's corrections, influence's gradients) of every layer of a transformer in both
layouts: ``sum_t g[n, t] a[n, t]^T`` from an adapter's :meth:`example_rows` equals example ``n``'s gradient from
``torch.func`` (float64). Sequence-first layers see ``(T, N, E)``; grouping their rows by the leading dimension
would mix examples (positions taken for examples), which made distributed EK-FAC differ from one process."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from kfac.tracking import track_layers

from helpers import single_thread  # noqa: F401  (autouse fixture)

V, E, T, N = 11, 8, 5, 4


class LM(nn.Module):
    """Token embedding -> encoder layer -> mean over positions -> head, in the layout of ``batch_first``."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(V, E)
        self.layer = nn.TransformerEncoderLayer(E, 2, 12, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(E, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(ids)).mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "sequence_first"])
def test_per_example_rows_group_examples_in_both_layouts(batch_first):
    torch.manual_seed(0)
    model = LM(batch_first).double()
    ids = torch.randint(0, V, (N, T))
    ids = ids if batch_first else ids.T.contiguous()
    y = torch.randint(0, 3, (N,))
    tracked = {t.name: t.adapter for t in track_layers(model).layers}
    names = ["embed", "layer.linear1", "layer.linear2", "head"]
    seen: dict[str, list[torch.Tensor]] = {}

    def hook(name):
        def fn(module, args, output):
            output.register_hook(lambda g: seen.setdefault(name, []).extend([args[0].detach(), g.detach()]))
        return fn

    handles = [dict(model.named_modules())[n].register_forward_hook(hook(n)) for n in names]
    F.cross_entropy(model(ids), y, reduction="sum").backward()
    for h in handles:
        h.remove()

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, one_ids, one_y):
        batch_ids = one_ids[None] if batch_first else one_ids[:, None]
        return F.cross_entropy(functional_call(model, p, (batch_ids,)), one_y[None], reduction="sum")

    per_example = vmap(grad(loss), in_dims=(None, 0 if batch_first else 1, 0))(params, ids, y)
    for name in names:
        adapter = tracked[name]
        x, g = seen[name]
        a_rows, g_rows = adapter.example_rows(x, g, torch.float64)
        got = torch.einsum("ntg,nta->nga", g_rows, a_rows) * adapter.example_scale(a_rows.shape[1])
        grads = [per_example[f"{name}.{k}"] for k in ("weight", "bias") if f"{name}.{k}" in per_example]
        want = torch.stack([adapter.matrix_of([t[n] for t in grads]) for n in range(N)])
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
