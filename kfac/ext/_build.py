"""Building and loading the optional C++/CUDA extension (``csrc/``) that registers ``torch.ops.kfac_ext``.

The extension is JIT-compiled with :func:`torch.utils.cpp_extension.load` (ninja + the system C++ compiler, nvcc for
the CUDA kernels) into ``$TORCH_EXTENSIONS_DIR/<tag>`` (default ``~/.cache/torch_extensions/<tag>``), where the tag
names the Python, torch and CUDA versions, so that environments never share a binary. A successful build leaves a
stamp (hash of sources and flags) next to the library; a later process loads that library directly, without
invoking any compiler, when the stamp still matches (:func:`load_prebuilt`). Compilation happens only in
:func:`build`, i.e. on an explicit request (``kfac.ext.load()``, ``kfac.ext.enable()``, ``python -m kfac.ext build``
or ``KFAC_BUILD_EXT=1``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["BuildConfig", "build", "load_prebuilt", "source_dir"]

logger = logging.getLogger("kfac")

NAME = "kfac_ext"  # shared library name and torch.ops namespace (TORCH_LIBRARY(kfac_ext, ...) in csrc/ops.cpp)
CPU_SOURCES = ("ops.cpp", "cpu_kernels.cpp")
CUDA_SOURCES = ("cuda_kernels.cu",)
HEADERS = ("kfac_ext.h",)
DEFAULT_CUDA_ARCHS = ("8.0", "9.0")  # A100, H100; plus whatever GPUs are visible at build time


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
    return (root if root is not None else build_root()) / config.tag


def _library(directory: Path) -> Path:
    return directory / f"{NAME}.so"


def _stamp(directory: Path) -> Path:
    return directory / f"{NAME}.stamp.json"


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
