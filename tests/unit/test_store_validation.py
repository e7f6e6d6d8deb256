"""FactorStore.load / load_state_dict validate dtypes and finiteness: bad factor data fails at load time."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

import kfac
from kfac import FactorFileError, FactorStore

FIELDS = ("A", "G", "QA", "dA", "QG", "dG", "A_inv", "G_inv")


def _trained_store(method: str = "eigen", factor_dtype: torch.dtype = torch.float32) -> FactorStore:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3, bias=False))
    pre = kfac.KFACPreconditioner(model, method=method, factor_dtype=factor_dtype)
    for _ in range(2):
        model.zero_grad()
        model(torch.randn(8, 5)).pow(2).sum().backward()
        assert pre.step()
    return pre.store


def _read_raw(path):
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _corrupt_file(src, dst, layer: str, key: str, fn) -> None:
    """Copy a saved factor file, replacing field ``key`` of ``layer`` with ``fn(tensor)``."""
    tensors, metadata = _read_raw(src)
    index = json.loads(metadata["index"])
    i = next(i for i, item in enumerate(index) if item["name"] == layer)
    tensors[f"{i}/{key}"] = fn(tensors[f"{i}/{key}"]).contiguous()
    safetensors.torch.save_file(tensors, str(dst), metadata=metadata)


def _with_nan(t):
    t = t.clone(memory_format=torch.contiguous_format)
    t.view(-1)[1] = float("nan")
    return t


def _with_inf(t):
    t = t.clone(memory_format=torch.contiguous_format)
    t.view(-1)[0] = float("-inf")
    return t


CORRUPTIONS = {
    # name: (field, transform, message regex besides the layer name)
    "nan_QA": ("QA", _with_nan, r"QA.*non-finite.*1 NaN"),
    "inf_dG": ("dG", _with_inf, r"dG.*non-finite.*1 Inf"),
    "int64_A": ("A", lambda t: t.round().to(torch.int64), r"A.*int64.*float32 or float64"),
    "bool_G": ("G", lambda t: t > 0, r"G.*bool.*float32 or float64"),
    "float16_G": ("G", lambda t: t.half(), r"G.*float16.*float32 or float64"),
    "bfloat16_QG": ("QG", lambda t: t.bfloat16(), r"QG.*bfloat16.*float32 or float64"),
    "mixed_dA_f64": ("dA", lambda t: t.double(), r"mix dtypes.*dA: float64"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_load_rejects_corrupt_factor_file(tmp_path, kind):
    key, fn, pattern = CORRUPTIONS[kind]
    store = _trained_store()
    layer = list(store)[1]
    good, bad = tmp_path / "good.safetensors", tmp_path / f"{kind}.safetensors"
    store.save(good)
    FactorStore.load(good)  # the untouched file is fine
    _corrupt_file(good, bad, layer, key, fn)
    with pytest.raises(FactorFileError, match=pattern) as info:
        FactorStore.load(bad)
    msg = str(info.value)
    assert str(bad) in msg and repr(layer) in msg


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_load_state_dict_rejects_corrupt_state_and_changes_nothing(kind):
    key, fn, pattern = CORRUPTIONS[kind]
    store = _trained_store()
    layer = list(store)[0]
    before = {n: {k: t.clone() for k, t in e.tensors().items()} for n, e in store.items()}
    state = store.state_dict()
    state["entries"][layer]["tensors"][key] = fn(state["entries"][layer]["tensors"][key])
    for target in (FactorStore(), store):  # an empty store and the (matching) source store itself
        with pytest.raises(FactorFileError, match=pattern) as info:
            target.load_state_dict(state)
        assert repr(layer) in str(info.value)
    for n, e in store.items():  # all-or-nothing: nothing was assigned
        assert set(e.tensors()) == set(before[n])
        for k, t in e.tensors().items():
            assert t.dtype == before[n][k].dtype and torch.equal(t, before[n][k]), (n, k)


def test_load_state_dict_rejects_non_float_or_non_finite_extras():
    store = _trained_store()
    layer = list(store)[0]
    for value, pattern in [(torch.tensor([1.0, float("nan")]), r"extras\.lam.*non-finite"),
                           (torch.tensor([1, 2]), r"extras\.lam.*int64"),
                           (torch.ones(2, dtype=torch.float16), r"extras\.lam.*float16")]:
        state = store.state_dict()
        state["entries"][layer]["tensors"]["extras.lam"] = value
        with pytest.raises(FactorFileError, match=pattern) as info:
            FactorStore().load_state_dict(state)
        assert repr(layer) in str(info.value)


def test_load_state_dict_rejects_non_tensor():
    store = _trained_store()
    layer = list(store)[0]
    state = store.state_dict()
    state["entries"][layer]["tensors"]["A"] = state["entries"][layer]["tensors"]["A"].tolist()
    with pytest.raises(FactorFileError, match=rf"{layer!r}.*field A is a list"):
        FactorStore().load_state_dict(state)


def test_extras_may_use_another_float_dtype_than_factors(tmp_path):
    store = _trained_store()
    entry = store[list(store)[0]]
    entry.extras["window"] = torch.randn(2, 3, dtype=torch.float64)  # factors are float32
    store.save(tmp_path / "f.safetensors")
    loaded = FactorStore.load(tmp_path / "f.safetensors")
    assert loaded[entry.name].extras["window"].dtype == torch.float64
    assert loaded[entry.name].A.dtype == torch.float32


@pytest.mark.parametrize("method,factor_dtype", [("eigen", torch.float32), ("eigen", torch.float64),
                                                 ("inverse", torch.float32), ("inverse", torch.float64)])
def test_valid_file_round_trips_bit_exactly(tmp_path, method, factor_dtype):
    store = _trained_store(method, factor_dtype)
    path = tmp_path / "f.safetensors"
    store.save(path)
    for loaded in (FactorStore.load(path), _loaded_via_state_dict(store)):
        assert list(loaded) == list(store)
        for name, entry in store.items():
            got = loaded[name]
            assert (got.a_dim, got.g_dim, got.a_diagonal, got.owner, got.num_updates) == \
                   (entry.a_dim, entry.g_dim, entry.a_diagonal, entry.owner, entry.num_updates)
            assert set(got.tensors()) == set(entry.tensors()) and entry.tensors()
            for k, t in entry.tensors().items():
                assert got.tensors()[k].dtype == t.dtype == factor_dtype
                assert got.tensors()[k].numpy().tobytes() == t.numpy().tobytes(), (name, k)  # bit-exact


def _loaded_via_state_dict(store: FactorStore) -> FactorStore:
    fresh = FactorStore()
    fresh.load_state_dict(store.state_dict())
    return fresh
