"""Layer shapes and the cost model the planner optimises against (pure Python; ``calibrate`` imports torch lazily).

For a layer with factors ``A`` (``a x a``, or a length-``a`` vector when diagonal) and ``G`` (``g x g``) and a
gradient matrix ``V`` of shape ``(g, a)``:

=======================  =========================================================================================
decomposition (seconds)  eigen: ``refresh_fraction * c_eig * d^3``; inverse: ``c_inv * d^3``; diagonal ``A``: ``c_mm * a`` (elementwise)
preconditioning / step   ``k * c_mm * (g^2 a + g a^2)`` with ``k = 2`` for eigen (``QG^T V QA`` then back) and
                         ``k = 1`` for inverse (``G^-1 V A^-1``); diagonal ``A``: ``k * c_mm * g^2 a + c_mm * g a``
memory held (bytes)      ``bytes_per_element *``: factor ``d^2`` (diagonal ``d``); eigen decomposition
                         ``d^2 + d`` (``Q`` and eigenvalues; diagonal ``d``); inverse ``d^2`` (diagonal ``d``)
sent (elements)          factor: packed upper triangle ``d(d+1)/2`` (diagonal ``d``); eigen decomposition
                         ``d^2 + d`` (``Q`` is not symmetric); inverse: ``d(d+1)/2``; gradient ``g * a``
=======================  =========================================================================================

Sent elements are multiplied by ``comm_bytes_per_element``. ``c_mm`` is seconds per multiply-add.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["LayerSpec", "CostModel", "METHODS", "calibrate", "cache_path", "layer_specs"]

METHODS = ("eigen", "inverse")
"""Curvature methods the cost model knows (the ``method`` of :class:`kfac.KFACPreconditioner`)."""


@dataclass(frozen=True)
class LayerSpec:
    """One tracked layer: its name (as in ``model.named_modules()``) and Kronecker factor sizes.

    ``a_dim`` counts the bias column when the layer has a bias; ``a_diagonal`` marks a diagonal ``A`` (embeddings).
    Build these from a preconditioner's store with
    ``[LayerSpec(e.name, e.a_dim, e.g_dim, e.a_diagonal) for e in pre.store.values()]``.
    """

    name: str
    a_dim: int
    g_dim: int
    a_diagonal: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"LayerSpec.name must be a str, got {self.name!r}")
        for field_name in ("a_dim", "g_dim"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LayerSpec {self.name!r}: {field_name} must be a positive int, got {value!r}")
        if not isinstance(self.a_diagonal, bool):
            raise TypeError(f"LayerSpec {self.name!r}: a_diagonal must be a bool, got {self.a_diagonal!r}")

    def dim(self, factor: str) -> int:
        """Size of factor ``"A"`` or ``"G"``."""
        return _pick(factor, self.a_dim, self.g_dim)

    def diagonal(self, factor: str) -> bool:
        return _pick(factor, self.a_diagonal, False)

    @property
    def grad_elements(self) -> int:
        """Elements of the ``(g_dim, a_dim)`` gradient matrix."""
        return self.g_dim * self.a_dim

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "a_dim": self.a_dim, "g_dim": self.g_dim, "a_diagonal": self.a_diagonal}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LayerSpec":
        unknown = set(data) - {"name", "a_dim", "g_dim", "a_diagonal"}
        if unknown:
            raise ValueError(f"layer spec {data!r}: unknown keys {sorted(unknown)}")
        try:
            return cls(str(data["name"]), data["a_dim"], data["g_dim"], bool(data.get("a_diagonal", False)))
        except KeyError as exc:
            raise ValueError(f"layer spec {data!r} lacks {exc.args[0]!r}") from None


def _pick(factor: str, a: Any, g: Any) -> Any:
    if factor == "A":
        return a
    if factor == "G":
        return g
    raise ValueError(f"factor must be 'A' or 'G', got {factor!r}")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


@dataclass(frozen=True)
class CostModel:
    """Seconds and bytes predicted for K-FAC's per-layer work (formulas in :mod:`kfac.planner.cost`).

    The defaults (:meth:`default`) are fixed order-of-magnitude fp32 constants for a current data-centre GPU
    (A100/H100 class, cuSOLVER ``syevd`` for ``eigh``), so a plan never depends on timing unless you ask for it with
    :func:`calibrate`. Only the ratios ``c_eig : c_inv : c_mm`` affect assignments; absolute values only scale the
    reported seconds. Plans must be identical on every rank, so a calibrated model must be too: the distributed
    code calibrates (or loads) on rank 0 and broadcasts ``to_dict()`` to the other ranks.
    """

    c_eig: float = 5e-12
    """Seconds per ``d^3`` of one symmetric eigendecomposition."""
    c_inv: float = 5e-13
    """Seconds per ``d^3`` of one damped inverse (Cholesky + ``cholesky_inverse``)."""
    c_mm: float = 5e-14
    """Seconds per multiply-add of a dense matmul."""
    bytes_per_element: int = 4
    """Bytes per stored factor/decomposition element (``factor_dtype``)."""
    comm_bytes_per_element: int = 4
    """Bytes per communicated element (e.g. 2 when factors and gradients are sent in bf16)."""
    bandwidth: float = 25e9
    """Bytes per second a rank receives point-to-point (used only to decide whether splitting ``A``/``G`` of a
    single-grad-worker plan pays for the decomposition it then has to ship; not measured by :func:`calibrate`)."""
    refresh_fraction: float = 1.0
    """The average cost of one eigen refresh as a fraction of a full decomposition (below 1 with warm-started
    refreshes, which keep or correct the previous basis; see :mod:`kfac.kronecker.methods.warm`)."""
    source: str = "default"
    """Where the constants come from (``"default"``, or the device/torch version of a calibration)."""

    def __post_init__(self) -> None:
        if isinstance(self.refresh_fraction, bool) or not isinstance(self.refresh_fraction, (int, float)) \
                or not 0 < self.refresh_fraction <= 1:
            raise ValueError(f"CostModel.refresh_fraction must be in (0, 1], got {self.refresh_fraction!r}")
        object.__setattr__(self, "refresh_fraction", float(self.refresh_fraction))
        for name in ("c_eig", "c_inv", "c_mm", "bandwidth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"CostModel.{name} must be a finite non-negative number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.bandwidth <= 0:
            raise ValueError(f"CostModel.bandwidth must be positive, got {self.bandwidth!r}")
        for name in ("bytes_per_element", "comm_bytes_per_element"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CostModel.{name} must be a positive int, got {value!r}")

    @classmethod
    def default(cls) -> "CostModel":
        """The fixed, deterministic default constants."""
        return cls()

    # -- seconds -------------------------------------------------------------------------------------------
    def decomposition_seconds(self, dim: int, *, diagonal: bool = False, method: str = "eigen") -> float:
        """One refresh of one factor: ``refresh_fraction c_eig d^3`` / ``c_inv d^3`` (diagonal: ``c_mm d``)."""
        _check_method(method)
        if diagonal:
            return self.c_mm * dim
        return (self.refresh_fraction * self.c_eig if method == "eigen" else self.c_inv) * dim**3

    def precondition_seconds(self, spec: LayerSpec, *, method: str = "eigen") -> float:
        """One preconditioning of the layer's gradient: ``k c_mm (g^2 a + g a^2)``, ``k = 2`` (eigen) or 1."""
        _check_method(method)
        k = 2 if method == "eigen" else 1
        a, g = spec.a_dim, spec.g_dim
        if spec.a_diagonal:
            return self.c_mm * (k * g * g * a + g * a)
        return self.c_mm * k * (g * g * a + g * a * a)

    # -- elements and bytes --------------------------------------------------------------------------------
    @staticmethod
    def factor_elements(dim: int, *, diagonal: bool = False) -> int:
        """Stored elements of a running factor: ``d^2`` (diagonal ``d``)."""
        return dim if diagonal else dim * dim

    @staticmethod
    def packed_elements(dim: int, *, diagonal: bool = False) -> int:
        """Communicated elements of a symmetric factor: packed upper triangle ``d(d+1)/2`` (diagonal ``d``)."""
        return dim if diagonal else dim * (dim + 1) // 2

    @staticmethod
    def decomposition_elements(dim: int, *, diagonal: bool = False, method: str = "eigen") -> int:
        """Stored elements of a decomposition: eigen ``d^2 + d``, inverse ``d^2`` (diagonal ``d``)."""
        _check_method(method)
        if diagonal:
            return dim
        return dim * dim + dim if method == "eigen" else dim * dim

    @staticmethod
    def decomposition_comm_elements(dim: int, *, diagonal: bool = False, method: str = "eigen") -> int:
        """Communicated elements of a decomposition: eigen ``d^2 + d``, inverse (symmetric) ``d(d+1)/2``."""
        _check_method(method)
        if diagonal:
            return dim
        return dim * dim + dim if method == "eigen" else dim * (dim + 1) // 2

    # -- serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CostModel":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown CostModel fields {sorted(unknown)}")
        return cls(**dict(data))


# -- calibration -----------------------------------------------------------------------------------------------
_CACHE_FILE = "planner_cost_model.json"
_CACHE_VERSION = 1


def cache_path() -> Path:
    """The calibration cache: ``$KFAC_CACHE_DIR/planner_cost_model.json`` (default ``~/.cache/kfac/``)."""
    root = os.environ.get("KFAC_CACHE_DIR") or os.path.join("~", ".cache", "kfac")
    return Path(root).expanduser() / _CACHE_FILE


def _fit_cubic(sizes: Sequence[int], seconds: Sequence[float]) -> float:
    """Least-squares ``c`` of ``t = c d^3`` (no intercept): ``c = sum(t d^3) / sum(d^6)``."""
    num = sum(t * d**3 for d, t in zip(sizes, seconds))
    den = sum(float(d) ** 6 for d in sizes)
    return max(num / den, 0.0)


def calibrate(
    device: Any = None,
    *,
    sizes: Sequence[int] = (256, 512, 1024),
    repeats: int = 5,
    dtype: str = "float32",
    use_cache: bool = True,
) -> CostModel:
    """Time ``eigh``, the damped Cholesky inverse and a square matmul at ``sizes`` and fit ``c * d^3`` to each.

    ``device`` defaults to CUDA when available, else CPU. The result is cached (keyed by device name, torch
    version, dtype and sizes) in :func:`cache_path`; pass ``use_cache=False`` to re-time. Timings differ between
    ranks, so in a distributed job calibrate on rank 0 only and broadcast ``CostModel.to_dict()``.
    """
    import torch  # lazy: the planner itself is pure Python

    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ValueError(f"dtype must name a torch floating point dtype, got {dtype!r}")
    sizes = tuple(int(d) for d in sizes)
    if not sizes or min(sizes) < 2:
        raise ValueError(f"sizes must be integers >= 2, got {sizes!r}")
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        device_name = f"cuda:{torch.cuda.get_device_name(idx)}"
    else:
        device_name = dev.type
    key = f"{device_name}|torch={torch.__version__}|{dtype}|sizes={','.join(map(str, sizes))}"
    path = cache_path()
    cache: dict[str, Any] = {}
    if use_cache and path.is_file():
        try:
            cache = json.loads(path.read_text())
            if cache.get("version") == _CACHE_VERSION and key in cache.get("models", {}):
                return CostModel.from_dict(cache["models"][key])
        except (OSError, ValueError, TypeError):
            cache = {}

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def timed(fn: Any) -> float:
        fn()  # warm-up (kernel selection, workspace allocation)
        sync()
        samples = []
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            fn()
            sync()
            samples.append(time.perf_counter() - start)
        return sorted(samples)[len(samples) // 2]

    t_eig, t_inv, t_mm = [], [], []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for d in sizes:
        x = torch.randn(d, d, generator=gen, dtype=torch.float64).to(device=dev, dtype=torch_dtype)
        spd = x @ x.T / d + torch.eye(d, device=dev, dtype=torch_dtype)
        t_eig.append(timed(lambda m=spd: torch.linalg.eigh(m)))
        t_inv.append(timed(lambda m=spd: torch.cholesky_inverse(torch.linalg.cholesky_ex(m)[0])))
        t_mm.append(timed(lambda m=spd, v=x: m @ v))
    model = CostModel(
        c_eig=_fit_cubic(sizes, t_eig), c_inv=_fit_cubic(sizes, t_inv), c_mm=_fit_cubic(sizes, t_mm),
        bytes_per_element=torch.empty((), dtype=torch_dtype).element_size(),
        comm_bytes_per_element=torch.empty((), dtype=torch_dtype).element_size(),
        source=f"calibrated {key}",
    )
    if use_cache:
        _write_cache(path, cache, key, model)
    return model


def _write_cache(path: Path, cache: dict[str, Any], key: str, model: CostModel) -> None:
    models = dict(cache.get("models", {})) if cache.get("version") == _CACHE_VERSION else {}
    models[key] = model.to_dict()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"version": _CACHE_VERSION, "models": models}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home must not break planning
        warnings.warn(f"kfac.planner: could not write the calibration cache {path}: {exc}", stacklevel=3)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def layer_specs(model: Any, skip_layers: Any = ()) -> list[LayerSpec]:
    """The :class:`LayerSpec` of every layer :class:`kfac.KFACPreconditioner` would track in ``model`` (the same
    walk, :func:`kfac.tracking.track_layers`, with the same ``skip_layers``). Imports torch lazily."""
    from ..tracking import track_layers  # lazy: imports torch

    return [LayerSpec(t.name, t.adapter.a_dim, t.adapter.g_dim, bool(t.adapter.a_diagonal))
            for t in track_layers(model, skip_layers).layers]
