"""Building and loading the optional C++/CUDA extension (``csrc/``) that registers ``torch.ops.kfac_ext``.

The extension is JIT-compiled with :func:`torch.utils.cpp_extension.load` (ninja + the system C++ compiler, nvcc for
the CUDA kernels) into ``$TORCH_EXTENSIONS_DIR/<tag>`` (default ``~/.cache/torch_extensions/<tag>``), where the tag
names the Python, torch and CUDA versions, so that environments never share a binary. A successful build leaves a
stamp (hash of sources and flags) next to the library; a later process loads that library directly, without
invoking any compiler, when the stamp still matches (:func:`load_prebuilt`). Compilation happens only in
:func:`build`, i.e. on an explicit request (:func:`load`, :func:`enable`, ``python -m kfac.ext build`` or
``KFAC_BUILD_EXT=1``).

The process-wide load state (library, last error, CUDA kernels) lives here; :func:`loaded_ops` is what the dispatch
in :mod:`kfac.ext.ops` asks for the compiled op namespace.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "BuildConfig", "build", "build_dir", "build_root", "disabled", "enable", "has_cuda_kernels", "last_error",
    "library_path", "load", "load_prebuilt", "loaded_ops", "source_dir",
]

logger = logging.getLogger("kfac")

NAME = "kfac_ext"  # shared library name and torch.ops namespace (TORCH_LIBRARY(kfac_ext, ...) in csrc/ops.cpp)
CPU_SOURCES = ("ops.cpp", "cpu_kernels.cpp")
CUDA_SOURCES = ("cuda_kernels.cu",)
HEADERS = ("kfac_ext.h",)
DEFAULT_CUDA_ARCHS = ("8.0", "9.0")  # A100, H100; plus whatever GPUs are visible at build time


# ---- build configuration and cache layout ---------------------------------------------------------------------------

def source_dir() -> Path | None:
    """Where the C++/CUDA sources are: ``kfac/ext/csrc`` in an installed wheel, ``<repo>/csrc`` in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parents[1] / "csrc"):
        if all((candidate / f).is_file() for f in CPU_SOURCES + HEADERS):
            return candidate
    return None


def _cuda_archs() -> str:
    """``TORCH_CUDA_ARCH_LIST`` if set, else sm_80, sm_90 and the visible GPUs (PTX for the newest)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    archs = set(DEFAULT_CUDA_ARCHS)
    if torch.cuda.is_available():
        archs |= {"{}.{}".format(*torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())}
    ordered = sorted(archs, key=lambda a: tuple(int(p) for p in a.split(".")))
    return ";".join(ordered[:-1] + [ordered[-1] + "+PTX"])


@dataclass(frozen=True)
class BuildConfig:
    """What to compile: CPU kernels always, CUDA kernels when ``cuda`` (default: CUDA is usable here)."""

    cuda: bool = False
    cflags: tuple[str, ...] = ("-O3", "-fopenmp")
    ldflags: tuple[str, ...] = ("-fopenmp",)
    cuda_archs: str = ""

    @classmethod
    def default(cls, *, cuda: bool | None = None) -> BuildConfig:
        if cuda is None:
            cuda = torch.cuda.is_available() and torch.version.cuda is not None
        return cls(cuda=cuda, cuda_archs=_cuda_archs() if cuda else "")

    @property
    def tag(self) -> str:
        """Build folder name: one per (Python, torch, CPU-only or CUDA) combination."""
        py = f"py{sys.version_info.major}{sys.version_info.minor}"
        version = torch.__version__.split("+")[0].replace(".", "_")
        device = f"cu{torch.version.cuda.replace('.', '')}" if self.cuda and torch.version.cuda else "cpu"
        return f"{NAME}_{py}_torch{version}_{device}"

    def sources(self, root: Path) -> list[Path]:
        return [root / f for f in CPU_SOURCES + (CUDA_SOURCES if self.cuda else ())]

    def digest(self, root: Path) -> str:
        """Hash of every source and header, the flags and the torch version: equal digests, same binary."""
        h = hashlib.sha256()
        for f in sorted(CPU_SOURCES + CUDA_SOURCES + HEADERS):
            path = root / f
            h.update(f.encode() + b"\0" + (path.read_bytes() if path.is_file() else b""))
        h.update(json.dumps([torch.__version__, self.cuda, self.cflags, self.ldflags, self.cuda_archs]).encode())
        return h.hexdigest()


def build_root() -> Path:
    """``$TORCH_EXTENSIONS_DIR``, else ``$XDG_CACHE_HOME/torch_extensions`` (``~/.cache/torch_extensions``)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "torch_extensions"


def build_dir(config: BuildConfig, root: Path | None = None) -> Path:
    """The build folder of ``config`` under ``root`` (default :func:`build_root`)."""
    return (root if root is not None else build_root()) / config.tag


def _library(directory: Path) -> Path:
    return directory / f"{NAME}.so"


def _stamp(directory: Path) -> Path:
    return directory / f"{NAME}.stamp.json"


# ---- compiling and loading the library ------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_cpp_extension() -> Iterator[None]:
    """Silence torch's import-time notices from ``torch.utils.cpp_extension`` (e.g. "No CUDA runtime is found")."""
    torch_logger = logging.getLogger("torch.utils.cpp_extension")
    level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        torch_logger.setLevel(level)


def _already_registered() -> bool:
    try:
        return torch.ops.kfac_ext.build_info is not None  # the lookup raises unless the library is registered
    except (AttributeError, RuntimeError):
        return False


def load_prebuilt(config: BuildConfig, *, root: Path | None = None) -> Path | None:
    """Load the library of an earlier :func:`build` if its stamp matches the current sources; never compiles.
    Returns the library path, or ``None`` when there is nothing (current) to load."""
    src = source_dir()
    directory = build_dir(config, root)
    lib, stamp = _library(directory), _stamp(directory)
    if src is None or not lib.is_file() or not stamp.is_file():
        return None
    try:
        if json.loads(stamp.read_text()).get("digest") != config.digest(src):
            return None
    except (OSError, ValueError):
        return None
    if not _already_registered():
        torch.ops.load_library(str(lib))
    return lib


def build(config: BuildConfig, *, root: Path | None = None, verbose: bool = False) -> Path:
    """Compile (or bring up to date) and load the extension; raises on any failure. Returns the library path."""
    src = source_dir()
    if src is None:
        raise FileNotFoundError("the C++ sources (csrc/) are not installed alongside kfac")
    if _already_registered():  # a process can register the kfac_ext namespace only once
        return _library(build_dir(config, root))
    directory = build_dir(config, root)
    directory.mkdir(parents=True, exist_ok=True)
    defines = ["-DKFAC_WITH_CUDA"] if config.cuda else []
    env_archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if config.cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = config.cuda_archs
    try:
        with _quiet_cpp_extension():
            from torch.utils import cpp_extension

            path = cpp_extension.load(
                name=NAME, sources=[str(p) for p in config.sources(src)],
                extra_cflags=list(config.cflags) + defines, extra_cuda_cflags=["-O3"] + defines,
                extra_ldflags=list(config.ldflags), build_directory=str(directory), verbose=verbose,
                with_cuda=config.cuda, is_python_module=False)
    finally:
        if config.cuda:
            if env_archs is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = env_archs
    lib = Path(path) if isinstance(path, str) else _library(directory)
    stamp = _stamp(directory)
    tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}.tmp")  # atomic: ranks may build concurrently
    tmp.write_text(json.dumps({"digest": config.digest(src), "torch": torch.__version__, "cuda": config.cuda,
                               "cuda_archs": config.cuda_archs}))
    os.replace(tmp, stamp)
    return lib


# ---- process-wide load state ----------------------------------------------------------------------------------------

class _State:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.attempted = False  # automatic load (prebuilt library, or KFAC_BUILD_EXT) tried in this process
        self.library: str | None = None
        self.error: str | None = None
        self.cuda = False


_state = _State()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def disabled() -> bool:
    """Whether ``KFAC_DISABLE_EXT`` forces the PyTorch path (read on every call)."""
    return _env_flag("KFAC_DISABLE_EXT")


def library_path() -> str | None:
    """The loaded library's path, or ``None`` while the extension is not loaded."""
    return _state.library


def last_error() -> str | None:
    """One-line summary of the last failed build or load in this process, if any."""
    return _state.error


def has_cuda_kernels() -> bool:
    """Whether the loaded library includes the CUDA kernels."""
    return _state.cuda


def _summarise(exc: BaseException) -> str:
    """One line for the log: the exception's first line; for a failed compilation, the first compiler diagnostic
    (an "error" line, else the first line that is not a build command)."""
    lines = [line.strip() for line in (str(exc) or type(exc).__name__).splitlines() if line.strip()]
    head = lines[0]
    if not head.startswith("Error building extension"):
        return head[:300]
    head = head.split(": [", 1)[0]
    output = [line for line in lines[1:] if not line.startswith(("[", "FAILED:", "ninja:")) and " -c " not in line]
    detail = next((line for line in output if "error" in line.lower()), output[0] if output else None)
    return f"{head}: {detail[:240]}" if detail else head


def _registered(path: Any) -> None:
    _state.library = str(path)
    _state.error = None
    _state.cuda = "cuda=yes" in torch.ops.kfac_ext.build_info()


def load(*, cuda: bool | None = None, verbose: bool = False, cache_dir: str | os.PathLike[str] | None = None,
         raise_errors: bool = False) -> bool:
    """Compile (if needed) and load the extension; ``True`` once it is loaded. A failed build is logged once and
    not retried in this process (unless ``raise_errors``).

    Args:
        cuda: include the CUDA kernels (default: whether CUDA is usable here).
        verbose: show the compiler commands and output.
        cache_dir: where build folders live (default ``$TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions``).
        raise_errors: raise on failure instead of logging it and keeping the PyTorch fallback.
    """
    with _state.lock:
        if _state.library is not None:
            return True
        if _state.error is not None and not raise_errors:
            return False
        if disabled():
            if raise_errors:
                raise RuntimeError("kfac.ext: the extension is disabled by KFAC_DISABLE_EXT")
            logger.info("kfac: C++ extension disabled by KFAC_DISABLE_EXT; using the PyTorch fallback")
            return False
        _state.attempted = True
        root = None if cache_dir is None else Path(cache_dir)
        try:
            _registered(build(BuildConfig.default(cuda=cuda), verbose=verbose, root=root))
            return True
        except Exception as exc:  # any build/load failure means: use the fallback
            _state.error = _summarise(exc)
            if raise_errors:
                raise
            logger.warning("kfac: C++ extension unavailable, using the PyTorch fallback: %s "
                           "(details: python -m kfac.ext build --verbose)", _state.error)
            return False


def enable(**kwargs: Any) -> bool:
    """Opt in to the extension: :func:`load` (same arguments); ``True`` once it is loaded."""
    return load(**kwargs)


def loaded_ops() -> Any | None:
    """``torch.ops.kfac_ext`` when the extension is loaded (loading a current prebuilt library, or building when
    ``KFAC_BUILD_EXT=1``, on the first call), else ``None``. Honours ``KFAC_DISABLE_EXT`` on every call."""
    if disabled():
        return None
    if _state.library is None and not _state.attempted:
        with _state.lock:
            if not _state.attempted:
                if _env_flag("KFAC_BUILD_EXT"):
                    load()
                else:
                    _state.attempted = True
                    try:
                        path = load_prebuilt(BuildConfig.default())
                        if path is not None:
                            _registered(path)
                    except Exception as exc:  # noqa: BLE001 - a broken cache entry must not break training
                        _state.error = _summarise(exc)
                        logger.warning("kfac: could not load the prebuilt C++ extension, using the PyTorch "
                                       "fallback: %s", _state.error)
    return torch.ops.kfac_ext if _state.library is not None else None
