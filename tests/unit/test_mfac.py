"""M-FAC (kfac.mfac.fisher) against dense float64 references: F = λ I + (1/k) G^T G solved with torch.linalg.solve."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from kfac.mfac import fisher as mfac
from kfac.mfac.fisher import SlidingWindowFisher, StaticFisher

SHAPES = {"a": (3, 4), "b": (7,), "c": (2, 1, 3)}
SIZES = {name: torch.Size(shape).numel() for name, shape in SHAPES.items()}
D = sum(SIZES.values())
F64 = torch.float64


def rand_grad(dtype=F64) -> dict[str, torch.Tensor]:
    return {name: torch.randn(shape, dtype=dtype) for name, shape in SHAPES.items()}


def flat(values: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([values[name].reshape(-1) for name in SHAPES])


def dense_fisher(rows: list[torch.Tensor], damping: float, mode: str) -> torch.Tensor:
    """λ I + (1/k) G^T G for the flat gradients ``rows`` (k = len(rows); k = 0 gives λ I), block-diagonal per block."""
    g = torch.stack(rows) if rows else torch.zeros(1, D, dtype=F64)
    outer = g.T @ g / max(len(rows), 1)
    if mode == "per_block":
        outer = torch.block_diag(*(blk.T @ blk for blk in g.split(list(SIZES.values()), dim=1))) / max(len(rows), 1)
    return damping * torch.eye(D, dtype=F64) + outer


def dense_ihvp(rows: list[torch.Tensor], damping: float, v: torch.Tensor, mode: str) -> torch.Tensor:
    """Dense reference: the full solve (global) or the block-diagonal solve (per block), on flat vectors."""
    return torch.linalg.solve(dense_fisher(rows, damping, mode), v)


def dense_diag(rows: list[torch.Tensor], damping: float, mode: str) -> torch.Tensor:
    return torch.linalg.inv(dense_fisher(rows, damping, mode)).diagonal()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("mode", ["global", "per_block"])
def test_dynamic_ihvp_matches_dense_through_fill_and_wrap(mode):
    """k < m, k = m and k > m updates (only the last m count, 1/k normalisation); damping changes between calls."""
    m = 4
    fisher = SlidingWindowFisher(block_shapes=SHAPES, num_grads=m, damping=0.5, blocks=mode, dtype=F64)
    seen = []
    v = rand_grad()
    assert rel_err(flat(fisher.ihvp(v)), flat(v) / 0.5) < 1e-12  # empty window: F = λ I
    for step in range(11):
        g = rand_grad()
        fisher.add(g)
        seen.append(flat(g))
        window = seen[-m:]
        assert fisher.count == len(window) == min(step + 1, m)
        for damping in (None, 0.05 + 0.1 * step, 2.0):
            lam = 0.5 if damping is None else damping
            out = fisher.ihvp(v, damping=damping)
            assert set(out) == set(SHAPES) and all(out[n].shape == SHAPES[n] for n in SHAPES)
            assert rel_err(flat(out), dense_ihvp(window, lam, flat(v), mode)) < 1e-8
    # the settable default damping
    fisher.damping = 0.3
    assert rel_err(fisher.ihvp_flat(flat(v)), dense_ihvp(seen[-m:], 0.3, flat(v), mode)) < 1e-8


@pytest.mark.parametrize("mode", ["global", "per_block"])
@pytest.mark.parametrize("count", [0, 2, 5, 7])
def test_dynamic_diag_matches_dense(mode, count):
    m = 5
    fisher = SlidingWindowFisher(block_shapes=SHAPES, num_grads=m, damping=0.2, blocks=mode, dtype=F64)
    rows = []
    for _ in range(count):
        g = rand_grad()
        fisher.add(g)
        rows.append(flat(g))
    for lam in (0.2, 0.03):
        diag = fisher.diag(damping=lam)
        assert all(diag[n].shape == SHAPES[n] for n in SHAPES)
        assert rel_err(fisher.diag_flat(damping=lam), dense_diag(rows[-m:], lam, mode)) < 1e-8


def test_global_differs_from_per_block():
    """Sanity: the two modes really are different operators once gradients couple the blocks."""
    kw = {"block_shapes": SHAPES, "num_grads": 3, "damping": 0.1, "dtype": F64}
    glob, per = SlidingWindowFisher(**kw, blocks="global"), SlidingWindowFisher(**kw, blocks="per_block")
    for _ in range(3):
        g = rand_grad()
        glob.add(g)
        per.add(g)
    v = rand_grad()
    assert rel_err(flat(glob.ihvp(v)), flat(per.ihvp(v))) > 1e-3


@pytest.mark.parametrize("mode", ["global", "per_block"])
def test_static_ihvp_and_diag_match_dense(mode):
    k, lam = 6, 0.07
    grads = [rand_grad() for _ in range(k)]
    stacked = {n: torch.stack([g[n] for g in grads]) for n in SHAPES}
    static = StaticFisher(stacked, damping=lam, blocks=mode)
    rows = [flat(g) for g in grads]
    v = rand_grad()
    assert static.num_grads == static.count == k
    assert rel_err(flat(static.ihvp(v)), dense_ihvp(rows, lam, flat(v), mode)) < 1e-8
    assert rel_err(static.diag_flat(), dense_diag(rows, lam, mode)) < 1e-8
    assert all(static.diag()[n].shape == SHAPES[n] for n in SHAPES)
    # the dynamic form over the same window agrees
    dynamic = SlidingWindowFisher(block_shapes=SHAPES, num_grads=k, damping=lam, blocks=mode, dtype=F64)
    for g in grads:
        dynamic.add(g)
    assert rel_err(flat(dynamic.ihvp(v)), flat(static.ihvp(v))) < 1e-10
    with pytest.raises(ValueError, match="damping"):
        static.ihvp(v, damping=0.5)


def test_flat_inputs_and_single_block():
    g = torch.randn(5, 9, dtype=F64)
    static = StaticFisher(g, damping=0.3)
    dynamic = SlidingWindowFisher(block_shapes=9, num_grads=5, damping=0.3, dtype=F64)
    for row in g:
        dynamic.add(row)
    v = torch.randn(9, dtype=F64)
    ref = 0.3 * torch.eye(9, dtype=F64) + g.T @ g / 5
    assert rel_err(static.ihvp_flat(v), torch.linalg.solve(ref, v)) < 1e-8
    assert rel_err(dynamic.ihvp(v), torch.linalg.solve(ref, v)) < 1e-8
    assert dynamic.block_names == (mfac.FLAT_BLOCK,)
    # multi-block: a flat tensor is the concatenation of the blocks in declared order; shape is preserved
    multi = SlidingWindowFisher(block_shapes=SHAPES, num_grads=3, damping=0.3, dtype=F64)
    multi.add(flat(rand_grad()).reshape(1, D))
    vd = rand_grad()
    assert torch.allclose(multi.ihvp(flat(vd).reshape(D, 1)).reshape(-1), flat(multi.ihvp(vd)), rtol=0, atol=1e-14)


def two_ranks(mode, m=4):
    """Rank 0 holds block a, rank 1 blocks b and c; plus the unsharded reference."""
    owned = [("a",), ("b", "c")]
    ranks = [
        SlidingWindowFisher(
            block_shapes={n: SHAPES[n] for n in names}, num_grads=m, damping=0.4, blocks=mode, dtype=F64
        )
        for names in owned
    ]
    full = SlidingWindowFisher(block_shapes=SHAPES, num_grads=m, damping=0.4, blocks=mode, dtype=F64)
    return owned, ranks, full


@pytest.mark.parametrize("mode", ["global", "per_block"])
def test_sharded_two_phase_equals_unsharded(mode):
    """Simulated ranks: partial Gram rows / projections summed by hand (the reduction), over a ring-buffer wrap."""
    owned, ranks, full = two_ranks(mode)
    combine = (lambda parts: sum(parts)) if mode == "global" else None  # per block: everything is local
    for step in range(7):
        g = rand_grad()
        full.add(g)
        shards = [{n: g[n] for n in names} for names in owned]
        rows = [r.partial_gram_row(s) for r, s in zip(ranks, shards)]
        assert all(row.shape == ((1, 4) if mode == "global" else (len(s), 4)) for row, s in zip(rows, shards))
        for r, s, row in zip(ranks, shards, rows):
            r.commit(s, combine(rows) if combine else row)
        v = rand_grad()
        vs = [{n: v[n] for n in names} for names in owned]
        projs = [r.partial_projection(x) for r, x in zip(ranks, vs)]
        outs = {}
        for r, x, proj in zip(ranks, vs, projs):
            outs.update(r.finish_ihvp(x, combine(projs) if combine else proj, damping=0.1 * (step + 1)))
        ref = full.ihvp(v, damping=0.1 * (step + 1))
        assert rel_err(flat(outs), flat(ref)) < 1e-10
        diags = {**ranks[0].diag(), **ranks[1].diag()}
        assert rel_err(flat(diags), flat(full.diag())) < 1e-10


class Rendezvous:
    """A thread all-reduce (sum) for ``n`` ranks, recording the shapes it is asked to reduce."""

    def __init__(self, n: int) -> None:
        self.barrier = threading.Barrier(n, timeout=10)
        self.slots: list = [None] * n
        self.calls: list[tuple[int, ...]] = []

    def hook(self, rank: int):
        def all_reduce(t: torch.Tensor) -> None:
            self.slots[rank] = t.clone()
            if rank == 0:
                self.calls.append(tuple(t.shape))
            self.barrier.wait()
            total = sum(self.slots)
            self.barrier.wait()
            t.copy_(total)  # in place, returning None, like torch.distributed.all_reduce

        return all_reduce


def test_sharded_with_all_reduce_hook_in_threads():
    """Two ranks in threads, global mode, through the all_reduce hook; only m-sized data is reduced."""
    m = 3
    owned = [("a", "c"), ("b",)]
    rdv = Rendezvous(2)
    ranks = [
        SlidingWindowFisher(
            block_shapes={n: SHAPES[n] for n in names}, num_grads=m, damping=0.2, dtype=F64, all_reduce=rdv.hook(i)
        )
        for i, names in enumerate(owned)
    ]
    full = SlidingWindowFisher(block_shapes=SHAPES, num_grads=m, damping=0.2, dtype=F64)
    grads = [rand_grad() for _ in range(5)]
    v = rand_grad()
    for g in grads:
        full.add(g)
    ref = full.ihvp(v, damping=0.05)

    def run(rank: int):
        fisher, names = ranks[rank], owned[rank]
        for g in grads:
            fisher.add({n: g[n] for n in names})
        out = fisher.ihvp({n: v[n] for n in names}, damping=0.05)
        fisher.rebuild_gram()
        return out, fisher.ihvp({n: v[n] for n in names}, damping=0.05)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, range(2)))
    outs = {**results[0][0], **results[1][0]}
    rebuilt = {**results[0][1], **results[1][1]}
    assert rel_err(flat(outs), flat(ref)) < 1e-10
    assert rel_err(flat(rebuilt), flat(ref)) < 1e-10
    assert rdv.calls == [(m,)] * len(grads) + [(m,), (m, m), (m,)]


def test_static_sharded_with_hook():
    owned = [("a",), ("b", "c")]
    k = 4
    grads = [rand_grad() for _ in range(k)]
    stacked = {n: torch.stack([g[n] for g in grads]) for n in SHAPES}
    rdv = Rendezvous(2)
    v = rand_grad()

    def run(rank: int):
        static = StaticFisher({n: stacked[n] for n in owned[rank]}, damping=0.1, all_reduce=rdv.hook(rank))
        return static.ihvp({n: v[n] for n in owned[rank]}), static.diag()

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, range(2)))
    ref = StaticFisher(stacked, damping=0.1)
    assert rel_err(flat({**results[0][0], **results[1][0]}), flat(ref.ihvp(v))) < 1e-10
    assert rel_err(flat({**results[0][1], **results[1][1]}), ref.diag_flat()) < 1e-10
    assert rdv.calls == [(k, k), (k,)]


def test_state_dict_round_trip_continues_identically():
    m = 4
    kw = {"block_shapes": SHAPES, "num_grads": m, "damping": 0.3, "dtype": F64}
    a = SlidingWindowFisher(**kw)
    for _ in range(6):
        a.add(rand_grad())
    state = a.state_dict()
    assert state["count"] == m and state["position"] == 6 % m and state["gram"].shape == (1, m, m)
    b = SlidingWindowFisher(**kw)
    b.load_state_dict(state)
    a.add(rand_grad())  # the saved state is a copy
    b.load_state_dict(state)
    a = SlidingWindowFisher(**kw)
    a.load_state_dict(state)
    for _ in range(3):
        g, v = rand_grad(), rand_grad()
        a.add(g)
        b.add(g)
        assert torch.equal(flat(a.ihvp(v)), flat(b.ihvp(v)))
    assert a.position == b.position and a.count == b.count


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError, match="num_grads"):
        SlidingWindowFisher(block_shapes=SHAPES, num_grads=0, damping=0.1)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="damping"):
            SlidingWindowFisher(block_shapes=SHAPES, num_grads=2, damping=bad)
        with pytest.raises(ValueError, match="damping"):
            StaticFisher(torch.randn(2, 3), damping=bad)
    with pytest.raises(ValueError, match="blocks"):
        SlidingWindowFisher(block_shapes=SHAPES, num_grads=2, damping=0.1, blocks="diagonal")
    with pytest.raises(ValueError, match="dtype"):
        SlidingWindowFisher(block_shapes=SHAPES, num_grads=2, damping=0.1, dtype=torch.int64)

    fisher = SlidingWindowFisher(block_shapes=SHAPES, num_grads=2, damping=0.1, dtype=F64)
    fisher.add(rand_grad())
    before = fisher.state_dict()
    g = rand_grad()
    with pytest.raises(ValueError, match="expected 12 elements"):
        fisher.add({**g, "a": torch.randn(5)})
    with pytest.raises(ValueError, match="unknown block"):
        fisher.add({**g, "zzz": torch.randn(1)})
    with pytest.raises(ValueError, match="missing block"):
        fisher.add({n: g[n] for n in ("a", "b")})
    with pytest.raises(ValueError, match="flat tensor"):
        fisher.ihvp(torch.randn(D + 1, dtype=F64))
    for poison in (float("nan"), float("inf")):
        g["b"][3] = poison
        with pytest.raises(ValueError, match=r"non-finite gradient in block\(s\) \['b'\]"):
            fisher.add(g)
    with pytest.raises(ValueError, match="damping"):
        fisher.ihvp(rand_grad(), damping=0.0)
    with pytest.raises(ValueError, match="damping"):
        fisher.damping = -2.0
    after = fisher.state_dict()
    assert all(
        torch.equal(before[k], after[k]) if torch.is_tensor(before[k]) else before[k] == after[k] for k in before
    )

    with pytest.raises(ValueError, match="keys mismatch"):
        fisher.load_state_dict({k: v for k, v in before.items() if k != "gram"})
    with pytest.raises(ValueError, match="num_grads"):
        fisher.load_state_dict({**before, "num_grads": 3})
    with pytest.raises(ValueError, match="position"):
        fisher.load_state_dict({**before, "position": 0})
    with pytest.raises(ValueError, match="shape"):
        fisher.load_state_dict({**before, "window.a": torch.zeros(2, 5)})

    with pytest.raises(ValueError, match="non-finite"):
        StaticFisher({"a": torch.tensor([[1.0, float("nan")]])}, damping=0.1)
    with pytest.raises(ValueError, match="k, \\*shape|\\(2, \\*shape\\)"):
        StaticFisher({"a": torch.randn(2, 3), "b": torch.randn(3, 3)}, damping=0.1)


def test_hook_returning_wrong_shape_is_rejected():
    fisher = SlidingWindowFisher(block_shapes=SHAPES, num_grads=2, damping=0.1, all_reduce=lambda t: t[:1])
    with pytest.raises(ValueError, match="all_reduce hook"):
        fisher.add(rand_grad(torch.float32))


@pytest.mark.parametrize("mode", ["global", "per_block"])
def test_float32_agrees_with_float64(mode):
    kw = {"block_shapes": SHAPES, "num_grads": 4, "damping": 0.2, "blocks": mode}
    f32 = SlidingWindowFisher(**kw, dtype=torch.float32)
    f64 = SlidingWindowFisher(**kw, dtype=F64)
    grads = [rand_grad() for _ in range(6)]
    for g in grads:
        f32.add({n: t.float() for n, t in g.items()})
        f64.add(g)
    v = rand_grad()
    out32 = f32.ihvp({n: t.float() for n, t in v.items()})
    assert all(t.dtype == torch.float32 for t in out32.values())
    assert rel_err(flat(out32).double(), flat(f64.ihvp(v))) < 1e-5
    assert rel_err(f32.diag_flat().double(), f64.diag_flat()) < 1e-5
    stacked = {n: torch.stack([g[n] for g in grads[-4:]]) for n in SHAPES}
    s32 = StaticFisher({n: t.float() for n, t in stacked.items()}, damping=0.2, blocks=mode)
    assert rel_err(flat(s32.ihvp({n: t.float() for n, t in v.items()})).double(), flat(f64.ihvp(v))) < 1e-5
    assert rel_err(s32.diag_flat().double(), f64.diag_flat()) < 1e-5


def test_ill_conditioned_eigh_fallback_matches_dense(monkeypatch):
    """When the Cholesky of kλI + K fails, the clamped eigendecomposition gives the same solves."""
    fisher = SlidingWindowFisher(block_shapes=SHAPES, num_grads=3, damping=0.1, dtype=F64)
    rows = []
    for _ in range(3):
        g = rand_grad()
        fisher.add(g)
        rows.append(flat(g))
    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda a: (real(a)[0], torch.tensor(1)))
    v = rand_grad()
    assert rel_err(flat(fisher.ihvp(v)), dense_ihvp(rows, 0.1, flat(v), "global")) < 1e-8
    assert rel_err(fisher.diag_flat(), dense_diag(rows, 0.1, "global")) < 1e-8
    assert fisher._factors[0].eig is not None


def test_rank_deficient_window_with_small_damping_matches_dense():
    """Duplicate gradients (singular Gram matrix K) and small λ: the float64 k x k solve stays accurate."""
    lam = 1e-6
    fisher = SlidingWindowFisher(block_shapes=SHAPES, num_grads=4, damping=lam, dtype=F64)
    g1, g2 = rand_grad(), rand_grad()
    rows = []
    for g in (g1, g2, g1, g1):
        fisher.add(g)
        rows.append(flat(g))
    v = {n: g1[n] + 0.5 * g2[n] for n in SHAPES}  # in the span of the window
    out = flat(fisher.ihvp(v))
    assert torch.isfinite(out).all()
    assert rel_err(out, dense_ihvp(rows, lam, flat(v), "global")) < 1e-6
