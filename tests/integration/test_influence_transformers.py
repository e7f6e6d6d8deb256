"""Influence on attention models without rewriting them: nn.MultiheadAttention (TransformerEncoder) and, where
``transformers`` is installed, a tiny GPT-2 (Conv1D, tied head) with the causal-LM task. With ``method="identity"``
the scores are plain per-example gradient dot products over the tracked parameters, checked against autograd one
example at a time (this checks the attention layers' per-example rows); the K-FAC scores are finite and the
self-influence of a training example is positive."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import float64_default, single_thread  # noqa: F401
from kfac.influence import CausalLMTask, ClassificationTask, InfluenceAnalyzer

F64 = dict(factor_dtype=torch.float64, score_dtype=torch.float64, progress=False)


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(5, 8)
        layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def _plain_gradient_scores(model, task, analyzer, queries, train):
    """Per-example gradients of the tracked layers' parameters, one example at a time, and their dot products."""
    modules = dict(model.named_modules())
    params = []
    for layer in analyzer.layers:
        m = modules[layer]
        params += [m.in_proj_weight, m.in_proj_bias] if isinstance(m, nn.MultiheadAttention) \
            else list(m.parameters(recurse=False))

    def grads(batch):
        if isinstance(batch, dict):
            n = len(next(iter(batch.values())))
        else:
            n = len(batch[0]) if isinstance(batch, tuple) else batch.shape[0]
        rows = []
        for i in range(n):
            if isinstance(batch, dict):
                one = {k: v[i:i + 1] for k, v in batch.items()}
            else:
                one = tuple(t[i:i + 1] for t in batch) if isinstance(batch, tuple) else batch[i:i + 1]
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(task.loss(model, one).sum(), params)]))
        return torch.stack(rows)

    return grads(queries) @ grads(train).T


def test_transformer_encoder_identity_scores_are_per_example_gradient_dot_products():
    model = Encoder().double()
    x, y = torch.randn(10, 4, 5, dtype=torch.float64), torch.randint(0, 3, (10,))
    an = InfluenceAnalyzer(model, ClassificationTask(), method="identity", **F64)
    assert {"encoder.layers.0.self_attn", "encoder.layers.0.self_attn.out_proj"} <= set(an.layers)
    an.fit([(x[:5], y[:5]), (x[5:], y[5:])])
    scores = an.pairwise_scores([(x[:3], y[:3])], [(x, y)])
    want = _plain_gradient_scores(model, ClassificationTask(), an, (x[:3], y[:3]), (x, y))
    torch.testing.assert_close(scores, want, rtol=1e-9, atol=1e-11)


def test_transformer_encoder_kfac_scores_are_finite_and_self_influence_positive():
    model = Encoder().double()
    x, y = torch.randn(12, 4, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    an = InfluenceAnalyzer(model, ClassificationTask(), method="ekfac", **F64).fit([(x[:6], y[:6]), (x[6:], y[6:])])
    scores = an.pairwise_scores([(x[:4], y[:4])], [(x, y)])
    assert scores.shape == (4, 12) and torch.isfinite(scores).all()
    assert (torch.diagonal(scores[:, :4]) > 0).all()


def test_gpt2_influence_with_the_causal_lm_task():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    ids = torch.randint(0, 40, (6, 8))
    task = CausalLMTask()
    an = InfluenceAnalyzer(model, task, method="identity", **F64)
    assert any(layer.endswith("attn.c_attn") for layer in an.layers)  # Conv1D, preconditioned
    an.fit([ids[:3], ids[3:]])
    scores = an.pairwise_scores([ids[:2]], [ids])
    torch.testing.assert_close(scores, _plain_gradient_scores(model, task, an, ids[:2], ids), rtol=1e-8,
                               atol=1e-10)
    ekfac = InfluenceAnalyzer(model, task, method="ekfac", **F64).fit([ids[:3], ids[3:]])
    kfac_scores = ekfac.pairwise_scores([ids[:2]], [ids])
    assert torch.isfinite(kfac_scores).all() and (torch.diagonal(kfac_scores[:, :2]) > 0).all()
    tokens = ekfac.per_token_scores([ids[:2]], [ids])  # [queries, train, tokens], summing to the totals
    assert tokens.shape == (2, 6, 8)
    torch.testing.assert_close(tokens.sum(-1), kfac_scores, rtol=1e-8, atol=1e-10)


def test_tracked_modules_selects_a_layer_whose_parent_holds_parameters():
    """A ViT-style encoder owns its position embedding and contains the layers: listing one of those layers tracks
    it (the parent is not tracked, but its children are still found), and an embedding-only model is a clear
    error rather than an internal one."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(1, 4, 5))  # the parent's own parameter
            self.fc = nn.Linear(5, 5)

        def forward(self, x):
            return self.fc(x + self.pos)

    model = nn.Sequential(Block(), nn.Flatten(), nn.Linear(20, 3)).double()
    an = InfluenceAnalyzer(model, ClassificationTask(), tracked_modules=["0.fc"], **F64)
    assert an.layers == ["0.fc"]
    assert dict(an.skipped)["2"] == "not listed in tracked_modules"
    with pytest.raises(ValueError, match="no supported layer"):
        InfluenceAnalyzer(nn.Sequential(nn.Embedding(5, 3)), ClassificationTask(), **F64)


def test_vision_transformer_influence_without_rewriting():
    """torchvision's VisionTransformer (patch conv, attention, MLP, LayerNorms; class token and position embedding
    owned by containers): identity scores are per-example gradient dot products over the tracked layers, EK-FAC
    scores are finite with positive self-influence, and the loose parameters are listed."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=8, patch_size=4, num_layers=1, num_heads=2,
                                                 hidden_dim=8, mlp_dim=16, num_classes=3).double().eval()
    x, y = torch.randn(8, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (8,))
    task = ClassificationTask()
    an = InfluenceAnalyzer(model, task, method="identity", **F64)
    assert {"conv_proj", "encoder.layers.encoder_layer_0.self_attention", "heads.head"} <= set(an.layers)
    assert any("loose parameters ['class_token']" in r for _, r in an.skipped)
    an.fit([(x, y)])
    scores = an.pairwise_scores([(x[:2], y[:2])], [(x, y)])
    torch.testing.assert_close(scores, _plain_gradient_scores(model, task, an, (x[:2], y[:2]), (x, y)),
                               rtol=1e-8, atol=1e-10)
    # torchvision zero-initialises the head, so every layer below it has zero gradients and zero curvature: their
    # damping falls back (warned) and they add exactly nothing, instead of 0/0
    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    with pytest.warns(UserWarning, match="zero curvature"):
        ekfac = InfluenceAnalyzer(model, task, method="ekfac", **F64).fit(data)
    head = InfluenceAnalyzer(model, task, method="ekfac", tracked_modules=["heads.head"], **F64).fit(data)
    torch.testing.assert_close(ekfac.pairwise_scores([(x[:3], y[:3])], [(x, y)]),
                               head.pairwise_scores([(x[:3], y[:3])], [(x, y)]), rtol=1e-10, atol=0)
    with torch.no_grad():
        model.heads.head.weight.normal_()
    ekfac = InfluenceAnalyzer(model, task, method="ekfac", **F64).fit(data)
    s = ekfac.pairwise_scores([(x[:3], y[:3])], [(x, y)])
    assert torch.isfinite(s).all() and (torch.diagonal(s[:, :3]) > 0).all()


class BertTask(ClassificationTask):
    """Sequence classification with a padding mask: batches are dicts of input_ids, attention_mask and labels."""

    def loss(self, model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return torch.nn.functional.cross_entropy(out.logits, batch["labels"], reduction="none")

    def sampled_loss(self, model, batch, generator=None):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        y = torch.multinomial(logits.detach().softmax(-1), 1, generator=generator).squeeze(1)
        return torch.nn.functional.cross_entropy(logits, y, reduction="none")

    def positions(self, batch):
        return batch["attention_mask"]


def test_bert_influence_with_padding_masks_and_per_token_scores():
    """A tiny BERT classifier on padded sequences: identity scores equal autograd per-example dot products, EK-FAC
    per-token scores sum to the totals, and padded positions of the training sequences score exactly zero."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                     intermediate_size=32, vocab_size=40, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).double().eval()
    ids = torch.randint(1, 40, (6, 7))
    mask = torch.ones(6, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[4, 2:] = 0
    ids = ids * mask  # pad id 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (6,))}
    first = {k: v[:2] for k, v in batch.items()}
    task = BertTask()
    an = InfluenceAnalyzer(model, task, method="identity", **F64)
    an.fit([batch])
    torch.testing.assert_close(an.pairwise_scores([first], [batch]),
                               _plain_gradient_scores(model, task, an, first, batch), rtol=1e-8, atol=1e-10)
    ekfac = InfluenceAnalyzer(model, task, method="ekfac", tracked_modules=[
        n for n in an.layers if n.startswith("bert.encoder")], **F64).fit([batch])
    totals = ekfac.pairwise_scores([first], [batch])
    tokens = ekfac.per_token_scores([first], [batch])
    assert tokens.shape == (2, 6, 7) and torch.isfinite(tokens).all()
    torch.testing.assert_close(tokens.sum(-1), totals, rtol=1e-8, atol=1e-10)
    assert (tokens[:, mask == 0] == 0).all()
