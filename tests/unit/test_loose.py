"""Loose parameters (issue 22 item 5): the own parameters of a container module (a ViT's class token and position
embedding, ConvNeXt's layer scale, a head's output bias) get a diagonal block from exact per-example gradients.
References in float64 from ``torch.func`` over the whole model: ``A = Σ_n v_n² / N`` with ``v_n`` example ``n``'s
gradient of the mean loss (they add up to the batch gradient), ``G = 1``, and K-FAC's update
``grad / (A + damping)`` entrywise; a block whose per-example gradients cannot be taken is untracked at its first
statistics step, warned and listed in ``skipped``, while the other layers keep theirs."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import kfac
from kfac.modules.loose import BiasAdapter, LooseAdapter

from helpers import single_thread  # noqa: F401  (autouse fixture)

DAMPING = 0.01


def _pre(model: nn.Module, **kw) -> kfac.KFACPreconditioner:
    return kfac.KFACPreconditioner(model, kl_clip=None, factor_dtype=torch.float64, factor_decay=0.0,
                                   damping=DAMPING, **kw)


def _per_example(model: nn.Module, loss, x: torch.Tensor, y: torch.Tensor, dim: int = 0) -> dict[str, torch.Tensor]:
    """Example ``n``'s gradient of the batch-mean loss ``loss(output, target)`` (its share: the sum of its
    terms over the number of terms of the batch), per parameter name, ``(N, *shape)``."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    total = loss(model(x), y, reduction="none").numel()

    def one(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(dim),))
        return loss(out, yi.unsqueeze(0), reduction="sum") / total

    return vmap(grad(one), in_dims=(None, dim, 0))(params, x, y)


def _check_block(pre: kfac.KFACPreconditioner, name: str, model: nn.Module, per: dict[str, torch.Tensor],
                 keys: list[str], raw: torch.Tensor) -> None:
    """``A``, ``G`` and the preconditioned gradient of block ``name`` over parameters ``keys`` (flattened in that
    order) against the per-example gradients ``per``; ``raw``: the batch gradient before ``step()``."""
    n = next(iter(per.values())).shape[0]
    v = torch.cat([per[k].reshape(n, -1) for k in keys], 1)
    torch.testing.assert_close(v.sum(0), raw, rtol=1e-10, atol=1e-13)  # the shares add up to the batch gradient
    a = (v ** 2).sum(0) / n
    torch.testing.assert_close(pre.store[name].A, a, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(pre.store[name].G, torch.ones(1, 1, dtype=torch.float64))
    params = dict(model.named_parameters())
    got = torch.cat([params[k].grad.reshape(-1) for k in keys])
    torch.testing.assert_close(got, raw / (a + DAMPING), rtol=1e-9, atol=1e-13)


def _grads(model: nn.Module, keys: list[str]) -> torch.Tensor:
    params = dict(model.named_parameters())
    return torch.cat([params[k].grad.reshape(-1) for k in keys]).clone()


class Encoder(nn.Module):
    """torchvision's ``Encoder``: owns the position embedding, adds it, runs its layers (no layout attribute)."""

    def __init__(self, d: int, tokens: int, batch_first: bool) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.randn(1, tokens, d) if batch_first else torch.randn(tokens, 1, d))
        self.layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=batch_first)
        self.ln = nn.LayerNorm(d)

    def forward(self, h):
        return self.ln(self.layer(h + self.pos_embedding))


class ViT(nn.Module):
    """A small ViT: patches ``(N, T, P)`` (``(T, N, P)`` sequence-first), a class token owned by the root (which
    declares its layout, or not: then its layers' ``batch_first`` tell), a position embedding owned by the
    encoder, the class token's output to the head."""

    def __init__(self, batch_first: bool, d: int = 8, tokens: int = 3, declared: bool = True) -> None:
        super().__init__()
        self.first = batch_first
        if declared:
            self.batch_first = batch_first
        self.proj = nn.Linear(4, d)
        self.class_token = nn.Parameter(torch.randn(1, 1, d))
        self.encoder = Encoder(d, tokens + 1, batch_first)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.proj(x)
        if self.first:
            h = torch.cat([self.class_token.expand(h.shape[0], -1, -1), h], 1)
            return self.head(self.encoder(h)[:, 0])
        h = torch.cat([self.class_token.expand(-1, h.shape[1], -1), h], 0)
        return self.head(self.encoder(h)[0])


@pytest.mark.parametrize("declared", [True, False], ids=["root_declares", "layers_declare"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "sequence_first"])
def test_vit_class_token_and_position_embedding_blocks_are_exact(batch_first, declared):
    torch.manual_seed(0)
    model = ViT(batch_first, declared=declared).double()
    pre = _pre(model)
    assert {"", "encoder"} <= set(pre.layers) and not pre.skipped
    assert all(type(pre.adapters[k]) is LooseAdapter for k in ("", "encoder"))
    assert pre.adapters[""].example_dim == pre.adapters["encoder"].example_dim == (0 if batch_first else 1)
    n = 5  # the sequence-first output (N, classes) has its examples first, unlike its input
    x, y = torch.randn(n, 3, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    x = x if batch_first else x.transpose(0, 1).contiguous()
    F.cross_entropy(model(x), y).backward()
    raw = {k: _grads(model, [k]) for k in ("class_token", "encoder.pos_embedding")}
    pre.step()
    per = _per_example(model, F.cross_entropy, x, y, dim=0 if batch_first else 1)
    _check_block(pre, "", model, per, ["class_token"], raw["class_token"])
    _check_block(pre, "encoder", model, per, ["encoder.pos_embedding"], raw["encoder.pos_embedding"])


class CNBlock(nn.Module):
    """torchvision's ConvNeXt block: ``x + γ ⊙ branch(x)`` with the layer scale ``γ`` of shape ``(C, 1, 1)``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.layer_scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x):
        h = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        h = self.fc2(F.gelu(self.fc1(h))).permute(0, 3, 1, 2)
        return x + self.layer_scale * h


def test_convnext_layer_scale_blocks_are_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 2, stride=2), CNBlock(4), CNBlock(4), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3)).double()
    pre = _pre(model)
    assert {"1", "2"} <= set(pre.layers) and not pre.skipped
    assert "1.fc1" in pre.layers  # the block's children keep their own layers
    x, y = torch.randn(6, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    F.cross_entropy(model(x), y).backward()
    raw = {k: _grads(model, [f"{k}.layer_scale"]) for k in ("1", "2")}
    pre.step()
    per = _per_example(model, F.cross_entropy, x, y)
    for k in ("1", "2"):
        _check_block(pre, k, model, per, [f"{k}.layer_scale"], raw[k])


class TiedLM(nn.Module):
    """A language model whose head reuses the embedding matrix but has its own output bias."""

    def __init__(self, vocab: int = 7, d: int = 5) -> None:
        super().__init__()
        self.emb, self.mid = nn.Embedding(vocab, d), nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)
        self.head.weight = self.emb.weight

    def forward(self, t):
        return self.head(torch.tanh(self.mid(self.emb(t))))


class PredictionHead(nn.Module):
    """BERT's ``BertLMPredictionHead``: owns the output bias, which its decoder (tied to the embedding) applies."""

    def __init__(self, emb: nn.Embedding) -> None:
        super().__init__()
        self.transform = nn.Linear(emb.embedding_dim, emb.embedding_dim)
        self.decoder = nn.Linear(emb.embedding_dim, emb.num_embeddings)
        self.bias = nn.Parameter(torch.randn(emb.num_embeddings))
        self.decoder.weight, self.decoder.bias = emb.weight, self.bias

    def forward(self, h):
        return self.decoder(torch.tanh(self.transform(h)))


class BertLike(nn.Module):
    def __init__(self, vocab: int = 7, d: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.predictions = PredictionHead(self.emb)

    def forward(self, t):
        return self.predictions(self.emb(t))


@pytest.mark.parametrize("kind", ["tied_head", "bert_prediction_head"])
def test_head_bias_block_is_exact(kind):
    """The bias of an output layer tied to the embedding: in the head itself, or owned by BERT's prediction head
    and applied by its decoder. Per-example gradient: the sum over the example's positions of the gradient w.r.t.
    the logits (no recomputation)."""
    torch.manual_seed(0)
    model = (TiedLM() if kind == "tied_head" else BertLike()).double()
    name, key = ("head", "head.bias") if kind == "tied_head" else ("predictions", "predictions.bias")
    pre = _pre(model)
    assert type(pre.adapters[name]) is BiasAdapter
    assert not [n for n, r in pre.skipped if not r.startswith("tied to")]
    t, y = torch.randint(0, 7, (4, 3)), torch.randint(0, 7, (4, 3))

    def loss(out, target, reduction="mean"):  # over every position, (N, T, V) logits
        return F.cross_entropy(out.reshape(-1, 7), target.reshape(-1), reduction=reduction)

    loss(model(t), y).backward()
    raw = _grads(model, [key])
    pre.step()
    _check_block(pre, name, model, _per_example(model, loss, t, y), [key], raw)


def test_partly_frozen_owner_gets_a_block_for_its_trainable_parameters():
    torch.manual_seed(0)
    model = ViT(True).double()
    model.register_parameter("frozen", nn.Parameter(torch.zeros(1), requires_grad=False))
    pre = _pre(model)
    assert pre.adapters[""].parameters() == [model.class_token]
    assert pre.adapters["encoder"].parameters() == [model.encoder.pos_embedding]


class Branchy(nn.Module):
    """Data-dependent control flow: not vmappable."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        h = self.fc(x)
        return h * self.scale if h.sum() > 0 else -h * self.scale


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return (self.fc(x) * self.scale,)


@pytest.mark.parametrize("owner", [Branchy, TupleOut])
def test_block_without_per_example_gradients_is_untracked_at_its_first_statistics_step(owner):
    """No crash: one warning naming it, listed in ``skipped`` with the reason, its plain gradient kept; the other
    layers are preconditioned."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = owner(), nn.Linear(4, 2)

        def forward(self, x):
            h = self.body(x)
            return self.head(h[0] if isinstance(h, tuple) else h)

    model = Net().double()
    pre = _pre(model)
    assert "body" in pre.layers
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    for step in range(2):
        model.zero_grad()
        F.mse_loss(model(x), y).backward()
        raw = model.body.scale.grad.clone()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert pre.step()
        torch.testing.assert_close(model.body.scale.grad, raw, rtol=0, atol=0)  # used as it is
        loud = [w for w in caught if "loose parameters ['scale']" in str(w.message)]
        assert len(loud) == (1 if step == 0 else 0), [str(w.message) for w in caught]
    assert "body" not in pre.layers and {"body.fc", "head"} <= set(pre.layers)
    reason = dict(pre.skipped)["body"]
    assert reason.startswith(f"loose parameters ['scale'] of {owner.__name__}"), reason
    assert pre.store["head"].A is not None


def test_ekfac_leaves_loose_blocks_out_with_a_reason():
    torch.manual_seed(0)
    pre = kfac.KFACPreconditioner(ViT(True), method="ekfac", inv_update_steps=2)
    reasons = dict(pre.skipped)
    assert "" not in pre.layers and "needs per-example gradients" in reasons[""] and "LooseAdapter" in reasons[""]


def test_torchvision_vit_and_convnext_are_fully_preconditioned_and_exact():
    """torchvision's own classes (small configurations): every trainable parameter in a block, and the loose
    blocks' factors are the mean squared per-example gradients."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vit = tv.models.VisionTransformer(image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden_dim=8,
                                      mlp_dim=16, num_classes=3).double()
    with torch.no_grad():
        vit.heads.head.weight.normal_()  # torchvision zero-initialises the head
    cnx = tv.models.convnext.ConvNeXt([tv.models.convnext.CNBlockConfig(4, 8, 1), tv.models.convnext.CNBlockConfig(
        8, None, 1)], num_classes=3).double()
    for model, x, blocks in ((vit, torch.randn(4, 3, 8, 8, dtype=torch.float64), {"": ["class_token"],
                                                                                  "encoder": ["encoder.pos_embedding"]}),
                             (cnx, torch.randn(4, 3, 16, 16, dtype=torch.float64),
                              {"features.1.0": ["features.1.0.layer_scale"],
                               "features.3.0": ["features.3.0.layer_scale"]})):
        pre = _pre(model)
        covered = {id(p) for ps in pre.parameters_of().values() for p in ps}
        assert all(id(p) in covered for p in model.parameters()), pre.skipped
        y = torch.tensor([0, 1, 2, 1])
        F.cross_entropy(model(x), y).backward()
        raw = {k: _grads(model, keys) for k, keys in blocks.items()}
        pre.step()
        per = _per_example(model, F.cross_entropy, x, y)
        for k, keys in blocks.items():
            _check_block(pre, k, model, per, keys, raw[k])


def test_block_inside_autocast_recomputes_from_its_inputs_in_the_parameters_dtype():
    """A bfloat16 input from an autocast region (the recomputation runs outside it): the block is kept and its
    ``A`` matches the float32 per-example gradients up to bfloat16's precision."""
    torch.manual_seed(0)

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.gain = nn.Linear(4, 4), nn.Parameter(torch.rand(4) + 0.5)

        def forward(self, x):
            return self.fc(x) * self.gain

    model = nn.Sequential(nn.Linear(4, 4), Scaled(), nn.Linear(4, 2))
    pre = kfac.KFACPreconditioner(model, kl_clip=None, factor_decay=0.0)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    F.mse_loss(out.float(), y).backward()
    pre.step()
    assert "1" in pre.layers and not pre.skipped
    per = _per_example(model, F.mse_loss, x, y)["1.gain"]
    torch.testing.assert_close(pre.store["1"].A, (per ** 2).mean(0), rtol=0.1, atol=1e-6)


def test_checkpoint_from_before_loose_blocks_loads_and_they_start_fresh(kfac_caplog):
    """Nothing a user saved is lost: a K-FAC checkpoint written when loose parameters were untracked (no state for
    them) loads into a model that now tracks them; every other layer's state is restored exactly."""
    torch.manual_seed(0)
    model = ViT(True).double()
    x, y = torch.randn(5, 3, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    pre = _pre(model)
    F.cross_entropy(model(x), y).backward()
    pre.step()
    old = pre.state_dict()
    loose = ["", "encoder"]
    old = {**old, "layers": [n for n in old["layers"] if n not in loose],
           "seen": [n for n in old["seen"] if n not in loose],
           "store": {**old["store"], "entries": {n: e for n, e in old["store"]["entries"].items() if n not in loose}}}
    pre.remove()
    fresh = _pre(model)
    fresh.load_state_dict(old)
    assert "start from fresh factors" in kfac_caplog.text
    assert fresh.steps == 1 and all(fresh.store[n].A is None for n in loose)
    for name in old["layers"]:
        torch.testing.assert_close(fresh.store[name].A, pre.store[name].A, rtol=0, atol=0)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    fresh.step()
    assert all(fresh.store[n].A is not None for n in loose)
    bad = {**old, "layers": old["layers"][1:]}  # a layer of a kind tracked before is still required
    with pytest.raises(ValueError, match="saved for different layers"):
        _pre(ViT(True).double()).load_state_dict(bad)
