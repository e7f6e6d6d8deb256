"""kfac.ext: the fused factor ops (compiled extension and PyTorch fallback) against float64 math references, input
validation, and the build/load machinery (explicit opt-in, KFAC_DISABLE_EXT, prebuilt cache, failed builds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kfac import ext

REPO = Path(__file__).resolve().parents[2]
IMPLS = ["torch", "extension"]
DTYPES = [torch.float32, torch.float64]
DIMS = [1, 7, 129, 257]  # 129, 257: not multiples of the CPU row block (64) nor of the mirror tile (64)
HAS_CUDA = torch.cuda.is_available()


def _run(code_or_args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *code_or_args], cwd=REPO, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def ext_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh build with the command-line tool into an empty TORCH_EXTENSIONS_DIR: a broken build fails here."""
    root = tmp_path_factory.mktemp("torch_extensions")
    env = {"TORCH_EXTENSIONS_DIR": str(root), "MAX_JOBS": os.environ.get("MAX_JOBS", "2"), "KFAC_DISABLE_EXT": ""}
    proc = _run(["-m", "kfac.ext", "build"], env)
    assert proc.returncode == 0, f"extension build failed:\n{proc.stdout}\n{proc.stderr}"
    return root


@pytest.fixture(scope="module")
def loaded(ext_root: Path) -> None:
    """The extension loaded in this process (from the fresh build; ninja finds it up to date)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("KFAC_DISABLE_EXT", raising=False)
        assert ext.load(cache_dir=ext_root, raise_errors=True)
        assert ext.available()


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run the test body under one implementation (``kfac.ext.backend``)."""
    monkeypatch.delenv("KFAC_DISABLE_EXT", raising=False)
    if request.param == "extension":
        request.getfixturevalue("loaded")
    with ext.backend(request.param):
        yield request.param


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """``actual`` equals the float64 reference up to the dtype's rounding (absolute tolerance scaled to size)."""
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    tol = _tol(dtype)
    torch.testing.assert_close(actual.double(), expected, rtol=tol["rtol"], atol=tol["atol"] * scale)


def _triu(m: torch.Tensor) -> torch.Tensor:
    i, j = torch.triu_indices(m.shape[0], m.shape[0])
    return m[i, j]


def _rows(n: int, d: int, dtype: torch.dtype, layout: str) -> torch.Tensor:
    """``(n, d)`` rows: contiguous, a transposed view, or a strided slice of a larger tensor."""
    if layout == "transposed":
        return torch.randn(d, n, dtype=dtype).T
    if layout == "sliced":
        return torch.randn(2 * n, d + 3, dtype=dtype)[::2, 1:d + 1]
    return torch.randn(n, d, dtype=dtype)


def _sym(d: int, dtype: torch.dtype) -> torch.Tensor:
    m = torch.randn(d, d, dtype=torch.float64)
    return (m + m.T).to(dtype)


# ---- math ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_sym_outer_update_new(impl: str, dtype: torch.dtype, d: int, layout: str) -> None:
    x = _rows(37, d, dtype, layout)
    s = ext.sym_outer_update(x, alpha=0.25)
    assert s.shape == (d, d) and s.dtype == dtype
    _close(s, 0.25 * x.double().T @ x.double(), dtype)
    if impl == "extension":
        assert torch.equal(s, s.T), "the extension's result must be exactly symmetric"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", DIMS)
def test_sym_outer_update_accumulates(impl: str, dtype: torch.dtype, d: int) -> None:
    a = _sym(d, dtype)
    out = a.clone()
    x = _rows(50, d, dtype, "sliced")
    res = ext.sym_outer_update(x, out, alpha=2.0, beta=0.5)
    assert res.data_ptr() == out.data_ptr()
    _close(out, 0.5 * a.double() + 2.0 * x.double().T @ x.double(), dtype)
    # micro-batches add up to the concatenated batch
    x2 = _rows(9, d, dtype, "contiguous")
    ext.sym_outer_update(x2, out, alpha=2.0, beta=1.0)
    both = torch.cat([x, x2]).double()
    _close(out, 0.5 * a.double() + 2.0 * both.T @ both, dtype)


def test_sym_outer_update_beta_zero_ignores_nan(impl: str) -> None:
    out = torch.full((5, 5), float("nan"))
    x = torch.randn(4, 5)
    ext.sym_outer_update(x, out, beta=0.0)
    _close(out, x.double().T @ x.double(), torch.float32)


def test_sym_outer_update_zero_rows(impl: str) -> None:
    x = torch.zeros(0, 6, dtype=torch.float64)
    assert torch.equal(ext.sym_outer_update(x), torch.zeros(6, 6, dtype=torch.float64))
    a = _sym(6, torch.float64)
    out = a.clone()
    ext.sym_outer_update(x, out, beta=3.0)
    _close(out, 3.0 * a, torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_sym_outer_pack(impl: str, dtype: torch.dtype, d: int, layout: str) -> None:
    x = _rows(23, d, dtype, layout)
    n = d * (d + 1) // 2
    buffer = torch.full((n + 10,), 7.0, dtype=dtype)
    view = ext.sym_outer_pack(x, buffer, 4, alpha=1 / 23)
    assert view.shape == (n,) and view.data_ptr() == buffer[4:].data_ptr()
    expected = _triu(x.double().T @ x.double() / 23)
    _close(buffer[4:4 + n], expected, dtype)
    assert torch.equal(buffer[:4], torch.full((4,), 7.0, dtype=dtype))
    assert torch.equal(buffer[4 + n:], torch.full((6,), 7.0, dtype=dtype))
    # beta accumulates into the packed slice (a packed running sum)
    ext.sym_outer_pack(x, buffer, 4, alpha=1.0, beta=0.5)
    _close(buffer[4:4 + n], 0.5 * expected + 23 * expected, dtype)


def test_sym_outer_pack_beta_zero_ignores_nan(impl: str) -> None:
    x = torch.randn(3, 4, dtype=torch.float64)
    buffer = torch.full((10,), float("nan"), dtype=torch.float64)
    ext.sym_outer_pack(x, buffer)
    _close(buffer, _triu(x.T @ x), torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_symmetric_many(impl: str, dtype: torch.dtype) -> None:
    big = _sym(300, dtype)
    mats = [_sym(1, dtype), _sym(7, dtype).T, big[::2, ::2], _sym(129, dtype), _sym(0, dtype), _sym(257, dtype)]
    scales = [1.0, 0.5, -2.0, 1e-3, 3.0, 1.0]
    flat = ext.pack_symmetric_many(mats, scales)
    expected = torch.cat([s * _triu(m.double()) for m, s in zip(mats, scales)])
    assert flat.shape == expected.shape and flat.dtype == dtype
    _close(flat, expected, dtype)
    # into a larger buffer at an offset; the rest is untouched; no scales means 1
    out = torch.full((expected.numel() + 5,), 9.0, dtype=dtype)
    assert ext.pack_symmetric_many(mats, out=out, offset=2) is out
    _close(out[2:2 + expected.numel()], torch.cat([_triu(m.double()) for m in mats]), dtype)
    assert torch.equal(out[:2], torch.full((2,), 9.0, dtype=dtype))
    assert torch.equal(out[-3:], torch.full((3,), 9.0, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_unpack_symmetric_many(impl: str, dtype: torch.dtype) -> None:
    dims = [1, 7, 0, 129, 257]
    mats = [_sym(d, dtype) for d in dims]
    flat = torch.cat([torch.tensor([5.0, 6.0], dtype=dtype)] + [_triu(m) for m in mats])
    got = ext.unpack_symmetric_many(flat, torch.tensor(dims).tolist(), offset=2)
    assert [m.shape[0] for m in ext.unpack_symmetric_many(flat, torch.Size(dims), offset=2)] == dims
    assert [tuple(m.shape) for m in got] == [(d, d) for d in dims]
    for m, ref in zip(got, mats):
        assert m.dtype == dtype and m.is_contiguous()
        assert torch.equal(m, ref), "unpacking copies values, exactly"
    # non-contiguous input (every other element of a longer vector)
    spread = torch.zeros(2 * flat.numel(), dtype=dtype)
    spread[::2] = flat
    for m, ref in zip(ext.unpack_symmetric_many(spread[::2], dims, offset=2), mats):
        assert torch.equal(m, ref)


def test_pack_unpack_roundtrip_is_triu_order(impl: str) -> None:
    m = torch.arange(16.0).reshape(4, 4)
    m = m + m.T
    flat = ext.pack_symmetric_many([m])
    assert torch.equal(flat, m[tuple(torch.triu_indices(4, 4))])
    assert torch.equal(ext.unpack_symmetric_many(flat, [4])[0], m)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 129), (257, 3), (129, 257)])
@pytest.mark.parametrize("transposed", [False, True])
def test_eigen_scale(impl: str, dtype: torch.dtype, shape: tuple[int, int], transposed: bool) -> None:
    m, n = shape
    v = torch.randn(n, m, dtype=dtype).T if transposed else torch.randn(m, n, dtype=dtype)
    d_g, d_a = torch.rand(m, dtype=dtype), torch.rand(n, dtype=dtype)
    expected = v.double() / (torch.outer(d_g.double(), d_a.double()) + 0.03)
    _close(ext.eigen_scale(v, d_g, d_a, 0.03), expected, dtype)
    acc0 = torch.rand(n, m, dtype=dtype).T if transposed else torch.rand(m, n, dtype=dtype)
    acc = acc0.clone()
    _close(ext.eigen_scale(v, d_g, d_a, 0.03, acc=acc), expected, dtype)
    _close(acc, acc0.double() + v.double() ** 2, dtype)


def test_larger_sizes_with_threads(impl: str) -> None:
    """Sizes past the parallel grain, with two threads (exercises the parallel regions of the CPU kernels)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(64, 700, dtype=torch.float64)
        ref = x.T @ x
        ref = ref.triu() + ref.triu(1).T  # exactly symmetric
        _close(ext.sym_outer_update(x), ref, torch.float64)
        buffer = torch.empty(700 * 701 // 2, dtype=torch.float64)
        _close(ext.sym_outer_pack(x, buffer), _triu(ref), torch.float64)
        flat = ext.pack_symmetric_many([ref, ref[:300, :300]], [1.0, 2.0])
        _close(flat, torch.cat([_triu(ref), 2 * _triu(ref[:300, :300])]), torch.float64)
        a, b = ext.unpack_symmetric_many(flat, [700, 300])
        assert torch.equal(a, ref) and torch.equal(b, 2 * ref[:300, :300])
        v, acc = torch.randn(700, 600, dtype=torch.float64), torch.zeros(700, 600, dtype=torch.float64)
        d_g, d_a = torch.rand(700, dtype=torch.float64), torch.rand(600, dtype=torch.float64)
        _close(ext.eigen_scale(v, d_g, d_a, 0.1, acc=acc), v / (torch.outer(d_g, d_a) + 0.1), torch.float64)
        _close(acc, v ** 2, torch.float64)
    finally:
        torch.set_num_threads(threads)


def test_other_float_dtypes_use_pytorch(impl: str) -> None:
    """bfloat16 is outside the extension's dtypes: every backend computes it with PyTorch."""
    x = torch.randn(16, 9).to(torch.bfloat16)
    s = ext.sym_outer_update(x)
    assert s.dtype == torch.bfloat16
    torch.testing.assert_close(s.double(), x.double().T @ x.double(), rtol=2e-2, atol=2e-2 * 16)


@pytest.mark.parametrize("block", [1, 3, 64, 129, 1000])
def test_extension_block_sizes(loaded: None, block: int) -> None:
    """Any row-block height gives the same matrix (blocks not dividing d, a single block, blocks larger than d)."""
    x = torch.randn(30, 129, dtype=torch.float64)
    ref = x.T @ x
    _close(torch.ops.kfac_ext.sym_outer(x, 1.0, block), ref, torch.float64)
    buffer = torch.empty(129 * 130 // 2, dtype=torch.float64)
    torch.ops.kfac_ext.sym_outer_pack_(buffer, 0, x, 1.0, 0.0, block)
    _close(buffer, _triu(ref), torch.float64)


# ---- validation -----------------------------------------------------------------------------------------------------

def _bad_calls() -> list[tuple[str, object, str]]:
    f32, f64 = torch.float32, torch.float64
    x = torch.randn(4, 3)
    buf = torch.empty(6)
    return [
        ("int rows", lambda: ext.sym_outer_update(torch.ones(4, 3, dtype=torch.int64)), "floating-point"),
        ("1-D rows", lambda: ext.sym_outer_update(torch.ones(3)), "2-D"),
        ("out dtype", lambda: ext.sym_outer_update(x, torch.zeros(3, 3, dtype=f64)), "dtype"),
        ("out shape", lambda: ext.sym_outer_update(x, torch.zeros(4, 4)), "3 x 3"),
        ("out device", lambda: ext.sym_outer_update(x, torch.zeros(3, 3, device="meta")), "meta"),
        ("buffer small", lambda: ext.sym_outer_pack(x, torch.empty(5)), "too small"),
        ("buffer offset", lambda: ext.sym_outer_pack(x, torch.empty(8), 3), "too small"),
        ("negative offset", lambda: ext.sym_outer_pack(x, buf, -1), ">= 0"),
        ("buffer dtype", lambda: ext.sym_outer_pack(x, torch.empty(6, dtype=f64)), "dtype"),
        ("buffer 2-D", lambda: ext.sym_outer_pack(x, torch.empty(2, 3)), "1-D"),
        ("buffer strided", lambda: ext.sym_outer_pack(x, torch.empty(12)[::2]), "contiguous"),
        ("no matrices", lambda: ext.pack_symmetric_many([]), "at least one"),
        ("not square", lambda: ext.pack_symmetric_many([torch.zeros(2, 3)]), "square"),
        ("mixed dtypes", lambda: ext.pack_symmetric_many([torch.zeros(2, 2), torch.zeros(2, 2, dtype=f64)]), "dtype"),
        ("scales", lambda: ext.pack_symmetric_many([torch.zeros(2, 2)], [1.0, 2.0]), "2 scales for 1"),
        ("pack out small", lambda: ext.pack_symmetric_many([torch.zeros(2, 2)], out=torch.empty(2)), "too small"),
        ("flat small", lambda: ext.unpack_symmetric_many(torch.zeros(5), [3]), "too small"),
        ("flat offset", lambda: ext.unpack_symmetric_many(torch.zeros(6), [3], offset=1), "too small"),
        ("negative dim", lambda: ext.unpack_symmetric_many(torch.zeros(6), [-1]), "non-negative"),
        ("float dim", lambda: ext.unpack_symmetric_many(torch.zeros(6), [3.0]), "non-negative"),
        ("flat 2-D", lambda: ext.unpack_symmetric_many(torch.zeros(2, 3), [2]), "1-D"),
        ("d_g shape", lambda: ext.eigen_scale(torch.zeros(2, 3), torch.ones(3), torch.ones(3), 0.1), "d_g"),
        ("d_a shape", lambda: ext.eigen_scale(torch.zeros(2, 3), torch.ones(2), torch.ones(2), 0.1), "d_a"),
        ("d_a dtype", lambda: ext.eigen_scale(torch.zeros(2, 3), torch.ones(2), torch.ones(3, dtype=f64), 0.1),
         "dtype"),
        ("acc shape", lambda: ext.eigen_scale(torch.zeros(2, 3), torch.ones(2), torch.ones(3), 0.1,
                                              acc=torch.zeros(3, 2)), "acc"),
        ("acc dtype", lambda: ext.eigen_scale(torch.zeros(2, 3, dtype=f32), torch.ones(2), torch.ones(3), 0.1,
                                              acc=torch.zeros(2, 3, dtype=f64)), "dtype"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_input_raises_clear_error(impl: str, case: tuple[str, object, str]) -> None:
    _, call, message = case
    with pytest.raises(ValueError, match=message):
        call()


def test_non_tensor_input_raises_type_error(impl: str) -> None:
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ext.sym_outer_update([[1.0, 2.0]])  # type: ignore[arg-type]


def _bad_kernel_calls() -> list[tuple[str, object, str]]:
    ops = torch.ops.kfac_ext
    x = torch.randn(4, 3)
    return [
        ("dtype", lambda: ops.sym_outer(x.to(torch.bfloat16), 1.0, 0), "float32 or float64"),
        ("int", lambda: ops.sym_outer(torch.ones(4, 3, dtype=torch.int32), 1.0, 0), "float32 or float64"),
        ("rank", lambda: ops.sym_outer(torch.ones(3), 1.0, 0), "2-D"),
        ("out shape", lambda: ops.sym_outer_update_(torch.zeros(4, 4), x, 1.0, 1.0, 0), "3 x 3"),
        ("out dtype", lambda: ops.sym_outer_update_(torch.zeros(3, 3, dtype=torch.float64), x, 1.0, 1.0, 0), "dtype"),
        ("out expanded", lambda: ops.sym_outer_update_(torch.zeros(1, 3).expand(3, 3), x, 1.0, 1.0, 0),
         "overlapping"),
        ("device", lambda: ops.sym_outer_update_(torch.zeros(3, 3, device="meta"), x, 1.0, 1.0, 0), "meta"),
        ("buffer small", lambda: ops.sym_outer_pack_(torch.empty(5), 0, x, 1.0, 0.0, 0), "too small"),
        ("buffer offset", lambda: ops.sym_outer_pack_(torch.empty(6), -1, x, 1.0, 0.0, 0), ">= 0"),
        ("buffer strided", lambda: ops.sym_outer_pack_(torch.empty(12)[::2], 0, x, 1.0, 0.0, 0), "contiguous"),
        ("scales", lambda: ops.pack_symmetric_many_(torch.empty(3), 0, [torch.zeros(2, 2)], [1.0, 2.0]), "scales"),
        ("square", lambda: ops.pack_symmetric_many_(torch.empty(9), 0, [torch.zeros(2, 3)], []), "square"),
        ("pack small", lambda: ops.pack_symmetric_many_(torch.empty(2), 0, [torch.zeros(2, 2)], []), "too small"),
        ("flat small", lambda: ops.unpack_symmetric_many(torch.zeros(5), 0, [3]), "too small"),
        ("negative dim", lambda: ops.unpack_symmetric_many(torch.zeros(5), 0, [-2]), ">= 0"),
        ("d_g", lambda: ops.eigen_scale(torch.zeros(2, 3), torch.ones(3), torch.ones(3), 0.1), "d_g"),
        ("acc", lambda: ops.eigen_scale_acc_(torch.zeros(2, 3), torch.ones(2), torch.ones(3), 0.1,
                                             torch.zeros(1, 3).expand(2, 3)), "overlapping"),
    ]


@pytest.mark.parametrize("case", _bad_kernel_calls(), ids=lambda c: c[0])
def test_kernels_reject_bad_input(loaded: None, case: tuple[str, object, str]) -> None:
    """The compiled ops validate on their own (TORCH_CHECK -> RuntimeError), never touching bad memory."""
    _, call, message = case
    with pytest.raises(RuntimeError, match=message):
        call()


# ---- dispatch, loading, building ------------------------------------------------------------------------------------

def _spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    calls: list[int] = []
    original = getattr(ext.reference, name)  # the ops look their fallbacks up on kfac.ext.reference

    def wrapper(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(ext.reference, name, wrapper)
    return calls


def test_disable_env_forces_fallback(loaded: None, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy(monkeypatch, "sym_outer_update_torch")
    monkeypatch.setitem(ext.PREFERRED, "cpu", dict.fromkeys(ext.OPS, 0))
    ext.sym_outer_update(torch.randn(3, 2))
    assert calls == [] and ext.available()
    monkeypatch.setenv("KFAC_DISABLE_EXT", "1")
    assert not ext.available()
    ext.sym_outer_update(torch.randn(3, 2))
    assert calls == [1]
    with pytest.raises(RuntimeError, match="not available"), ext.backend("extension"):
        pass


def test_preferences_choose_the_implementation(loaded: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KFAC_DISABLE_EXT", raising=False)
    monkeypatch.setitem(ext.PREFERRED, "cpu", {})
    calls = _spy(monkeypatch, "eigen_scale_torch")
    v, d = torch.randn(2, 3), torch.ones(2)
    ext.eigen_scale(v, d, torch.ones(3), 0.1)
    assert calls == [1]
    ext.set_preferred("eigen_scale", "cpu", True)
    ext.eigen_scale(v, d, torch.ones(3), 0.1)
    assert calls == [1]
    with ext.backend("torch"):
        ext.eigen_scale(v, d, torch.ones(3), 0.1)
    assert calls == [1, 1]
    ext.set_preferred("eigen_scale", "cpu", True, min_size=7)  # v has 6 elements: too small
    ext.eigen_scale(v, d, torch.ones(3), 0.1)
    assert calls == [1, 1, 1]
    with ext.backend("extension"):  # forcing ignores sizes
        ext.eigen_scale(v, d, torch.ones(3), 0.1)
    assert calls == [1, 1, 1]
    ext.set_preferred("eigen_scale", "cpu", False)
    assert "eigen_scale" not in ext.PREFERRED["cpu"]
    with pytest.raises(ValueError, match="unknown op"):
        ext.set_preferred("nope", "cpu", True)
    with pytest.raises(ValueError, match="backend"), ext.backend("fast"):  # type: ignore[arg-type]
        pass


def test_default_preferences_follow_problem_size(loaded: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """sym_outer_update: one row block (d <= 64) gains nothing -> PyTorch; a large product -> the extension."""
    monkeypatch.delenv("KFAC_DISABLE_EXT", raising=False)
    calls = _spy(monkeypatch, "sym_outer_update_torch")
    ext.sym_outer_update(torch.randn(4096, 64))
    assert calls == [1]
    ext.sym_outer_update(torch.randn(300, 200))
    assert calls == [1]


def test_disable_env_in_a_fresh_process(ext_root: Path) -> None:
    code = ("import torch, kfac.ext as e; s = e.sym_outer_update(torch.eye(3)); "
            "print(e.available(), torch.equal(s, torch.eye(3)))")
    proc = _run(["-c", code], {"TORCH_EXTENSIONS_DIR": str(ext_root), "KFAC_DISABLE_EXT": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True"]


def test_prebuilt_library_loads_without_compiling(ext_root: Path) -> None:
    """After ``python -m kfac.ext build``, a new process uses the cached library; nothing is rebuilt."""
    libs = list(ext_root.glob("*/kfac_ext.so"))
    assert len(libs) == 1
    mtime = libs[0].stat().st_mtime_ns
    code = ("import sys, torch, kfac.ext as e; e.sym_outer_update(torch.eye(2)); "
            "print(e.available(), 'torch.utils.cpp_extension' in sys.modules)")
    proc = _run(["-c", code], {"TORCH_EXTENSIONS_DIR": str(ext_root), "KFAC_DISABLE_EXT": ""})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "False"]  # loaded, and the JIT machinery was never imported
    assert libs[0].stat().st_mtime_ns == mtime
    info = _run(["-m", "kfac.ext", "info"], {"TORCH_EXTENSIONS_DIR": str(ext_root), "KFAC_DISABLE_EXT": ""})
    status = json.loads(info.stdout)
    assert status["available"] and status["library"] == str(libs[0]) and status["build_info"].startswith("cuda=")


def test_import_never_builds(tmp_path: Path) -> None:
    code = ("import sys, torch, kfac, kfac.ext as e; s = e.sym_outer_update(torch.eye(2)); "
            "print(e.available(), 'torch.utils.cpp_extension' in sys.modules)")
    proc = _run(["-c", code], {"TORCH_EXTENSIONS_DIR": str(tmp_path), "KFAC_DISABLE_EXT": "", "KFAC_BUILD_EXT": ""})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]
    assert list(tmp_path.iterdir()) == []


def test_failed_build_logs_one_line_and_falls_back(tmp_path: Path) -> None:
    """KFAC_BUILD_EXT=1 builds on first use; with no usable compiler that fails: one log line, correct results."""
    code = ("import logging, torch, kfac.ext as e\n"
            "records = []\n"
            "class H(logging.Handler):\n"
            "    def emit(self, r): records.append(r.getMessage())\n"
            "logging.getLogger('kfac').addHandler(H())\n"
            "x = torch.randn(5, 3, dtype=torch.float64)\n"
            "ok = torch.allclose(e.sym_outer_update(x), x.T @ x)\n"
            "e.sym_outer_update(x)\n"
            "print(ok, e.available(), len(records))\n"
            "print(records[0] if records else '')\n")
    proc = _run(["-c", code], {"TORCH_EXTENSIONS_DIR": str(tmp_path), "KFAC_BUILD_EXT": "1", "KFAC_DISABLE_EXT": "",
                               "CXX": str(tmp_path / "no-such-compiler")})
    assert proc.returncode == 0, proc.stderr
    first, message = proc.stdout.splitlines()[:2]
    assert first.split() == ["True", "False", "1"]
    assert "C++ extension unavailable, using the PyTorch fallback" in message


# ---- CUDA -----------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernels_match_references(loaded: None, dtype: torch.dtype) -> None:
    if not ext.info()["cuda_kernels"]:
        pytest.fail("CUDA is available but the extension was built without its CUDA kernels")
    dev = torch.device("cuda")
    with ext.backend("extension"):
        for d in DIMS + [1100]:
            x = _rows(45, d, dtype, "sliced").to(dev)
            ref = x.double().T @ x.double()
            s = ext.sym_outer_update(x, alpha=0.5)
            _close(s.cpu(), 0.5 * ref.cpu(), dtype)
            assert torch.equal(s, s.T)
            out = _sym(d, dtype).to(dev)
            expected = 2.0 * out.double() + ref
            ext.sym_outer_update(x, out, beta=2.0)
            _close(out.cpu(), expected.cpu(), dtype)
            buffer = torch.zeros(d * (d + 1) // 2 + 3, dtype=dtype, device=dev)
            ext.sym_outer_pack(x, buffer, 3, alpha=0.5)
            _close(buffer[3:].cpu(), 0.5 * _triu(ref.cpu()), dtype)
            mats = [_sym(d, dtype).to(dev), _sym(5, dtype).to(dev).T]
            flat = ext.pack_symmetric_many(mats, [2.0, 1.0])
            _close(flat.cpu(), torch.cat([2.0 * _triu(mats[0].double().cpu()), _triu(mats[1].double().cpu())]),
                   dtype)
            back = ext.unpack_symmetric_many(ext.pack_symmetric_many(mats), [d, 5])
            assert torch.equal(back[0], mats[0]) and torch.equal(back[1], mats[1])
            v = torch.randn(d, 33, dtype=dtype, device=dev)
            d_g, d_a = torch.rand(d, dtype=dtype, device=dev), torch.rand(33, dtype=dtype, device=dev)
            acc = torch.zeros(33, d, dtype=dtype, device=dev).T
            got = ext.eigen_scale(v, d_g, d_a, 0.1, acc=acc)
            _close(got.cpu(), (v.double() / (torch.outer(d_g.double(), d_a.double()) + 0.1)).cpu(), dtype)
            _close(acc.cpu(), (v.double() ** 2).cpu(), dtype)


def test_kfac_training_is_the_same_with_and_without_the_extension(loaded: None) -> None:
    """A full K-FAC run (conv + linear layers, factor statistics, eigen scaling, packing for the wire) gives the
    same parameters whichever implementation runs the fused ops (float64: to rounding)."""
    import torch.nn.functional as F
    from torch import nn

    import kfac

    def train(name: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 70),
                              nn.Tanh(), nn.Linear(70, 3)).double()
        opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), inv_update_steps=2,
                        damping=1e-2, factor_dtype=torch.float64)
        gen = torch.Generator().manual_seed(1)
        with ext.backend(name):
            for _ in range(6):
                x = torch.randn(16, 2, 6, 6, generator=gen, dtype=torch.float64)
                y = torch.randint(0, 3, (16,), generator=gen)
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
                packed = kfac.distributed.comm.pack_symmetric(opt.store["3"].A)  # the wire format, both ways
                torch.testing.assert_close(kfac.distributed.comm.unpack_symmetric(packed, opt.store["3"].a_dim), opt.store["3"].A)
        return [p.detach() for p in model.parameters()]

    for got, want in zip(train("extension"), train("torch")):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
