"""A training-gradient index: per-example training gradients computed once and stored compactly on disk, so that
many queries are answered by matrix products instead of one pass over the training data each.

Representation. Per tracked layer, example ``n``'s gradient ``V_n = sum_t g_nt a_nt^T`` (``g_dim x a_dim``, see
:mod:`kfac.influence.gradients`) is kept through a seeded Kronecker random projection: its rows ``P_G g_nt`` and
``P_A a_nt`` (``k_g``, ``k_a``). ``P`` has i.i.d. ``N(0, 1/k)`` entries, so ``E[P^T P] = I`` and the score of a
preconditioned query ``Q = (C + λI)^-1 grad f(q)``, ``<Q, V_n>``, is estimated without bias by
``<P_G Q P_A^T, sum_t (P_G g_nt)(P_A a_nt)^T>`` (Johnson-Lindenstrauss; the LoGra / LogIX construction). A side with
``k >= dim`` is not projected (``P = I``): with ``k`` at least both dimensions the index is exact. Each layer is
stored in the smaller of two layouts, chosen at the first ``add`` from the rows per example ``T``: the rows
themselves (``T (k_g + k_a)`` numbers; an MLP's ``T = 1`` makes this exact *and* small: ``g_dim + a_dim`` instead
of ``g_dim a_dim``), or their product ``sum_t (P_G g_nt)(P_A a_nt)^T`` (``k_g k_a``, whatever ``T``). One index
serves every fit of the same weights (identity, K-FAC, EK-FAC, M-FAC: only the query is preconditioned), and
scoring is a few matrix products per shard. The projection's variance is the price of compression: measure it
(``benchmarks/cpu/influence_index.py``) before relying on a small ``k``.

Storage. A directory with ``manifest.json`` (format, layers and their projection sizes, seed, dtype, the
:func:`kfac.influence.weights_digest` of the model, the shards) and shards ``shard-XXXXX.safetensors``, each with
``grads`` (``n x D``: the layers' projections flattened and concatenated in manifest order) and ``positions``
(``n``: each row's position in the training set, counted over every ``add``). Shards are read memory-mapped; a
query streams them and keeps a running top-k, never the whole score matrix. ``add`` appends shards (incremental);
under ``torchrun`` each rank writes the shards of its batches and rank 0 the manifest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..distributed.comm import Communicator
from .passes import DataPasses
from .scoring import TopK

__all__ = ["GradientIndex", "IndexLayer", "MANIFEST", "Projections", "add_examples", "project_queries", "project_rows"]

MANIFEST = "manifest.json"
FORMAT = "kfac.influence.index"
_PRODUCT_BUDGET = 1 << 24
"""Most numbers in one chunk's intermediate ``Q P_A a_t`` products (rows layout): bounds scoring memory."""
_DTYPES = {"float32": (torch.float32, np.float32, "F32"), "float16": (torch.float16, np.float16, "F16")}


@dataclass(frozen=True)
class IndexLayer:
    """One tracked layer of an index: its gradient shape, projection sizes (``k >= dim``: not projected) and layout
    (``rows``: ``T``, the rows kept per example; ``0``: their product; ``None``: not chosen yet)."""

    name: str
    g_dim: int
    a_dim: int
    k_g: int
    k_a: int
    rows: int | None = None

    @property
    def kg(self) -> int:
        return min(self.k_g, self.g_dim)

    @property
    def ka(self) -> int:
        return min(self.k_a, self.a_dim)

    @property
    def width(self) -> int:
        """Numbers stored per example."""
        if self.rows is None:
            raise RuntimeError(f"index layer {self.name!r}: layout not chosen before the first add")
        return self.rows * (self.kg + self.ka) if self.rows else self.kg * self.ka

    def choose(self, rows: int) -> IndexLayer:
        """This layer with the smaller layout for ``rows`` rows per example."""
        return dataclasses.replace(self, rows=rows if rows * (self.kg + self.ka) < self.kg * self.ka else 0)

    def encode(self, g: Tensor, a: Tensor) -> Tensor:
        """``n x width``: projected rows ``g`` (``n x T x kg``) and ``a`` (``n x T x ka``) in this layout."""
        if not self.rows:
            return (g.transpose(1, 2) @ a).flatten(1)
        if g.shape[1] > self.rows:
            raise ValueError(f"index layer {self.name!r} keeps {self.rows} rows per example (chosen at the first add), "
                             f"got {g.shape[1]}: build the index from the longest examples first")
        pad = self.rows - g.shape[1]
        return torch.cat([F.pad(g, (0, 0, 0, pad)), F.pad(a, (0, 0, 0, pad))], dim=2).flatten(1)

    def scores(self, queries: Tensor, stored: Tensor) -> Tensor:
        """``nq x n``: ``<P_G Q P_A^T, stored example>`` for projected queries ``nq x kg x ka`` and this layer's
        ``n x width`` slice of a shard."""
        if not self.rows:
            return queries.flatten(1) @ stored.T
        rows = stored.reshape(stored.shape[0], self.rows, self.kg + self.ka)
        g, a = rows[..., :self.kg], rows[..., self.kg:]
        qa = torch.einsum("qga,nta->qntg", queries, a)  # Q P_A a_t for every row
        return (qa * g.unsqueeze(0)).sum((2, 3))


def _projection(k: int, dim: int, seed: int, salt: int) -> Tensor | None:
    """``k x dim`` with ``N(0, 1/k)`` entries from a generator seeded by ``(seed, salt)`` (CPU: the same on every
    machine), or ``None`` (identity) when ``k >= dim``."""
    if k >= dim:
        return None
    g = torch.Generator().manual_seed(seed * 1_000_003 + salt)
    return torch.randn(k, dim, generator=g, dtype=torch.float64) / k ** 0.5


class Projections:
    """The ``(P_G, P_A)`` pair of every layer of an index, cast to a device and dtype on demand."""

    def __init__(self, layers: list[IndexLayer], seed: int) -> None:
        self.layers = layers
        self.mats = {layer.name: (_projection(layer.k_g, layer.g_dim, seed, 2 * i),
                                  _projection(layer.k_a, layer.a_dim, seed, 2 * i + 1))
                     for i, layer in enumerate(layers)}

    def pair(self, name: str, like: Tensor) -> tuple[Tensor | None, Tensor | None]:
        pg, pa = self.mats[name]
        return (None if pg is None else pg.to(like.device, like.dtype),
                None if pa is None else pa.to(like.device, like.dtype))


def project_rows(rows: Mapping[str, tuple[Tensor, Tensor]], proj: Projections, dtype: torch.dtype,
                 ) -> dict[str, tuple[Tensor, Tensor]]:
    """``{layer: (P_G g, P_A a)}``: the projected rows (``n x T x kg``, ``n x T x ka``) of one batch."""
    out = {}
    for layer in proj.layers:
        a, g = (t.to(dtype) for t in rows[layer.name])
        pg, pa = proj.pair(layer.name, a)
        out[layer.name] = (g if pg is None else g @ pg.T, a if pa is None else a @ pa.T)
    return out


def project_queries(queries: Mapping[str, Any], proj: Projections, dtype: torch.dtype) -> dict[str, Tensor]:
    """``{layer: P_G Q P_A^T}`` (``nq x kg x ka``) of preconditioned queries (full ``(nq, g, a)`` or low rank
    ``(US, V)``)."""
    out = {}
    for layer in proj.layers:
        q = queries[layer.name]
        if isinstance(q, tuple):  # Q = US V^T
            us, v = (t.to(dtype) for t in q)
            pg, pa = proj.pair(layer.name, us)
            us = us if pg is None else pg @ us
            v = v if pa is None else pa @ v
            out[layer.name] = us @ v.mT
        else:
            q = q.to(dtype)
            pg, pa = proj.pair(layer.name, q)
            q = q if pg is None else pg @ q
            out[layer.name] = q if pa is None else q @ pa.T
    return out


class GradientIndex:
    """An on-disk index of projected per-example training gradients (see the module docstring). Build one with
    :meth:`kfac.influence.InfluenceAnalyzer.build_index`, open one with :meth:`open`; query it by passing it to the
    analyzer's ``top_k`` / ``pairwise_scores`` in place of the training loader."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.layers = [IndexLayer(**layer) for layer in manifest["layers"]]
        self.seed = int(manifest["seed"])
        self.dtype = _DTYPES[manifest["dtype"]][0]
        self.projections = Projections(self.layers, self.seed)

    # -- construction --------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, *, shapes: Mapping[str, tuple[int, int]], dims: int | Mapping[str, Any],
               seed: int, dtype: torch.dtype, weights_sha256: str, task: str, write: bool = True,
               fresh: bool | None = None) -> GradientIndex:
        """A new, empty index for layers ``{name: (g_dim, a_dim)}``. ``dims``: ``k`` for both sides of every layer
        (an int), or ``{layer: k or (k_g, k_a)}``; ``write``: write the manifest (rank 0); ``fresh``: whether
        ``path`` holds no index yet, as every rank agreed (default: looked up here)."""
        path = Path(path)
        if not (fresh if fresh is not None else not (path / MANIFEST).exists()):
            raise FileExistsError(f"influence: {path} already holds a gradient index; open it with "
                                  "GradientIndex.open() to add to it")
        name = {v[0]: k for k, v in _DTYPES.items()}.get(dtype)
        if name is None:
            raise ValueError(f"index dtype must be torch.float32 or torch.float16, got {dtype}")
        layers = []
        for layer, (g_dim, a_dim) in shapes.items():
            k = dims if isinstance(dims, int) else dims.get(layer)
            if k is None:
                raise ValueError(f"index dims: no projection size for layer {layer!r}")
            k_g, k_a = (k, k) if isinstance(k, int) else tuple(k)
            if min(k_g, k_a) < 1:
                raise ValueError(f"index dims must be positive, got {k!r} for {layer!r}")
            layers.append({"name": layer, "g_dim": int(g_dim), "a_dim": int(a_dim), "k_g": int(k_g), "k_a": int(k_a)})
        manifest = {"format": FORMAT, "version": 1, "layers": layers, "seed": int(seed), "dtype": name,
                    "weights_sha256": weights_sha256, "task": task, "shards": [], "examples": 0}
        index = cls(path, manifest)
        if write:
            path.mkdir(parents=True, exist_ok=True)
            index._write_manifest()
        return index

    @classmethod
    def open(cls, path: str | Path) -> GradientIndex:
        """The index in directory ``path`` (clear errors for a missing or foreign manifest)."""
        path = Path(path)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"influence: no gradient index in {path} (no {MANIFEST})") from None
        if manifest.get("format") != FORMAT or manifest.get("version") != 1:
            raise ValueError(f"influence: {path / MANIFEST} is not a version-1 kfac gradient index")
        return cls(path, manifest)

    def _write_manifest(self) -> None:
        tmp = self.path / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.manifest, indent=1))
        os.replace(tmp, self.path / MANIFEST)  # atomic: a reader sees the old or the new manifest

    # -- contents ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.manifest["examples"])

    @property
    def width(self) -> int:
        """``D``: stored numbers per example."""
        return sum(layer.width for layer in self.layers)

    @property
    def bytes_per_example(self) -> int:
        """Stored bytes per example (its numbers and its position)."""
        return self.width * self.dtype.itemsize + 8  # + its int64 position

    def write_shard(self, name: str, grads: Tensor, positions: Tensor) -> dict[str, Any]:
        """Write one shard file (``grads`` ``n x D`` in the index dtype, ``positions`` ``n``); its manifest entry."""
        from safetensors.torch import save_file

        if grads.shape[1] != self.width:
            raise ValueError(f"index shard of width {grads.shape[1]}, expected {self.width}")
        self.path.mkdir(parents=True, exist_ok=True)
        save_file({"grads": grads.to("cpu", self.dtype).contiguous(), "positions": positions.to("cpu", torch.int64)},
                  str(self.path / name))
        return {"file": name, "count": int(grads.shape[0])}

    def choose_layouts(self, rows: Mapping[str, int]) -> None:
        """Each layer's layout for at most ``rows[layer]`` rows per example (see :meth:`IndexLayer.choose`)."""
        self.layers = [layer.choose(max(1, rows[layer.name])) for layer in self.layers]
        self.manifest["layers"] = [dataclasses.asdict(layer) for layer in self.layers]

    def commit(self, shards: list[dict[str, Any]], examples: int, *, write: bool = True) -> None:
        """Record new shards and the new example count in the manifest (``write``: on disk too; rank 0)."""
        self.manifest["shards"] = self.manifest["shards"] + shards
        self.manifest["examples"] = len(self) + examples
        if write:
            self._write_manifest()

    def shards(self) -> Iterator[tuple[Tensor, Tensor]]:
        """``(grads, positions)`` of every shard, memory-mapped (read-only views; nothing is loaded whole)."""
        for entry in self.manifest["shards"]:
            yield _mapped(self.path / entry["file"], "grads"), _mapped(self.path / entry["file"], "positions")

    # -- queries -------------------------------------------------------------------------------------------
    def scores(self, queries: Mapping[str, Tensor], *, chunk: int = 8192) -> Tensor:
        """``nq x len(self)``: projected queries (from :func:`project_queries`) against every example, in
        training-set order."""
        nq, dtype = _query_shape(queries)
        out = torch.zeros(nq, len(self), dtype=dtype)
        for positions, part in self._products(queries, chunk):
            out[:, positions] = part
        return out

    def top_k(self, queries: Mapping[str, Tensor], k: int, *, chunk: int = 8192) -> TopK:
        """The ``k`` highest scores per query, streamed over the shards (a running top-k: memory ``nq x (k +
        chunk)``)."""
        nq, dtype = _query_shape(queries)
        k = min(k, len(self))
        best = torch.full((nq, 0), -torch.inf, dtype=dtype)
        where = torch.zeros((nq, 0), dtype=torch.int64)
        for positions, part in self._products(queries, chunk):
            best = torch.cat([best, part], dim=1)
            where = torch.cat([where, positions.expand(nq, -1)], dim=1)
            best, pick = torch.topk(best, min(k, best.shape[1]), dim=1)
            where = torch.gather(where, 1, pick)
        return TopK(indices=where, scores=best)

    def _products(self, queries: Mapping[str, Tensor], chunk: int) -> Iterable[tuple[Tensor, Tensor]]:
        """``(positions, nq x c scores)`` for chunks of ``chunk`` stored examples."""
        if any(layer.rows is None for layer in self.layers):
            return  # nothing added yet
        slices, start = [], 0
        for layer in self.layers:
            slices.append((layer, start, start + layer.width))
            start += layer.width
        nq = _query_shape(queries)[0]
        widest = max((layer.rows or 0) * layer.kg for layer in self.layers)  # the rows layout's nq x c x T x kg products
        chunk = max(1, min(chunk, _PRODUCT_BUDGET // max(1, nq * widest)))
        for grads, positions in self.shards():
            for first in range(0, grads.shape[0], chunk):
                rows = grads[first:first + chunk]
                part = sum(layer.scores(queries[layer.name], rows[:, lo:hi].to(queries[layer.name].dtype))
                           for layer, lo, hi in slices)
                yield positions[first:first + chunk], part  # type: ignore[misc]


def _query_shape(queries: Mapping[str, Tensor]) -> tuple[int, torch.dtype]:
    first = next(iter(queries.values()))
    return first.shape[0], first.dtype


def _mapped(path: Path, key: str) -> Tensor:
    """Tensor ``key`` of a safetensors file as a read-only memory map (the format: an 8-byte little-endian header
    size, a JSON header with each tensor's dtype, shape and byte offsets, then the data)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    info = header[key]
    np_dtype = {"F32": np.float32, "F16": np.float16, "I64": np.int64}[info["dtype"]]
    start, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end == start:
        return torch.zeros(shape, dtype=torch.from_numpy(np.zeros(0, np_dtype)).dtype)
    array = np.memmap(path, dtype=np_dtype, mode="r", offset=8 + size + start, shape=shape)
    with warnings.catch_warnings():  # a read-only map: torch warns that writes would fail (none are made)
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def add_examples(index: GradientIndex, passes: DataPasses, loader: Iterable[Any], comm: Communicator,
                 dtype: torch.dtype) -> None:
    """Project the per-example gradients of ``loader``'s batches into new shards of ``index`` (one per rank that
    had batches; this call's projected rows are held in memory until written: add a large corpus in parts) and
    record them in the manifest. Positions continue after the index's last example, in batch order. The first add
    chooses each layer's layout from the most rows per example any rank saw."""
    parts: list[tuple[int, dict[str, tuple[Tensor, Tensor]]]] = []
    for i, batch in passes.batches(loader, "indexing"):
        parts.append((i, project_rows(passes.rows(batch, sampled=False), index.projections, dtype)))
    local = ([(i, int(next(iter(x.values()))[0].shape[0])) for i, x in parts],
             {n: max((x[n][0].shape[1] for _, x in parts), default=0) for n in index.projections.mats})
    gathered = comm.all_gather_object(local) if comm.enabled else [local]
    counts = sorted(item for part, _ in gathered for item in part)
    if any(layer.rows is None for layer in index.layers):
        index.choose_layouts({n: max(t[n] for _, t in gathered) for n in index.projections.mats})
    offsets, total = {}, len(index)
    for i, count in counts:
        offsets[i] = total
        total += count
    entry = None
    if parts:
        grads = torch.cat([torch.cat([layer.encode(*x[layer.name]) for layer in index.layers], dim=1)
                           for _, x in parts])
        positions = torch.cat([torch.arange(offsets[i], offsets[i] + next(iter(x.values()))[0].shape[0])
                               for i, x in parts])
        entry = index.write_shard(f"shard-{len(index.manifest['shards']) + comm.rank:05d}.safetensors", grads,
                                  positions)
    entries = comm.all_gather_object(entry) if comm.enabled else [entry]
    index.commit([e for e in entries if e is not None], total - len(index), write=comm.rank == 0)
