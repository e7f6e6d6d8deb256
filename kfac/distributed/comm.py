"""Communication: the only module that calls ``torch.distributed``.

A :class:`Communicator` wraps a process group with the few collectives distributed K-FAC needs, each applied to a
*bucket* (many tensors flattened into one buffer, so a step issues one collective per source/destination rank,
not one per layer). Symmetric matrices travel as packed upper triangles (``d(d+1)/2`` numbers instead of ``d^2``),
optionally in a lower-precision communication dtype. Every call adds its share of the bytes on the wire to
``bytes_sent`` (by category) with the bandwidth-optimal volumes the planner predicts, so that the sum over ranks
is the traffic of the step: a ring all-reduce moves ``2 (N - 1)`` payloads, a reduce ``N - 1``, a broadcast one
per receiver (each rank counts ``1/N`` of a collective's volume; a broadcast is counted by its source).

K-FAC's collectives run on a private duplicate of the process group, so that reductions launched asynchronously
during the backward pass can never interleave with DDP's gradient all-reduces (whose launch order may differ
between ranks) on the same group. A communicator over a single process (or with ``torch.distributed`` not
initialised) performs no communication.

With a ``step_timeout``, :meth:`Communicator.fence` checks once per step, on a gloo side group that times out after
``step_timeout`` seconds, that every rank reached the same call at the same step: a rank that skips ``step()`` or
calls it an extra time gets every rank a clear error naming the step and the ranks, not a silent hang until the
process-group timeout.
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import json
import time
import weakref
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, overload

import torch
import torch.distributed as dist
from torch import Tensor

from .. import ext

__all__ = ["Communicator", "Communicating", "Pending", "pack_symmetric", "unpack_symmetric"]


class Pending:
    """An asynchronous collective in flight; :meth:`wait` blocks until it completes and returns its result."""

    def __init__(self, works: Sequence[Any], finish: Callable[[], Any]) -> None:
        self._works, self._finish = list(works), finish
        self._done, self._result = False, None

    def wait(self) -> Any:
        if not self._done:
            for w in self._works:
                w.wait()
            self._done, self._result = True, self._finish()
            self._works = []
        return self._result


class _Done(Pending):
    def __init__(self, result: Any) -> None:
        super().__init__((), lambda: result)


def pack_symmetric(m: Tensor) -> Tensor:
    """The upper triangle (diagonal included) of a symmetric ``d x d`` matrix, row-major, as a vector."""
    return ext.pack_symmetric_many([m])


def unpack_symmetric(v: Tensor, d: int) -> Tensor:
    """Inverse of :func:`pack_symmetric`."""
    return ext.unpack_symmetric_many(v, [d])[0]


class Communicator:
    """Bucketed collectives over ``group`` (the default process group when ``None``).

    Args:
        group: a ``torch.distributed`` process group, or ``None`` for the default one. Every member must build
            its communicator at the same point (the private duplicate is created collectively by the members).
            With a subgroup, ranks outside it create no K-FAC groups, and torch names new groups with a per-rank
            counter: create any world-wide groups you need before building K-FAC on a subgroup.
        comm_dtype: dtype for payloads on the wire (e.g. ``torch.bfloat16``); ``None`` keeps each tensor's dtype.
        step_timeout: seconds :meth:`fence` waits for the other ranks (a gloo side group, also beside NCCL);
            ``None``: no fence (no side group).
    """

    def __init__(self, *, group: Any | None = None, comm_dtype: torch.dtype | None = None,
                 step_timeout: float | None = None) -> None:
        if comm_dtype is not None and not (isinstance(comm_dtype, torch.dtype) and comm_dtype.is_floating_point):
            raise ValueError(f"comm_dtype must be a floating point torch.dtype (e.g. torch.bfloat16), got {comm_dtype!r}"
                             ": integer dtypes would truncate factors and decompositions on the wire")
        self.comm_dtype = comm_dtype
        self.enabled = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.enabled else 0
        self.world_size = dist.get_world_size(group) if self.enabled else 1
        self.enabled = self.enabled and self.world_size > 1
        self.bytes_sent: Counter[str] = Counter()  # float byte counts (fractions of collectives)
        self._parent = group
        self._ranks = ([dist.get_global_rank(group, r) for r in range(self.world_size)] if group is not None
                       else list(range(self.world_size)))
        self._timeout = _group_timeout(group) if self.enabled else None
        self.group = self._new_group(self._ranks) if self.enabled else group
        self.step_timeout = step_timeout
        self._side = (self._new_group(self._ranks, backend="gloo", timeout=datetime.timedelta(seconds=step_timeout))
                       if self.enabled and step_timeout is not None else None)
        if self.enabled:  # K-FAC's references must not keep process groups alive into interpreter shutdown
            atexit.register(_release_groups, weakref.ref(self))

    # -- buckets -------------------------------------------------------------------------------------------
    def _flatten(self, tensors: Sequence[Tensor], *, exact: bool = False, dtype: torch.dtype | None = None,
                 ) -> Tensor:
        if dtype is None:
            dtype = tensors[0].dtype if exact or self.comm_dtype is None else self.comm_dtype
        return torch.cat([t.reshape(-1).to(dtype) for t in tensors])

    @staticmethod
    def _unflatten(buffer: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
        out, offset = [], 0
        for t in like:
            n = t.numel()
            out.append(buffer[offset:offset + n].view(t.shape).to(t.dtype))
            offset += n
        return out

    def _count(self, category: str, buffer: Tensor, factor: float = 1.0, control: int = 0) -> None:
        """Account ``factor`` copies of ``buffer``, of which ``control`` elements (status flags) go to "control"."""
        size = buffer.element_size()
        # typeshed types Counter values as int; these byte counts are fractional by design (see __init__)
        self.bytes_sent[category] += (buffer.numel() - control) * size * factor  # type: ignore[assignment]
        if control:
            self.bytes_sent["control"] += control * size * factor  # type: ignore[assignment]

    # -- collectives ---------------------------------------------------------------------------------------
    @overload
    def all_reduce_sum(self, tensors: Sequence[Tensor], *, category: str, exact: bool = False,
                       async_op: Literal[False] = False, wire_dtype: torch.dtype | None = None) -> list[Tensor]: ...

    @overload
    def all_reduce_sum(self, tensors: Sequence[Tensor], *, category: str, exact: bool = False,
                       async_op: Literal[True], wire_dtype: torch.dtype | None = None) -> Pending: ...

    @overload
    def all_reduce_sum(self, tensors: Sequence[Tensor], *, category: str, exact: bool = False,
                       async_op: bool, wire_dtype: torch.dtype | None = None) -> list[Tensor] | Pending: ...

    def all_reduce_sum(self, tensors: Sequence[Tensor], *, category: str, exact: bool = False,
                       async_op: bool = False, wire_dtype: torch.dtype | None = None) -> list[Tensor] | Pending:
        """Element-wise sums over ranks of ``tensors`` (new tensors; inputs are not modified). ``exact`` keeps
        the tensors' own dtype on the wire (for counts and other bookkeeping that ``comm_dtype`` must not round);
        ``wire_dtype`` overrides ``comm_dtype`` for this call. ``async_op``: return a :class:`Pending` whose
        ``wait()`` gives the sums."""
        if not self.enabled or not tensors:
            return _Done(list(tensors)) if async_op else list(tensors)
        buffer = self._flatten(tensors, exact=exact, dtype=wire_dtype)
        self._count(category, buffer, 2 * (self.world_size - 1) / self.world_size)
        work = dist.all_reduce(buffer, group=self.group, async_op=async_op)
        pending = Pending([work] if async_op else [], lambda: self._unflatten(buffer, tensors))
        return pending if async_op else pending.wait()

    @overload
    def reduce_sum(self, tensors: Sequence[Tensor], *, dst: int, category: str, async_op: Literal[False] = False,
                   wire_dtype: torch.dtype | None = None) -> list[Tensor] | None: ...

    @overload
    def reduce_sum(self, tensors: Sequence[Tensor], *, dst: int, category: str, async_op: Literal[True],
                   wire_dtype: torch.dtype | None = None) -> Pending: ...

    @overload
    def reduce_sum(self, tensors: Sequence[Tensor], *, dst: int, category: str, async_op: bool,
                   wire_dtype: torch.dtype | None = None) -> list[Tensor] | None | Pending: ...

    def reduce_sum(self, tensors: Sequence[Tensor], *, dst: int, category: str, async_op: bool = False,
                   wire_dtype: torch.dtype | None = None) -> list[Tensor] | None | Pending:
        """Sums over ranks, delivered to rank ``dst`` only (other ranks get ``None``); ``async_op`` and
        ``wire_dtype`` as above."""
        if not self.enabled:
            return _Done(list(tensors)) if async_op else list(tensors)
        if not tensors:
            out: list[Tensor] | None = [] if self.rank == dst else None
            return _Done(out) if async_op else out
        buffer = self._flatten(tensors, dtype=wire_dtype)
        self._count(category, buffer, (self.world_size - 1) / self.world_size)
        work = dist.reduce(buffer, dst=self._global(dst), group=self.group, async_op=async_op)
        pending = Pending([work] if async_op else [],
                          lambda: self._unflatten(buffer, tensors) if self.rank == dst else None)
        return pending if async_op else pending.wait()

    def send_recv(self, sends: Mapping[int, Sequence[Tensor]], recv_like: Mapping[int, Sequence[Tensor]], *,
                  category: str, control: Mapping[int, int] | None = None) -> dict[int, list[Tensor]]:
        """Point-to-point exchange: one bucket to each ``dst`` in ``sends``, one from each ``src`` in
        ``recv_like`` (shaped like the given placeholders). Both sides must agree on the pairs and shapes.
        ``control[dst]`` elements of a bucket are status flags (accounted separately)."""
        if not self.enabled or not (sends or recv_like):
            return {}
        ops, inbox = [], {}
        for dst, tensors in sorted(sends.items()):
            buffer = self._flatten(tensors)
            self._count(category, buffer, 1.0, (control or {}).get(dst, 0))
            ops.append(dist.P2POp(dist.isend, buffer, self._global(dst), group=self.group))
        for src, like in sorted(recv_like.items()):
            inbox[src] = (self._flatten(like), like)
            ops.append(dist.P2POp(dist.irecv, inbox[src][0], self._global(src), group=self.group))
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        return {src: self._unflatten(buffer, like) for src, (buffer, like) in inbox.items()}

    def broadcast(self, tensors: Sequence[Tensor], *, src: int, category: str, group: Any | None = None,
                  group_size: int | None = None, control: int = 0) -> list[Tensor]:
        """``src``'s ``tensors`` on every rank of ``group`` (others pass correctly shaped placeholders);
        ``control`` of the elements are status flags (accounted separately)."""
        if not self.enabled or not tensors:
            return list(tensors)
        buffer = self._flatten(tensors)
        if self.rank == src:
            receivers = (group_size or self.world_size) - 1
            self._count(category, buffer, receivers, control)
        dist.broadcast(buffer, src=self._global(src), group=group if group is not None else self.group)
        return self._unflatten(buffer, tensors)

    def all_to_all(self, sends: Sequence[Sequence[Tensor]], recv_like: Sequence[Sequence[Tensor]], *, category: str,
                   group: Any | None = None) -> list[list[Tensor]]:
        """``sends[i]`` to the ``i``-th member of ``group`` (this communicator's group when ``None``); returns, per
        member, what it sent here, shaped like ``recv_like[i]`` (one ``all_to_all_single`` of one exact flat
        buffer; every member must agree on the sizes)."""
        ref = next(t for ts in (*sends, *recv_like) for t in ts)
        if not self.enabled:
            return [list(ts) for ts in sends]
        flat = [self._flatten(ts, exact=True, dtype=ref.dtype) if ts else ref.new_empty(0) for ts in sends]
        inbox = [ref.new_empty(sum(t.numel() for t in ts)) for ts in recv_like]
        group = group if group is not None else self.group
        me = dist.get_rank(group)
        self._count(category, torch.cat([b for i, b in enumerate(flat) if i != me] or [ref.new_empty(0)]))
        buffer = ref.new_empty(sum(b.numel() for b in inbox))
        dist.all_to_all_single(buffer, torch.cat(flat), [b.numel() for b in inbox], [b.numel() for b in flat],
                               group=group)
        out, offset = [], 0
        for b, like in zip(inbox, recv_like):
            out.append(self._unflatten(buffer[offset:offset + b.numel()], like))
            offset += b.numel()
        return out

    @property
    def ranks(self) -> tuple[int, ...]:
        """The global ranks of this communicator's group, in group order."""
        return tuple(self._ranks)

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (one tiny all-reduce)."""
        return self.agree(flag)[0]

    def agree(self, flag: bool, token: int = 0, flags: Sequence[bool] = ()) -> tuple[bool, bool, list[bool]]:
        """One tiny all-reduce for a step's agreements: whether ``flag`` holds on every rank, whether every rank
        passed the same ``token`` (an integer digest of values that must be identical, e.g. schedules), and, per
        entry of ``flags``, whether it is set on any rank."""
        if not self.enabled:
            return flag, True, list(flags)
        values = [0 if flag else 1, token, -token, *(1 if f else 0 for f in flags)]
        t = torch.tensor(values, dtype=torch.int64, device=self._device())
        # one MAX reduction: a failed flag, the largest token and minus the smallest, any set flag
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        out = t.tolist()
        return out[0] == 0, out[1] == -out[2], [bool(v) for v in out[3:]]

    def fence(self, step: int, what: str) -> None:
        """Check that every rank reached ``what`` (e.g. ``"step()"``) at K-FAC step ``step``: one tiny all-reduce
        on the gloo side group. Raises the same clear error on every rank if they reached different calls or steps,
        and, on the ranks that arrived, if some rank did not within ``step_timeout`` (naming the ranks)."""
        if self._side is None:
            return
        code = zlib.crc32(what.encode())
        t = torch.tensor([step, -step, code, -code], dtype=torch.int64)
        try:  # one MAX reduction: equal everywhere iff the largest step and call equal minus the smallest
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._side)
        except Exception as exc:  # timeout, or a peer that exited meanwhile
            absent = self._absent(step)
            who = f"rank(s) {absent}" if absent else "some rank(s)"
            raise RuntimeError(f"kfac: rank {self.rank} reached {what} at step {step}, but {who} did not within "
                               f"step_timeout={self.step_timeout:g} s. {_FENCE_HINT}") from exc
        if t[0] == -t[1] and t[2] == -t[3]:
            return
        seen: list[Any] = [None] * self.world_size  # every rank sees the mismatch: all take this branch together
        dist.all_gather_object(seen, (what, step), group=self._side)
        ranks = ", ".join(f"rank {r}: {w} at step {s}" for r, (w, s) in enumerate(seen))
        raise RuntimeError(f"kfac: ranks disagree at step {step} ({ranks}). {_FENCE_HINT}")

    def _absent(self, step: int) -> list[int] | None:
        """After a failed fence: the ranks that have not marked ``step``'s fence in the store within a grace
        period (best effort; ``None`` where the store cannot tell)."""
        try:  # private API: the group's store
            store = dist.distributed_c10d._get_default_store()
            prefix = f"kfac_fence/{self._side.group_name}/{step}/"  # type: ignore[union-attr]
            store.set(prefix + str(self._global(self.rank)), "1")
            deadline = time.monotonic() + min(float(self.step_timeout or 0.0), 10.0)
            while True:
                absent = [r for r in range(self.world_size) if not store.check([prefix + str(self._global(r))])]
                if not absent or time.monotonic() > deadline:
                    return absent
                time.sleep(0.1)
        except Exception:
            return None

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def check_identical(self, value: Mapping[str, Any], *, what: str) -> None:
        """Raise the same clear error on every rank if ``value`` (a JSON-serialisable mapping) differs between
        ranks, naming the keys that differ and each rank's value of them."""
        if not self.enabled:
            return
        text = {k: json.dumps(v, sort_keys=True, default=repr) for k, v in value.items()}
        digest = hashlib.sha256(json.dumps(text, sort_keys=True).encode()).hexdigest()[:16]
        digests = self.all_gather_object(digest)
        if len(set(digests)) == 1:
            return
        everyone = self.all_gather_object(text)  # only on a mismatch: every rank takes this branch together
        keys = sorted({k for t in everyone for k in t} - {k for k in text if all(t.get(k) == text[k]
                                                                                   for t in everyone)})
        details = "; ".join(f"{k}: " + ", ".join(f"rank {r}={_short(t.get(k))}" for r, t in enumerate(everyone))
                            for k in keys)
        raise RuntimeError(f"kfac: {what} differs between ranks ({details}); every rank must build the same model "
                           "and pass the same options")

    def new_group(self, ranks: Sequence[int]) -> Any:
        """A subgroup of this communicator's ranks; called by its members only (in the same order on each)."""
        return self._new_group([self._ranks[r] for r in ranks]) if self.enabled else None

    def _new_group(self, global_ranks: Sequence[int], backend: str | None = None,
                   timeout: datetime.timedelta | None = None) -> Any:
        return dist.new_group(ranks=list(global_ranks), timeout=timeout or self._timeout, backend=backend,
                              use_local_synchronization=True)

    def _global(self, rank: int) -> int:
        return self._ranks[rank]

    def _device(self) -> torch.device:
        backend = dist.get_backend(self.group)
        if backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


class Communicating:
    """The communication properties of an object whose collectives go through ``self._comm`` (both
    preconditioners)."""

    _comm: Communicator

    @property
    def communicator(self) -> Communicator:
        """The :class:`Communicator` this object's collectives go through."""
        return self._comm

    @property
    def rank(self) -> int:
        return self._comm.rank

    @property
    def world_size(self) -> int:
        return self._comm.world_size

    @property
    def bytes_communicated(self) -> dict[str, int]:
        """This rank's share of the bytes on the wire so far, by category (e.g. factors, decompositions, gradients,
        control flags; M-FAC: ``"mfac"`` Gram-row sums); summed over ranks it is the total traffic."""
        return {k: int(round(v)) for k, v in self._comm.bytes_sent.items()}


_FENCE_HINT = ("Every rank must call step() after the same backward passes: a rank that skips it (e.g. `continue` "
               "after an exception) or calls it an extra time desynchronises K-FAC's collectives; skip a step on "
               "every rank together instead")


def _short(text: str | None, limit: int = 120) -> str:
    if text is None:
        return "<missing>"
    return text if len(text) <= limit else text[:limit] + "..."


def _group_timeout(group: Any | None) -> datetime.timedelta | None:
    """The collective timeout of ``group`` (so private duplicates time out like the user's group), or ``None``
    (torch's default) where this torch version does not expose it."""
    try:
        pg = group if group is not None else dist.group.WORLD
        backend = dist.get_backend(pg)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        assert pg is not None  # no default group: handled below like any other failure
        timeout = pg._get_backend(device).options._timeout
        return timeout if isinstance(timeout, datetime.timedelta) else None
    except Exception:  # private API: fall back to torch's default timeout
        return None


def _release_groups(ref: "weakref.ref[Communicator]") -> None:
    """At exit, while the interpreter is alive: drop a communicator's references to its process groups, so that
    groups the user destroyed (``destroy_process_group()``) are freed now rather than during interpreter
    finalization, where a gloo group's threads can abort the process."""
    comm = ref()
    if comm is not None:
        comm.group = comm._side = None
