"""Truncated eigenbasis (eigen method, ``truncate=ε``) against dense Kronecker solves in float64: exact when the
bulk eigenvalues of ``A`` are equal, and within ``||ΔP||_2 <= ε / λ`` otherwise; the full basis is used when more
than half of the columns would be kept; only the eigen method accepts it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kfac

from helpers import single_thread  # noqa: F401  (autouse fixture)


def _dense_inverse(entry, damping: float) -> torch.Tensor:
    """(A (x) G + λ I)^-1 for column-major vec of (g, a) matrices."""
    k = torch.kron(entry.A, entry.G)
    return torch.linalg.inv(k + damping * torch.eye(k.shape[0], dtype=k.dtype))


def _apply_all(pre, name: str, dim: tuple[int, int]) -> torch.Tensor:
    """The preconditioner's map as a dense matrix (column-major vec), from unit gradient matrices."""
    e = pre.store[name]
    cols = []
    for i in range(dim[0] * dim[1]):
        v = torch.zeros(dim[1] * dim[0], dtype=torch.float64)
        v[i] = 1.0
        mat = v.reshape(dim[1], dim[0]).T  # column-major vec -> (g, a)
        out = pre.method.precondition(e, mat, damping=pre.hparams.at(pre.steps)["damping"])
        cols.append(out.T.reshape(-1))
    return torch.stack(cols, 1)


def _fit(damping: float, truncate: float | None, rows: int, seed: int = 0, decay: float = 0.0):
    torch.manual_seed(seed)
    model = nn.Linear(12, 3, bias=False).double()
    pre = kfac.KFACPreconditioner(model, truncate=truncate, factor_dtype=torch.float64, kl_clip=None,
                                  factor_decay=decay, damping=damping)
    x = torch.randn(rows, 12, dtype=torch.float64)
    model(x).square().sum().backward()
    pre.step()
    return pre


@pytest.mark.parametrize("decay", [0.0, 0.5])
def test_exact_when_the_bulk_eigenvalues_are_equal(decay):
    """Two rows: A has rank 2 plus the identity initialisation's remnant ``decay I``, so ten eigenvalues equal
    ``decay`` exactly (0 without decay); the truncated basis keeps 2 of 12 columns and is exact."""
    pre = _fit(0.1, truncate=1e-3, rows=2, decay=decay)
    e = pre.store[""]
    kept = pre.method.kept_columns(e, 0.1)
    assert kept is not None and kept[0].numel() == 2
    torch.testing.assert_close(_apply_all(pre, "", (3, 12)), _dense_inverse(e, 0.1), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("eps", [1e-2, 0.3])
def test_error_is_within_eps_over_damping(eps):
    torch.manual_seed(1)
    model = nn.Linear(12, 3, bias=False).double()
    pre = kfac.KFACPreconditioner(model, truncate=eps, factor_dtype=torch.float64, kl_clip=None, factor_decay=0.0,
                                  damping=0.5)
    x = torch.randn(40, 12, dtype=torch.float64) * torch.logspace(0, -3, 12, dtype=torch.float64)  # graded spectrum
    model(x).square().sum().backward()
    pre.step()
    e = pre.store[""]
    kept = pre.method.kept_columns(e, 0.5)
    assert kept is not None and 0 < kept[0].numel() <= 6
    err = torch.linalg.matrix_norm(_apply_all(pre, "", (3, 12)) - _dense_inverse(e, 0.5), ord=2)
    assert 0 < float(err) <= eps / 0.5


def test_full_basis_when_most_columns_matter_and_other_methods_refuse():
    pre = _fit(1e-6, truncate=1e-3, rows=64)  # tiny damping: every direction matters
    e = pre.store[""]
    assert pre.method.kept_columns(e, 1e-6) is None
    torch.testing.assert_close(_apply_all(pre, "", (3, 12)), _dense_inverse(e, 1e-6), rtol=1e-6, atol=1e-6)
    for method in ("ekfac", "inverse"):
        with pytest.raises(ValueError, match="truncate needs method='eigen'"):
            kfac.KFACPreconditioner(nn.Linear(3, 2), method=method, truncate=0.1)
    with pytest.raises(ValueError, match="truncate must be"):
        kfac.KFACPreconditioner(nn.Linear(3, 2), truncate=0.0)


def test_a_batch_of_gradients_is_preconditioned_like_each_one():
    pre = _fit(0.1, truncate=1e-3, rows=2, decay=0.5)
    e = pre.store[""]
    batch = torch.randn(4, 3, 12, dtype=torch.float64)
    got = pre.method.precondition(e, batch, damping=0.1)
    want = torch.stack([pre.method.precondition(e, v, damping=0.1) for v in batch])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
