"""The factor store: the single home of curvature state, keyed by module name.

Each :class:`FactorEntry` holds the running Kronecker factors ``A`` (input side, ``a_dim x a_dim``, or a vector
when diagonal) and ``G`` (output-gradient side, ``g_dim x g_dim``), the decompositions computed from them
(eigen: ``QA, dA, QG, dG``; inverse: ``A_inv, G_inv``), free-form ``extras`` for other curvature methods
(EK-FAC corrections, M-FAC windows, ...) and the rank that owns the entry in distributed runs.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["FactorEntry", "FactorStore", "FactorFileError"]

TENSOR_FIELDS = ("A", "G", "QA", "dA", "QG", "dG", "A_inv", "G_inv")
_FORMAT = "kfac.FactorStore"
_VERSION = 1


class FactorFileError(ValueError):
    """A factor file is missing, corrupt, or does not match what it is being loaded into."""


@dataclass
class FactorEntry:
    """Curvature state of one layer."""

    name: str
    a_dim: int
    g_dim: int
    a_diagonal: bool = False
    A: Tensor | None = None
    G: Tensor | None = None
    QA: Tensor | None = None
    dA: Tensor | None = None
    QG: Tensor | None = None
    dG: Tensor | None = None
    A_inv: Tensor | None = None
    G_inv: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)
    owner: int | None = None
    num_updates: int = 0
    """How many batches of statistics the running factors have absorbed."""
    gradient_power: tuple[int, int] = field(default=(0, 2), compare=False)
    """Powers of the loss-gradient scale in ``(A, G)`` (they add up to 2): ``(0, 2)`` for the usual layers,
    ``(2, 0)`` where ``A`` is built from per-example gradients (normalisation layers), ``(1, 1)`` for tied
    weights. A rank's statistics of a local-batch mean loss carry ``world`` to these powers."""
    gradient_sum: bool = field(default=False, compare=False)
    """Curvature units (``units="curvature"``): the factor built from gradients (the one with the larger
    :attr:`gradient_power`, ``G`` for most layers) is the *sum* over the batch's rows instead of their mean, so
    ``A ⊗ G`` approximates the curvature block of the loss whose gradients were collected (see
    :mod:`kfac.modules.base`)."""
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """Derived, never persisted data (e.g. the block structure of a decomposition), keyed by field name."""

    def shape_of(self, field: str) -> tuple[int, ...] | None:
        """The shape of a factor (``"A"``, ``"G"``) or decomposition field (``None`` for extras): the one place
        the layout is encoded (a diagonal ``A`` and its inverse are vectors)."""
        a, g = self.a_dim, self.g_dim
        return {
            "A": (a,) if self.a_diagonal else (a, a), "G": (g, g),
            "QA": (a, a), "dA": (a,), "QG": (g, g), "dG": (g,),
            "A_inv": (a,) if self.a_diagonal else (a, a), "G_inv": (g, g),
        }.get(field)

    def tensors(self) -> dict[str, Tensor]:
        out = {k: getattr(self, k) for k in TENSOR_FIELDS if getattr(self, k) is not None}
        out.update({f"extras.{k}": v for k, v in self.extras.items()})
        return out

    def meta(self) -> dict[str, Any]:
        return {"a_dim": self.a_dim, "g_dim": self.g_dim, "a_diagonal": self.a_diagonal,
                "owner": self.owner, "num_updates": self.num_updates}

    def clear_decompositions(self) -> None:
        self.QA = self.dA = self.QG = self.dG = self.A_inv = self.G_inv = None
        self.cache.clear()  # derived from the decompositions; holding it would keep them alive

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device: torch.device | str) -> None:
        """Move every tensor of this entry to ``device`` (in place)."""
        for k in TENSOR_FIELDS:
            t = getattr(self, k)
            if t is not None:
                setattr(self, k, t.to(device))
        self.extras = {k: v.to(device) for k, v in self.extras.items()}
        self.cache.clear()


class FactorStore(Mapping[str, FactorEntry]):
    """Mapping ``module name -> FactorEntry`` with ``state_dict`` and safetensors persistence."""

    def __init__(self) -> None:
        self._entries: dict[str, FactorEntry] = {}

    # -- mapping -------------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> FactorEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"no factors for module {name!r}; tracked: {list(self._entries)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"FactorStore({len(self)} entries, {self.nbytes() / 2**20:.1f} MiB)"

    def add(self, name: str, *, a_dim: int, g_dim: int, a_diagonal: bool = False,
            gradient_power: tuple[int, int] = (0, 2), gradient_sum: bool = False) -> FactorEntry:
        if name in self._entries:
            raise KeyError(f"module {name!r} is already in the store")
        entry = FactorEntry(name=name, a_dim=a_dim, g_dim=g_dim, a_diagonal=a_diagonal,
                            gradient_power=gradient_power, gradient_sum=gradient_sum)
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> None:
        del self._entries[name]

    def nbytes(self) -> int:
        return sum(e.nbytes() for e in self._entries.values())

    # -- state dict ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"format": _FORMAT, "version": _VERSION,
                "entries": {n: {"meta": e.meta(), "tensors": dict(e.tensors())} for n, e in self._entries.items()}}

    def load_state_dict(self, state: Mapping[str, Any], *, strict: bool = True) -> None:
        """Load entries; with ``strict``, the set of names and every factor shape must match this store.

        Every tensor must be float32 or float64 and finite, and a layer's factors and decompositions must share
        one dtype; anything else raises :class:`FactorFileError` naming the layer and field.
        All-or-nothing: everything is validated before anything is assigned. Tensors are taken as given (not
        copied); the store never modifies its tensors in place, so a state dict stays a consistent snapshot.
        """
        if state.get("format") != _FORMAT:
            raise FactorFileError(f"not a FactorStore state dict (format={state.get('format')!r})")
        entries = state["entries"]
        if strict and self._entries and set(entries) != set(self._entries):
            missing, unexpected = set(self._entries) - set(entries), set(entries) - set(self._entries)
            raise FactorFileError(f"factor store layers differ: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        staged: list[FactorEntry] = []
        for name, data in entries.items():
            meta = data["meta"]
            new = FactorEntry(name=name, a_dim=int(meta["a_dim"]), g_dim=int(meta["g_dim"]),
                              a_diagonal=bool(meta["a_diagonal"]), owner=meta.get("owner"),
                              num_updates=int(meta.get("num_updates", 0)))
            if name in self._entries:
                entry = self._entries[name]
                mine = (entry.a_dim, entry.g_dim, entry.a_diagonal)
                theirs = (new.a_dim, new.g_dim, new.a_diagonal)
                if mine != theirs:
                    raise FactorFileError(f"layer {name!r}: saved factors (a_dim, g_dim, diagonal)={theirs} "
                                          f"do not match the model's {mine}")
            for key, tensor in data["tensors"].items():
                _check_tensor(new, key, tensor)
                if key.startswith("extras."):
                    new.extras[key[len("extras."):]] = tensor
                elif key in TENSOR_FIELDS:
                    setattr(new, key, tensor)
                else:
                    raise FactorFileError(f"layer {name!r}: unknown factor field {key!r}")
            _check_uniform_dtype(new)
            staged.append(new)
        for new in staged:
            if new.name in self._entries:
                entry = self._entries[new.name]
                for k in TENSOR_FIELDS:
                    setattr(entry, k, getattr(new, k))
                entry.extras, entry.owner, entry.num_updates = new.extras, new.owner, new.num_updates
            else:
                self._entries[new.name] = new

    # -- files ---------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write all entries to a safetensors file (atomically: an existing file is replaced only on success)."""
        from safetensors.torch import save_file

        tensors: dict[str, Tensor] = {}
        index: list[dict[str, Any]] = []
        for i, (name, entry) in enumerate(self._entries.items()):
            fields = []
            for key, t in entry.tensors().items():
                tensors[f"{i}/{key}"] = t.detach().to("cpu").contiguous().clone()
                fields.append(key)
            index.append({"name": name, "fields": fields, **entry.meta()})
        metadata = {"format": _FORMAT, "version": str(_VERSION), "index": json.dumps(index)}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.chmod(tmp, _default_file_mode(path))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: torch.device | str | None = None) -> "FactorStore":
        """Read a file written by :meth:`save`; corrupt or foreign files raise :class:`FactorFileError`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FactorFileError(f"{path}: no such factor file")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                if metadata.get("format") != _FORMAT:
                    raise FactorFileError(f"{path}: not a kfac factor file (format={metadata.get('format')!r})")
                index = json.loads(metadata["index"])
                entries = {}
                for i, item in enumerate(index):
                    tensors = {k: f.get_tensor(f"{i}/{k}") for k in item["fields"]}
                    if device is not None:
                        tensors = {k: v.to(device) for k, v in tensors.items()}
                    meta = {k: item[k] for k in ("a_dim", "g_dim", "a_diagonal", "owner", "num_updates")}
                    entries[item["name"]] = {"meta": meta, "tensors": tensors}
        except FactorFileError:
            raise
        except Exception as exc:  # safetensors raises several error types for truncated/corrupt files
            raise FactorFileError(f"{path}: corrupt or unreadable factor file ({exc})") from exc
        store = cls()
        try:
            store.load_state_dict({"format": _FORMAT, "version": _VERSION, "entries": entries})
        except FactorFileError as exc:
            raise FactorFileError(f"{path}: {exc}") from exc
        return store


_ALLOWED_DTYPES = (torch.float32, torch.float64)


def _check_tensor(entry: FactorEntry, key: str, t: Any) -> None:
    """Reject anything that would load fine but break (or silently corrupt) training later: non-tensors,
    non-float or sub-single-precision dtypes, shapes inconsistent with the entry, NaN/Inf values."""
    if not isinstance(t, Tensor):
        raise FactorFileError(f"layer {entry.name!r}: field {key} is a {type(t).__name__}, not a tensor")
    if t.dtype not in _ALLOWED_DTYPES:
        raise FactorFileError(f"layer {entry.name!r}: field {key} has dtype {t.dtype}; "
                              "factors and decompositions must be float32 or float64")
    _check_shape(entry, key, t)
    if not bool(torch.isfinite(t).all()):
        n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        raise FactorFileError(f"layer {entry.name!r}: field {key} has non-finite values "
                              f"({n_nan} NaN, {n_inf} Inf of {t.numel()})")


def _check_uniform_dtype(entry: FactorEntry) -> None:
    """The factors and decompositions of one layer are combined in one computation: they must share a dtype.
    (``extras`` are free-form per curvature method and may differ, e.g. a float32 window next to float64 factors.)
    """
    dtypes = {k: getattr(entry, k).dtype for k in TENSOR_FIELDS if getattr(entry, k) is not None}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{k}: {str(d).removeprefix('torch.')}" for k, d in dtypes.items())
        raise FactorFileError(f"layer {entry.name!r}: factors and decompositions mix dtypes ({listing}); "
                              "all fields of a layer must share one dtype")


def _check_shape(entry: FactorEntry, key: str, t: Tensor) -> None:
    expected = entry.shape_of(key)
    if expected is not None and tuple(t.shape) != expected:
        raise FactorFileError(f"layer {entry.name!r}: field {key} has shape {tuple(t.shape)}, expected {expected}")


def _default_file_mode(path: Path) -> int:
    """Keep an existing file's permissions; new files get ``0o666 & ~umask`` like ``open()`` would."""
    if path.exists():
        return path.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
