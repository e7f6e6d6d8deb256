"""Which modules are preconditioned, with which adapter: the one module walk of K-FAC, M-FAC, the planner's cost
model and influence.

:func:`walk` applies the rules every preconditioner shares -- ``skip_layers`` (module names, class names or regular
expressions matched in full against the name; a skipped module's children are skipped too), frozen parameters and
parameters shared with an earlier module -- and yields the remaining modules that own parameters.
:func:`track_layers` adds K-FAC's rule: a module is a *layer* if :func:`kfac.modules.adapter_for` supports it (it
adapts ``nn.MultiheadAttention.out_proj``, which its parent applies functionally, and refuses meta tensors).
Every skipped module with parameters is reported as ``(name, reason)``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from torch import nn

from .distributed.fsdp import shard_spec, sharded_parameters
from .modules import (CrossInProjectionAdapter, InProjectionAdapter, ModuleAdapter, OutProjectionAdapter,
                      TiedEmbeddingAdapter, adapter_for, is_tied_head)
from .modules.loose import LooseAdapter, head_bias_adapter, loose_adapter

__all__ = ["SkipRules", "Candidate", "TrackedLayer", "Tracking", "walk", "track_layers", "warn_skipped",
           "summarize", "factor_size", "WRAPPER_NAMES", "unwrapped_name", "rename_map"]

CHOSEN = ("matched skip_layers", "parent module", "parameters do not require grad", "tied to")
"""Reasons not warned about: the user's own choices (skip_layers, frozen parameters), and tied weights (their
parameters are preconditioned, with one use's factors)."""


class SkipRules:
    """``skip_layers`` validated once: each entry is a module name, a class name or a regular expression."""

    def __init__(self, skip_layers: Iterable[str] | str = ()) -> None:
        entries = [skip_layers] if isinstance(skip_layers, str) else list(skip_layers)
        self.entries: list[str] = []
        self._patterns: list[re.Pattern[str]] = []
        for s in entries:
            if not isinstance(s, str):
                raise TypeError(f"skip_layers entries must be strings, got {s!r}")
            try:
                self._patterns.append(re.compile(s))
            except re.error as exc:
                raise ValueError(f"skip_layers: {s!r} is not a valid regular expression ({exc})") from None
            self.entries.append(s)
        self._matched: set[str] = set()

    def matches(self, name: str, module: nn.Module | None = None) -> bool:
        """Whether ``name`` (or ``module``'s class name) is skipped; remembers which entries matched."""
        hits = {s for s in self.entries if s == name or (module is not None and s == type(module).__name__)}
        hits |= {p.pattern for p in self._patterns if p.fullmatch(name)}
        self._matched |= hits
        return bool(hits)

    def warn_unmatched(self, stacklevel: int = 3) -> None:
        """Warn about entries that matched nothing (a typo would otherwise silently skip nothing)."""
        unmatched = [s for s in self.entries if s not in self._matched]
        if unmatched:
            warnings.warn(f"kfac: skip_layers entries {unmatched} match no module name, class name or full name "
                          "(regular expression) in the model", stacklevel=stacklevel + 1)


@dataclass
class Candidate:
    """A module that owns trainable parameters not claimed by an earlier module."""

    name: str
    module: nn.Module
    params: list[nn.Parameter]      # its own trainable parameters, none shared with an earlier candidate
    partly_frozen: bool = False     # some of its own parameters do not require grad


def walk(model: nn.Module, rules: SkipRules, skipped: list[tuple[str, str]],
         ties: list[tuple[str, nn.Module, str]] | None = None) -> Iterator[Candidate]:
    """The modules of ``model`` (``named_modules`` order) that own trainable, unshared parameters and are not
    skipped; every other module with parameters is appended to ``skipped`` with its reason. A consumer that
    rejects a candidate reports it itself."""
    skipped_prefixes: list[str] = []
    owners: dict[int, str] = {}
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        parent = next((p for p in skipped_prefixes if p == "" or name.startswith(p + ".")), None)
        if parent is not None:
            if own:
                skipped.append((name, f"parent module {parent or '<root>'!r} is skipped"))
            continue
        if rules.matches(name, module):
            skipped_prefixes.append(name)
            if own or name:
                skipped.append((name, "matched skip_layers"))
            continue
        if not own:
            continue
        trainable = [p for p in own if p.requires_grad]
        if not trainable:
            skipped.append((name, "parameters do not require grad (frozen)"))
            continue
        fresh = [p for p in trainable if id(p) not in owners]
        if not fresh:
            skipped.append((name, f"shares parameters with {owners[id(trainable[0])]!r}"))
            if ties is not None:  # (module, owner): every trainable parameter is owned by an earlier module
                ties.append((name, module, owners[id(trainable[0])]))
            continue
        for p in fresh:
            owners[id(p)] = name
        for n, p in module.named_parameters(recurse=False):  # a clear error for shardings K-FAC does not model
            shard_spec(f"{name}.{n}" if name else n, p)
        yield Candidate(name, module, fresh, partly_frozen=len(trainable) < len(own))


@dataclass
class TrackedLayer:
    name: str
    module: nn.Module
    adapter: ModuleAdapter


@dataclass
class Tracking:
    """The result of :func:`track_layers`."""

    layers: list[TrackedLayer] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def track_layers(model: nn.Module, skip_layers: Iterable[str] | str = (), *, warn_unmatched: bool = True,
                 ) -> Tracking:
    """K-FAC's layers of ``model``: the :func:`walk` candidates with a supported adapter whose parameters are
    exactly the candidate's (see the module docstring)."""
    rules = SkipRules(skip_layers)
    out = Tracking()
    ties: list[tuple[str, nn.Module, str]] = []
    functional = {f"{n}.out_proj" if n else "out_proj": m for n, m in model.named_modules()
                  if isinstance(m, nn.MultiheadAttention)}
    cross = {id(m.multihead_attn) for m in model.modules() if isinstance(m, nn.TransformerDecoderLayer)}
    for c in walk(model, rules, out.skipped, ties):
        parent = functional.get(c.name)
        if parent is not None and parent.out_proj is c.module:  # applied functionally: observed via its parent
            adapter: ModuleAdapter | None
            adapter, reason = OutProjectionAdapter(c.module, parent), None
        else:
            adapter, reason = adapter_for(c.module)
            if type(adapter) is InProjectionAdapter and id(c.module) in cross:  # query is not key: A_q, A_kv
                adapter = CrossInProjectionAdapter(c.module)
            if adapter is None:  # parameters a container uses itself: a diagonal block (kfac.modules.loose)
                adapter = loose_adapter(c.module, c.params, reason)
        if adapter is None:
            out.skipped.append((c.name, _unsupported(c, reason or "unsupported")))
            continue
        if c.partly_frozen and not isinstance(adapter, LooseAdapter):
            out.skipped.append((c.name, "parameters do not require grad (frozen)"))
            continue
        if [id(p) for p in adapter.parameters()] != [id(p) for p in c.params]:
            tied = next((t.name for t in out.layers if is_tied_head(t.module, c.module)), None)
            if tied is not None:  # a head with its own bias reusing an embedding's matrix
                ties.append((c.name, c.module, tied))
            out.skipped.append((c.name, "shares parameters with an earlier tracked layer"))
            continue
        if not adapter.shardable and sharded_parameters((str(i), p) for i, p in enumerate(c.params)):
            out.skipped.append((c.name, f"{type(adapter).__name__} re-runs the module with its parameters, which "
                                        "FSDP2 keeps sharded outside forward: not preconditioned"))
            continue
        if any(p.is_meta for p in c.params):
            raise ValueError(f"layer {c.name!r} has parameters on the meta device: materialise the model "
                             "(to_empty() and load or initialise its weights) before building K-FAC")
        out.layers.append(TrackedLayer(c.name, c.module, adapter))
    _resolve_ties(out, ties)
    _set_example_dims(model, out.layers)
    if warn_unmatched:
        rules.warn_unmatched(stacklevel=3)
    return out


def _set_example_dims(model: nn.Module, layers: list[TrackedLayer]) -> None:
    """Every layer's per-example rows (EK-FAC's corrections, influence's gradients, normalisation layers'
    statistics) come from examples along dim 1 of ``(T, N, E)`` where the model uses the layer sequence-first. The layout is read where PyTorch's modules declare it
    (a ``batch_first`` attribute: attention, transformer layers, recurrent layers): from the nearest enclosing
    module that declares one, else from the nearest enclosing module inside which every declaring module agrees
    (a custom block with a sequence-first ``nn.MultiheadAttention`` beside its ``LayerNorm``). A user's own
    container declares its layout the same way, with a ``batch_first`` attribute."""
    named = dict(model.named_modules())
    declared = {n: bool(m.batch_first) for n, m in named.items() if isinstance(getattr(m, "batch_first", None), bool)}
    for t in layers:
        parts = t.name.split(".") if t.name else []
        for k in range(len(parts) - 1, -1, -1):
            owner = ".".join(parts[:k])
            inside = {v for n, v in declared.items() if n == owner or n.startswith(owner + ".") or not owner}
            if owner in declared or len(inside) > 1:  # declared here, or a mixed container: stop at it
                if owner in declared:
                    t.adapter.example_dim = 0 if declared[owner] else 1
                break
            if inside:
                t.adapter.example_dim = 0 if inside.pop() else 1
                break


def _unsupported(c: Candidate, reason: str) -> str:
    """The reason a candidate without an adapter is skipped, naming what kind of parameters they are (an
    adapter's own reason for refusing an instance is kept)."""
    if not reason.startswith("unsupported module type"):
        return reason
    if isinstance(c.module, nn.RNNBase):
        return (f"recurrent layer {type(c.module).__name__}: not preconditioned (no Kronecker block for recurrent "
                "weights yet); its gradients are used as they are")
    return reason  # (a container's own parameters have a block: kfac.modules.loose)


def factor_size(adapter: ModuleAdapter) -> int:
    """Entries of an adapter's two factors (a diagonal ``A`` counts its diagonal)."""
    return (adapter.a_dim if adapter.a_diagonal else adapter.a_dim ** 2) + adapter.g_dim ** 2


def _resolve_ties(out: Tracking, ties: list[tuple[str, nn.Module, str]]) -> None:
    """Tied weights: an embedding and a bias-free output layer sharing its matrix become one layer with both uses'
    curvature (:class:`kfac.modules.TiedEmbeddingAdapter`); of two other supported modules with the same
    parameters, the one with the smaller factors is tracked, whatever the registration order, with that use's
    curvature only (the other's gradient still adds to the shared parameter's)."""
    for name, module, owner in ties:
        index = next((i for i, t in enumerate(out.layers) if t.name == owner), None)
        if index is None:
            continue
        current = out.layers[index]
        pair = [(current.name, current.module), (name, module)]
        tie = next(((e, h) for e, h in (pair, pair[::-1]) if is_tied_head(e[1], h[1])), None)
        if tie is not None:
            (emb_name, emb), (head_name, head) = tie
            out.layers[index] = TrackedLayer(emb_name, emb, TiedEmbeddingAdapter(emb, head))
            tracked, other = emb_name, head_name
            reason = f"tied to {tracked!r}: both uses' curvature is in {tracked!r}'s block (kfac.modules.tied)"
            bias = head_bias_adapter(head, {id(p) for t in out.layers for p in t.adapter.parameters()})
            if bias is not None:  # its own bias: a diagonal block (kfac.modules.loose)
                out.layers.append(TrackedLayer(head_name, head, bias))
        else:
            adapter, _ = adapter_for(module)
            if adapter is None or [id(p) for p in adapter.parameters()] != [id(p) for p in
                                                                             current.adapter.parameters()]:
                continue
            tracked, other = owner, name
            if factor_size(adapter) < factor_size(current.adapter):
                out.layers[index] = TrackedLayer(name, module, adapter)
                tracked, other = name, owner
            reason = (f"tied to {tracked!r}: the shared parameters are preconditioned with {tracked!r}'s factors "
                      "(the smaller ones); this use's curvature is not included")
        out.skipped = [(n, r) for n, r in out.skipped if n not in (tracked, other)] + [(other, reason)]


def summarize(skipped: Iterable[tuple[str, str]], *, shown: int = 4) -> str:
    """One short line per reason, naming its modules (the first ``shown``, then how many more)."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in skipped:
        by_reason.setdefault(reason, []).append(repr(name) if name else "<root>")
    lines = []
    for reason, names in by_reason.items():
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        lines.append(f"  {', '.join(names[:shown])}{more}: {reason}")
    return "\n".join(lines)


def warn_skipped(skipped: list[tuple[str, str]], *, stacklevel: int = 3) -> None:
    """One warning naming the modules with trainable parameters left unpreconditioned for a reason the user did
    not choose (unsupported types, functional uses, shared weights), one line per reason; ``skipped`` lists all."""
    unchosen = [(n, r) for n, r in skipped if not r.startswith(CHOSEN)]
    if unchosen:
        warnings.warn(f"kfac: {len(unchosen)} module(s) with trainable parameters are not preconditioned (their "
                      f"gradients are used as they are; all of them with reasons: .skipped):\n{summarize(unchosen)}",
                      stacklevel=stacklevel + 1)


WRAPPER_NAMES = ("module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
"""Attribute names under which wrappers hold a model: DDP / DataParallel, ``torch.compile``, FSDP1,
``checkpoint_wrapper``."""


def unwrapped_name(name: str) -> str:
    """``name`` without wrapper components (:data:`WRAPPER_NAMES`): ``module.layer1.0`` -> ``layer1.0``."""
    return ".".join(p for p in name.split(".") if p not in WRAPPER_NAMES)


def rename_map(saved: Iterable[str], current: Iterable[str]) -> dict[str, str]:
    """``saved -> current`` for names that differ only by wrapper components (a checkpoint of a DDP-, compile- or
    FSDP1-wrapped model loaded into the unwrapped model, or the reverse); empty when nothing needs renaming or
    the correspondence is not one to one (then the names are left for the caller's own checks)."""
    saved, current = list(saved), list(current)
    if set(saved) <= set(current):
        return {}
    by_name: dict[str, list[str]] = {}
    for name in current:
        by_name.setdefault(unwrapped_name(name), []).append(name)
    out = {}
    for name in saved:
        hits = by_name.get(unwrapped_name(name), [])
        if len(hits) != 1:
            return {}
        out[name] = hits[0]
    return out if len(set(out.values())) == len(out) else {}
