"""Checkpoints move between a wrapped model and the unwrapped one (an MLP with LayerNorm, a CNN with GroupNorm, a
transformer layer in both layouts): K-FAC's state saved from a model held under a
wrapper's attribute (``module`` of DDP / DataParallel, ``_orig_mod`` of ``torch.compile``) loads into the bare model,
and the reverse; the resumed run then equals the uninterrupted one step for step (float64, bit for bit)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac
from kfac.tracking import rename_map, unwrapped_name

from helpers import single_thread  # noqa: F401  (autouse fixture)


class Wrapper(nn.Module):
    """Holds the model under ``attr`` and forwards to it, as DDP (``module``) and ``torch.compile``
    (``_orig_mod``) do."""

    def __init__(self, model: nn.Module, attr: str) -> None:
        super().__init__()
        self.attr = attr
        self.add_module(attr, model)

    def forward(self, x):
        return getattr(self, self.attr)(x)


class Encoder(nn.Module):
    """A transformer layer over sequences of the given layout, mean-pooled, then a linear head."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
        self.head, self.seq_dim = nn.Linear(8, 3), 1 if batch_first else 0

    def forward(self, x):
        return self.head(self.layer(x).mean(self.seq_dim))


MODELS = {  # (builder, input shape of a batch of 16)
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)), (16, 6)),
    "cnn": (lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(4 * 16, 3)), (16, 1, 4, 4)),
    "transformer_batch_first": (lambda: Encoder(True), (16, 5, 8)),
    "transformer_sequence_first": (lambda: Encoder(False), (5, 16, 8)),
}
CASE = "mlp"


def _model() -> nn.Module:
    torch.manual_seed(0)
    return MODELS[CASE][0]().double()


def _batch(i: int):
    g = torch.Generator().manual_seed(i)
    return torch.randn(*MODELS[CASE][1], generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)


def _train(model: nn.Module, opt: kfac.KFAC, steps: range, adaptive: bool = False) -> None:
    for i in steps:
        x, y = _batch(i)
        if adaptive:
            opt.step(lambda: F.cross_entropy(model(x), y))
            continue
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _opt(model: nn.Module, adaptive: bool) -> kfac.KFAC:
    base = torch.optim.SGD(model.parameters(), lr=1.0 if adaptive else 0.1, momentum=0.0 if adaptive else 0.9)
    kw = {"adaptive": True} if adaptive else {"factor_dtype": torch.float64, "inv_update_steps": 2}
    return kfac.KFAC(model, base, **kw)


@pytest.fixture(params=sorted(MODELS))
def case(request, monkeypatch):
    monkeypatch.setitem(globals(), "CASE", request.param)
    return request.param


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
@pytest.mark.parametrize("attr", ["module", "_orig_mod"])
@pytest.mark.parametrize("direction", ["wrapped_to_bare", "bare_to_wrapped"])
def test_checkpoint_loads_across_a_wrapper_and_resumes_exactly(case, direction, attr, adaptive):
    bare = _model()
    reference = copy.deepcopy(bare)
    ref_opt = _opt(reference, adaptive)
    _train(reference, ref_opt, range(6), adaptive)

    saving = Wrapper(bare, attr) if direction == "wrapped_to_bare" else bare
    opt = _opt(saving, adaptive)
    _train(saving, opt, range(3), adaptive)
    state = copy.deepcopy(opt.state_dict())
    weights = copy.deepcopy(bare.state_dict())

    resumed_bare = _model()
    resumed_bare.load_state_dict(weights)
    loading = resumed_bare if direction == "wrapped_to_bare" else Wrapper(resumed_bare, attr)
    resumed = _opt(loading, adaptive)
    assert resumed.preconditioner.layers != opt.preconditioner.layers  # the names differ by the wrapper
    resumed.load_state_dict(state)
    for name in opt.preconditioner.layers:
        mine = resumed.preconditioner.store[unwrapped_name(name) if direction == "wrapped_to_bare" else
                                           f"{attr}.{name}"]
        torch.testing.assert_close(mine.A, opt.preconditioner.store[name].A, rtol=0, atol=0)
    _train(loading, resumed, range(3, 6), adaptive)
    for p, q in zip(resumed_bare.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_rename_map_only_renames_one_to_one_wrapper_differences():
    assert rename_map(["module.0", "module.3"], ["", "0", "1", "3"]) == {"module.0": "0", "module.3": "3"}
    assert rename_map(["0", "3"], ["", "module", "module.0", "module.3"]) == {"0": "module.0", "3": "module.3"}
    assert rename_map(["0"], ["0", "1"]) == {}  # nothing to rename
    assert rename_map(["module.2"], ["0", "1"]) == {}  # not a wrapper difference: left to the caller's checks
    assert rename_map(["x"], ["module.x", "_orig_mod.x"]) == {}  # ambiguous
    assert unwrapped_name("module._orig_mod.layer1.0") == "layer1.0"


def test_a_checkpoint_of_another_model_is_still_a_clear_error():
    wrapped = Wrapper(_model(), "module")
    opt = _opt(wrapped, adaptive=False)
    _train(wrapped, opt, range(1))
    state = opt.state_dict()
    other = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    with pytest.raises(ValueError, match="different layers"):
        _opt(other, adaptive=False).load_state_dict(state)
