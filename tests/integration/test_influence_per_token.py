"""Per-token influence scores (``InfluenceAnalyzer.per_token_scores``, kronfluence's ``compute_per_token_scores``)
on a small causal language model: they sum over tokens to the pairwise scores; for one layer they equal the dot
product of the query's gradient with the per-position pieces ``g_nt a_nt^T`` of the training example's gradient,
taken from autograd directly; masked (padded) positions score zero."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import single_thread  # noqa: F401
from kfac.influence import CausalLMTask, InfluenceAnalyzer

F64 = dict(factor_dtype=torch.float64, score_dtype=torch.float64, progress=False)
VOCAB, T = 20, 7


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 8)
        layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, ids, attention_mask=None):
        causal = nn.Transformer.generate_square_subsequent_mask(ids.shape[1], dtype=self.head.weight.dtype)
        return self.head(self.encoder(self.emb(ids), mask=causal, is_causal=True))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (6, T), generator=g), torch.randint(0, VOCAB, (2, T), generator=g)


@pytest.mark.parametrize("method", ["identity", "ekfac"])
def test_per_token_scores_sum_to_the_pairwise_scores(method):
    model = TinyLM().double()
    train, queries = _data()
    an = InfluenceAnalyzer(model, CausalLMTask(), method=method, **F64).fit([train[:3], train[3:]])
    tokens = an.per_token_scores([queries], [train[:4], train[4:]])
    assert tokens.shape == (2, 6, T)
    torch.testing.assert_close(tokens.sum(-1), an.pairwise_scores([queries], [train]), rtol=1e-9, atol=1e-11)


def test_one_layers_per_token_scores_equal_autograd_per_position_pieces():
    model = TinyLM().double()
    train, queries = _data()
    task = CausalLMTask()
    an = InfluenceAnalyzer(model, task, method="identity", **F64).fit([train])
    got = an.per_token_scores([queries], [train], per_layer=True)["head"]
    head = model.head

    def query_gradient(ids):
        g = torch.autograd.grad(task.loss(model, ids).sum(), [head.weight, head.bias])
        return torch.cat([g[0], g[1][:, None]], 1)

    want = torch.empty(2, 6, T, dtype=torch.float64)
    for n in range(6):
        seen = {}
        handle = head.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
        loss = task.loss(model, train[n:n + 1]).sum()
        handle.remove()
        g_out, = torch.autograd.grad(loss, seen["out"])                      # (1, T, V): dL/dlogits per position
        a = torch.cat([seen["x"], torch.ones(1, T, 1, dtype=torch.float64)], 2)  # (1, T, 9)
        pieces = torch.einsum("tv,ta->tva", g_out[0], a[0].detach())          # g_t a_t^T per position
        for q in range(2):
            want[q, n] = (pieces * query_gradient(queries[q:q + 1])).sum((1, 2))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_masked_positions_score_zero_and_layers_of_other_lengths_are_a_clear_error():
    model = TinyLM().double()
    train, queries = _data()
    mask = torch.ones_like(train)
    mask[:, 5:] = 0  # the last two positions are padding
    an = InfluenceAnalyzer(model, CausalLMTask(), method="ekfac", **F64).fit([{"input_ids": train,
                                                                              "attention_mask": mask}])
    tokens = an.per_token_scores([queries], [{"input_ids": train, "attention_mask": mask}])
    assert (tokens[..., 5:] == 0).all() and (tokens[..., :5] != 0).any()

    class Pooled(nn.Module):  # a head after pooling sees one position per example, the encoder T
        def __init__(self) -> None:
            super().__init__()
            self.lm = TinyLM()
            self.pool = nn.Linear(VOCAB, VOCAB)

        def forward(self, ids, attention_mask=None):
            out = self.lm(ids)
            return torch.cat([out[:, :-1], self.pool(out.mean(1, keepdim=True))], 1)

    pooled = Pooled().double()
    an = InfluenceAnalyzer(pooled, CausalLMTask(), method="identity", **F64).fit([train])
    with pytest.raises(ValueError, match="same number of positions"):
        an.per_token_scores([queries], [train])


def test_padded_positions_are_left_out_of_the_factors_and_row_counts():
    """A padded batch with an attention mask gives the factors of the unpadded sequences fitted one by one: the
    task's positions() leave padded rows out of A, G and the row counts (causal model: real positions never see the
    padding)."""
    torch.manual_seed(3)
    short, long = torch.randint(0, VOCAB, (5,)), torch.randint(0, VOCAB, (T,))
    padded = torch.stack([torch.cat([short, torch.randint(0, VOCAB, (T - 5,))]), long])
    mask = torch.ones(2, T, dtype=torch.long)
    mask[0, 5:] = 0
    args = dict(method="kfac", fisher="empirical", **F64)
    masked = InfluenceAnalyzer(TinyLM().double(), CausalLMTask(), **args).fit(
        [{"input_ids": padded, "attention_mask": mask}])
    reference = InfluenceAnalyzer(TinyLM().double(), CausalLMTask(), **args).fit([short[None], long[None]])
    unmasked = InfluenceAnalyzer(TinyLM().double(), CausalLMTask(), **args).fit([padded])
    for name in masked.layers:
        torch.testing.assert_close(masked.store[name].A, reference.store[name].A, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(masked.store[name].G, reference.store[name].G, rtol=1e-10, atol=1e-13)
    assert not torch.allclose(unmasked.store["head"].A, reference.store["head"].A)  # padding would have entered A
