"""FactorStore: mapping API, state_dict and safetensors persistence, error handling, atomic saves."""

from __future__ import annotations

import json
import os
import stat

import pytest
import safetensors.torch
import torch
from torch import nn

import kfac
from kfac import FactorEntry, FactorFileError, FactorStore

DECOMP_FIELDS = ("A", "G", "QA", "dA", "QG", "dG", "A_inv", "G_inv")


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _spd(n, seed=0):
    m = _rand(n, n, seed=seed)
    return m @ m.T + n * torch.eye(n, dtype=torch.float64)


def _populated_store() -> FactorStore:
    """Two entries: a dense one with eigen decompositions + extras + owner, and a diagonal-A one."""
    store = FactorStore()
    dense = store.add("block.fc", a_dim=4, g_dim=3)
    dense.A, dense.G = _spd(4, 1), _spd(3, 2)
    dense.dA, dense.QA = torch.linalg.eigh(dense.A)
    dense.dG, dense.QG = torch.linalg.eigh(dense.G)
    dense.extras = {"ekfac_scale": _rand(3, 4, seed=3), "window": _rand(2, 5, seed=4).float()}
    dense.owner, dense.num_updates = 1, 7

    diag = store.add("emb", a_dim=5, g_dim=2, a_diagonal=True)
    diag.A = torch.tensor([1.0, 2.0, 0.5, 3.0, 4.0], dtype=torch.float64)
    diag.G = _spd(2, 5)
    diag.A_inv = 1.0 / (diag.A + 0.1)
    diag.G_inv = torch.linalg.inv(diag.G + 0.1 * torch.eye(2, dtype=torch.float64))
    diag.owner, diag.num_updates = None, 3
    return store


def _assert_entries_equal(a: FactorEntry, b: FactorEntry) -> None:
    assert (a.name, a.a_dim, a.g_dim, a.a_diagonal) == (b.name, b.a_dim, b.g_dim, b.a_diagonal)
    assert (a.owner, a.num_updates) == (b.owner, b.num_updates)
    for k in DECOMP_FIELDS:
        ta, tb = getattr(a, k), getattr(b, k)
        assert (ta is None) == (tb is None), k
        if ta is not None:
            assert ta.dtype == tb.dtype, k
            assert torch.equal(ta, tb), k
    assert set(a.extras) == set(b.extras)
    for k in a.extras:
        assert a.extras[k].dtype == b.extras[k].dtype
        assert torch.equal(a.extras[k], b.extras[k]), k


def _assert_stores_equal(a: FactorStore, b: FactorStore) -> None:
    assert list(a) == list(b)
    for name in a:
        _assert_entries_equal(a[name], b[name])


# -- mapping API ---------------------------------------------------------------------------------------------
def test_add_and_getitem():
    store = FactorStore()
    e = store.add("fc1", a_dim=4, g_dim=3)
    store.add("fc2", a_dim=2, g_dim=6, a_diagonal=True)
    assert store["fc1"] is e
    assert (e.name, e.a_dim, e.g_dim, e.a_diagonal, e.owner, e.num_updates) == ("fc1", 4, 3, False, None, 0)
    assert all(getattr(e, k) is None for k in DECOMP_FIELDS) and e.extras == {}
    assert list(store) == ["fc1", "fc2"] and len(store) == 2 and "fc2" in store and "fc3" not in store
    assert store["fc2"].a_diagonal is True


def test_getitem_missing_has_clear_keyerror():
    store = FactorStore()
    store.add("fc1", a_dim=2, g_dim=2)
    with pytest.raises(KeyError) as info:
        store["nope"]
    msg = str(info.value)
    assert "'nope'" in msg and "fc1" in msg


def test_add_duplicate_raises():
    store = FactorStore()
    store.add("fc1", a_dim=2, g_dim=2)
    with pytest.raises(KeyError, match="already"):
        store.add("fc1", a_dim=2, g_dim=2)


def test_nbytes_counts_every_tensor():
    store = _populated_store()
    expected = sum(t.numel() * t.element_size() for e in store.values() for t in e.tensors().values())
    # dense: A 16, G 9, QA 16, dA 4, QG 9, dG 3, extras 12 (f64) + 10 (f32); diag: A 5, G 4, A_inv 5, G_inv 4
    assert expected == (16 + 9 + 16 + 4 + 9 + 3 + 12) * 8 + 10 * 4 + (5 + 4 + 5 + 4) * 8
    assert store.nbytes() == expected


# -- state dict ----------------------------------------------------------------------------------------------
def test_state_dict_round_trip_into_empty_store():
    store = _populated_store()
    fresh = FactorStore()
    fresh.load_state_dict(store.state_dict())
    _assert_stores_equal(store, fresh)
    assert fresh["block.fc"].owner == 1 and fresh["block.fc"].num_updates == 7
    assert fresh["emb"].owner is None and fresh["emb"].num_updates == 3


def test_state_dict_round_trip_into_matching_store_replaces_everything():
    store = _populated_store()
    target = FactorStore()
    t_dense = target.add("block.fc", a_dim=4, g_dim=3)
    t_dense.A_inv = torch.zeros(4, 4, dtype=torch.float64)  # stale field not present in the saved state
    t_dense.extras = {"stale": torch.zeros(1)}
    target.add("emb", a_dim=5, g_dim=2, a_diagonal=True)
    target.load_state_dict(store.state_dict())
    _assert_stores_equal(store, target)
    assert target["block.fc"].A_inv is None and "stale" not in target["block.fc"].extras


def test_state_dict_survives_torch_save_weights_only(tmp_path):
    store = _populated_store()
    torch.save(store.state_dict(), tmp_path / "s.pt")
    fresh = FactorStore()
    fresh.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    _assert_stores_equal(store, fresh)


def test_load_state_dict_dim_mismatch_raises():
    store = _populated_store()
    other = FactorStore()
    other.add("block.fc", a_dim=5, g_dim=3)  # different a_dim
    other.add("emb", a_dim=5, g_dim=2, a_diagonal=True)
    with pytest.raises(FactorFileError, match=r"block\.fc"):
        other.load_state_dict(store.state_dict())


def test_load_state_dict_diagonal_mismatch_raises():
    store = _populated_store()
    other = FactorStore()
    other.add("block.fc", a_dim=4, g_dim=3)
    other.add("emb", a_dim=5, g_dim=2, a_diagonal=False)
    with pytest.raises(FactorFileError, match="emb"):
        other.load_state_dict(store.state_dict())


def test_load_state_dict_layer_set_mismatch_raises():
    store = _populated_store()
    other = FactorStore()
    other.add("block.fc", a_dim=4, g_dim=3)
    other.add("other", a_dim=5, g_dim=2)
    with pytest.raises(FactorFileError) as info:
        other.load_state_dict(store.state_dict())
    assert "other" in str(info.value) and "emb" in str(info.value)


def test_load_state_dict_tensor_shape_inconsistent_with_meta_raises():
    state = _populated_store().state_dict()
    state["entries"]["block.fc"]["tensors"]["G"] = torch.zeros(4, 4, dtype=torch.float64)
    with pytest.raises(FactorFileError, match=r"block\.fc.*G"):
        FactorStore().load_state_dict(state)


def test_load_state_dict_rejects_foreign_dict():
    with pytest.raises(FactorFileError, match="format"):
        FactorStore().load_state_dict({"entries": {}})


def test_failed_load_state_dict_leaves_store_unchanged():
    store = _populated_store()
    before = FactorStore()
    before.load_state_dict(store.state_dict())  # reference copy of store's contents

    bad = _populated_store().state_dict()
    bad["entries"]["block.fc"]["tensors"]["A"] = torch.full((4, 4), 9.0, dtype=torch.float64)  # valid
    bad["entries"]["emb"]["tensors"]["G"] = torch.zeros(3, 3, dtype=torch.float64)  # wrong shape
    with pytest.raises(FactorFileError):
        store.load_state_dict(bad)
    _assert_stores_equal(before, store)


# -- files ---------------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    store = _populated_store()
    path = tmp_path / "sub" / "factors.safetensors"  # parent directory is created
    store.save(path)
    loaded = FactorStore.load(path)
    _assert_stores_equal(store, loaded)
    assert loaded["emb"].a_diagonal and loaded["emb"].A.shape == (5,)
    assert loaded["block.fc"].extras["window"].dtype == torch.float32
    # str paths and an explicit device work too
    loaded2 = FactorStore.load(str(path), device="cpu")
    _assert_stores_equal(store, loaded2)


def test_save_load_empty_store(tmp_path):
    path = tmp_path / "empty.safetensors"
    FactorStore().save(path)
    assert len(FactorStore.load(path)) == 0


def test_save_load_entry_without_tensors(tmp_path):
    store = FactorStore()
    store.add("fc", a_dim=3, g_dim=2)
    store.save(tmp_path / "f.safetensors")
    loaded = FactorStore.load(tmp_path / "f.safetensors")
    assert list(loaded) == ["fc"]
    _assert_entries_equal(store["fc"], loaded["fc"])


def test_save_overwrites_existing_file(tmp_path):
    path = tmp_path / "f.safetensors"
    s1 = FactorStore()
    s1.add("x", a_dim=1, g_dim=1).A = torch.ones(1, 1)
    s1.save(path)
    s2 = _populated_store()
    s2.save(path)
    _assert_stores_equal(s2, FactorStore.load(path))
    assert sorted(os.listdir(tmp_path)) == ["f.safetensors"]


def test_load_missing_file(tmp_path):
    path = tmp_path / "missing.safetensors"
    with pytest.raises(FactorFileError) as info:
        FactorStore.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("kind", ["truncated_half", "truncated_header", "random", "empty"])
def test_load_corrupt_file_raises_with_path(tmp_path, kind):
    good = tmp_path / "good.safetensors"
    _populated_store().save(good)
    data = good.read_bytes()
    bad = tmp_path / f"{kind}.safetensors"
    if kind == "truncated_half":
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "truncated_header":
        bad.write_bytes(data[:20])
    elif kind == "random":
        bad.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                      dtype=torch.uint8).numpy().tobytes())
    else:
        bad.write_bytes(b"")
    with pytest.raises(FactorFileError) as info:
        FactorStore.load(bad)
    assert str(bad) in str(info.value)


def test_load_foreign_safetensors_file_raises_with_path(tmp_path):
    path = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(FactorFileError) as info:
        FactorStore.load(path)
    assert str(path) in str(info.value) and "not a kfac factor file" in str(info.value)

    path2 = tmp_path / "foreign_meta.safetensors"
    safetensors.torch.save_file({"weight": torch.zeros(2, 2)}, str(path2), metadata={"format": "pt"})
    with pytest.raises(FactorFileError) as info:
        FactorStore.load(path2)
    assert str(path2) in str(info.value)


def test_load_our_format_with_broken_index_raises_with_path(tmp_path):
    path = tmp_path / "broken_index.safetensors"
    safetensors.torch.save_file({"0/A": torch.zeros(2, 2)}, str(path),
                                metadata={"format": "kfac.FactorStore", "version": "1", "index": "{not json"})
    with pytest.raises(FactorFileError) as info:
        FactorStore.load(path)
    assert str(path) in str(info.value)

    path2 = tmp_path / "missing_tensor.safetensors"
    index = [{"name": "fc", "fields": ["A", "G"], "a_dim": 2, "g_dim": 2, "a_diagonal": False,
              "owner": None, "num_updates": 1}]
    _write_raw(path2, {"0/A": torch.zeros(2, 2)}, index)
    with pytest.raises(FactorFileError) as info:
        FactorStore.load(path2)
    assert str(path2) in str(info.value)


def _write_raw(path, tensors, index) -> None:
    """A file in our format written behind the store's back (to plant inconsistencies)."""
    safetensors.torch.save_file(tensors, str(path),
                                metadata={"format": "kfac.FactorStore", "version": "1", "index": json.dumps(index)})


def test_load_file_with_inconsistent_shapes_names_path(tmp_path):
    path = tmp_path / "inconsistent.safetensors"
    index = [{"name": "fc", "fields": ["A"], "a_dim": 2, "g_dim": 2, "a_diagonal": False,
              "owner": None, "num_updates": 1}]
    _write_raw(path, {"0/A": torch.zeros(3, 3)}, index)
    with pytest.raises(FactorFileError) as info:
        FactorStore.load(path)
    assert str(path) in str(info.value)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "factors.safetensors"
    original = _populated_store()
    original.save(path)
    before = path.read_bytes()

    def failing_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:  # write some partial garbage first, like a crash midway
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    other = FactorStore()
    other.add("z", a_dim=1, g_dim=1).A = torch.ones(1, 1)
    with pytest.raises(OSError, match="disk full"):
        other.save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["factors.safetensors"]  # no temp file left behind
    monkeypatch.undo()
    _assert_stores_equal(original, FactorStore.load(path))


def test_save_failure_without_existing_file_leaves_nothing(tmp_path, monkeypatch):
    def failing_save_file(tensors, filename, metadata=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    with pytest.raises(RuntimeError, match="boom"):
        _populated_store().save(tmp_path / "f.safetensors")
    assert os.listdir(tmp_path) == []


def test_saved_file_has_default_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    if umask & 0o044:
        pytest.skip("umask hides group/other read bits anyway")
    path = tmp_path / "f.safetensors"
    _populated_store().save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


# -- with a real preconditioner ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_preconditioner_store_save_load(tmp_path, method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3, bias=False))
    pre = kfac.KFACPreconditioner(model, method=method, factor_decay=0.9)
    for _ in range(3):
        x = torch.randn(8, 5)
        model.zero_grad()
        model(x).pow(2).sum().backward()
        assert pre.step()
    assert all(pre.store[n].num_updates == 3 for n in pre.layers)
    path = tmp_path / "pre.safetensors"
    pre.store.save(path)
    loaded = FactorStore.load(path)
    _assert_stores_equal(pre.store, loaded)
    fields = ("A", "G", "QA", "dA", "QG", "dG") if method == "eigen" else ("A", "G", "A_inv", "G_inv")
    for name in pre.layers:
        for k in fields:
            assert getattr(loaded[name], k) is not None
            assert torch.equal(getattr(loaded[name], k), getattr(pre.store[name], k))
