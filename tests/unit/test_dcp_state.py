"""``torch.distributed.checkpoint`` carries every piece of K-FAC's state (one process; the distributed and resharding
runs are tests/integration/test_dcp.py): train, ``get_optimizer_state_dict`` + ``dcp.save``, then a freshly built
optimizer's ``get_optimizer_state_dict`` + ``dcp.load`` + ``set_optimizer_state_dict`` restores every factor,
decomposition, EK-FAC eigenvalue, update count, step counter and adaptive K-FAC's state exactly, and the next steps
equal the uninterrupted run -- on an MLP, a CNN with GroupNorm and a transformer layer in both layouts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac
from kfac.adaptive.controller import AdaptiveConfig

dcp = pytest.importorskip("torch.distributed.checkpoint")
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: E402

from helpers import single_thread  # noqa: F401,E402  (autouse fixture)


class Seq(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = True  # this container's own input is (N, T, E)
        self.inner_first = batch_first
        self.layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.layer(x) if self.inner_first else self.layer(x.transpose(0, 1)).transpose(0, 1)
        return self.head(h.mean(1))


MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)), (6,)),
    "cnn": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)), (2, 5, 5)),
    "transformer": (lambda: Seq(True), (4, 8)),
    "transformer-seq-first": (lambda: Seq(False), (4, 8)),
}
CONFIGS = {"eigen": {}, "inverse": {"method": "inverse"}, "ekfac": {"method": "ekfac"},
           "adaptive": {"adaptive": AdaptiveConfig(adapt_every=2), "fisher": "empirical"}}


def build(kind: str, cfg: dict):
    torch.manual_seed(0)
    model = MODELS[kind][0]().double()
    adaptive = "adaptive" in cfg
    base = torch.optim.SGD(model.parameters(), lr=1.0 if adaptive else 0.1, momentum=0.0 if adaptive else 0.9)
    kw = dict(cfg) if adaptive else {"damping": 0.01, "inv_update_steps": 2, **cfg}
    return model, kfac.KFAC(model, base, factor_dtype=torch.float64, **kw)


def train(kind: str, model, opt, steps: range) -> None:
    for i in steps:
        g = torch.Generator().manual_seed(i)
        x = torch.randn(12, *MODELS[kind][1], generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (12,), generator=g)
        if opt.adaptive is not None:
            opt.step(lambda: F.cross_entropy(model(x), y))
        else:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()


def everything(opt) -> dict:
    """Every piece of K-FAC's state: each layer's tensors (factors, decompositions, extras), update counts, step
    counters, adaptive scalars and last direction."""
    pre = opt.preconditioner
    out: dict = {"steps": pre.steps, "skipped": pre.skipped_steps}
    for n in pre.layers:
        e = pre.store[n]
        out[n] = {"num_updates": e.num_updates, **{k: v.clone() for k, v in e.tensors().items()}}
    if opt.adaptive is not None:
        a = opt.adaptive
        out["adaptive"] = {"damping": a.damping, "steps": a.steps, "rejected": a.rejected, "undone": a.undone,
                           "previous": {k: v.clone() for k, v in (a.previous or {}).items()}}
    return out


def assert_equal(a, b, path="state"):
    if isinstance(a, dict):
        assert set(a) == set(b), f"{path}: {sorted(set(a) ^ set(b))}"
        for k in a:
            assert_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_dcp_round_trip_restores_every_piece_and_resumes_exactly(kind, config, tmp_path):
    cfg = CONFIGS[config]
    ref_model, ref_opt = build(kind, cfg)
    train(kind, ref_model, ref_opt, range(8))

    model, opt = build(kind, cfg)
    train(kind, model, opt, range(5))  # mid refresh interval, corrections and adaptive state in flight
    saved = everything(opt)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path))

    new_model, new_opt = build(kind, cfg)
    msd, osd = get_state_dict(new_model, new_opt)  # the fresh optimizer's skeleton
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(tmp_path))
    set_state_dict(new_model, new_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert_equal(saved, everything(new_opt))
    train(kind, new_model, new_opt, range(5, 8))
    for p, q in zip(new_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_state_reductions_run_in_the_same_dtype_order_on_every_rank():
    """Loading keyed state sums each dtype's pieces over ranks in one collective per dtype. The order of those
    collectives must not depend on the process: a set of dtypes iterates by object address, which differs between
    ranks, and paired one rank's float32 reduction with another's float64 one (a gloo size mismatch, then an
    abort, in the FSDP2 GPT example's resume about one run in four)."""
    from kfac.kronecker.keyed import sum_by_dtype

    class Recorder:
        def __init__(self):
            self.order = []

        def all_reduce_sum(self, tensors, *, category, exact):
            self.order.append(tensors[0].dtype)
            return [2 * t for t in tensors]

    dtypes = [torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64]
    for values in ([torch.ones(2, dtype=d) for d in dtypes], [torch.ones(2, dtype=d) for d in reversed(dtypes)]):
        comm = Recorder()
        out = sum_by_dtype(comm, values)
        assert comm.order == sorted(dtypes, key=str)
        assert [t.dtype for t in out] == [t.dtype for t in values] and all(bool((t == 2).all()) for t in out)
