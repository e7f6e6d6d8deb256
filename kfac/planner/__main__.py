"""``python -m kfac.planner``: print the K-FAC sharding plan of a torchvision model or of a JSON list of shapes.

Examples::

    python -m kfac.planner --model resnet50 --world-size 64 --strategy dp-kfac --inv-update-steps 10 --compare
    python -m kfac.planner --json shapes.json --world-size 8        # [{"name": ..., "a_dim": ..., "g_dim": ...}]
    python -m kfac.planner --model vit_b_16 --world-size 8 --shard-size 4   # an HSDP model: 2 replicas x 4
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from .assign import MemoryCapError
from .cost import METHODS, CostModel, LayerSpec, calibrate, layer_specs
from .plan import STRATEGIES, Plan, format_ms
from .search import ASSIGNERS, default_strategy, make_plan
from .sharded import sharded_strategy, sharded_view

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tb": 10**12, "tib": 2**40}


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2000000000, 16GiB, 500MB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kfac.planner", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="torchvision model name (built with weights=None)")
    src.add_argument("--json", type=Path, help='JSON file: [{"name": ..., "a_dim": ..., "g_dim": ..., '
                                                '"a_diagonal": false}, ...]')
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--strategy", choices=STRATEGIES, default=None,
                   help="default: comm-opt for world size <= 8, else dp-kfac")
    p.add_argument("--grad-worker-fraction", type=float, default=None, help="hybrid only (default 0.5)")
    p.add_argument("--factor-update-steps", type=int, default=1)
    p.add_argument("--inv-update-steps", type=int, default=1)
    p.add_argument("--split", choices=("auto", "yes", "no"), default="auto",
                   help="decompose A and G of a layer on different ranks")
    p.add_argument("--memory-cap", type=_size, default=None, help="per-rank bytes (suffixes: MB, GiB, ...)")
    p.add_argument("--method", choices=METHODS, default="eigen")
    p.add_argument("--assigner", choices=ASSIGNERS, default="lpt")
    p.add_argument("--compare", action="store_true", help="also plan with round-robin and KAISA's greedy")
    p.add_argument("--calibrate", action="store_true", help="time eigh/inverse/matmul on this device (cached)")
    p.add_argument("--device", default=None, help="device for --calibrate (default: cuda if available)")
    p.add_argument("--comm-bytes-per-element", type=int, default=None, help="e.g. 2 for bf16 communication")
    p.add_argument("--shard-size", type=int, default=None,
                   help="the model is sharded with FSDP2 (= world size) or HSDP over shard groups of this size: "
                        "print who preconditions each layer whole and the traffic next to FSDP's")
    p.add_argument("--max-ranks", type=int, default=16, help="per-rank rows to print")
    p.add_argument("--output", type=Path, default=None, help="write the plan as JSON here")
    return p


def _load_specs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[LayerSpec]:
    if args.json is not None:
        try:
            data = json.loads(args.json.read_text())
        except (OSError, ValueError) as exc:
            parser.error(f"cannot read {args.json}: {exc}")
        if isinstance(data, dict):
            data = data.get("layers")
        if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
            parser.error(f"{args.json}: expected a JSON list of {{name, a_dim, g_dim[, a_diagonal]}} objects")
        try:
            return [LayerSpec.from_dict(x) for x in data]
        except (TypeError, ValueError) as exc:
            parser.error(f"{args.json}: {exc}")
    import torchvision  # lazy: only the --model path needs torch

    try:
        model = torchvision.models.get_model(args.model, weights=None)
    except (ValueError, KeyError) as exc:
        parser.error(f"unknown torchvision model {args.model!r} ({exc}); "
                     f"see torchvision.models.list_models()")
    specs = layer_specs(model)
    if not specs:
        parser.error(f"model {args.model!r} has no layers K-FAC supports")
    return specs


def _compare(plans: dict[str, Optional[Plan]], max_ranks: int) -> str:
    names = list(plans)
    width = max(14, *(len(n) + 2 for n in names))
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, fn: Callable[[Plan], str]) -> None:
        rows.append((label, [fn(p) if p is not None else "infeasible" for p in plans.values()]))

    row("split A/G", lambda p: "yes" if p.split else "no")
    row("makespan ms/step", lambda p: f"{p.makespan * 1e3:.3f}")
    row("lower bound ms/step", lambda p: f"{p.lower_bound * 1e3:.3f}")
    row("imbalance", lambda p: f"{p.imbalance:.3f}")
    row("idle ranks", lambda p: str(len(p.idle_ranks)))
    row("max memory MiB", lambda p: f"{max(p.rank_memory) / 2**20:.1f}")
    row("min memory MiB", lambda p: f"{min(p.rank_memory) / 2**20:.1f}")
    row("factor MiB/step", lambda p: f"{p.comm.factor_reduction / 2**20:.1f}")
    row("decomp MiB/step", lambda p: f"{p.comm.decomposition_broadcast / 2**20:.1f}")
    row("gradient MiB/step", lambda p: f"{p.comm.gradient_broadcast / 2**20:.1f}")
    row("total bytes/step MiB", lambda p: f"{p.comm.total / 2**20:.1f}")
    first = next(p for p in plans.values() if p is not None)
    n = first.world_size
    if n <= max_ranks:
        for r in range(n):
            def load(p: Plan, r: int = r) -> str:
                return format_ms(p.rank_load[r])
            row(f"rank {r} load ms", load)
    else:
        for q, label in ((0.0, "max"), (0.1, "p90"), (0.5, "median"), (1.0, "min")):
            def pick(p: Plan, q: float = q) -> str:
                loads = sorted(p.rank_load, reverse=True)
                return format_ms(loads[min(n - 1, int(q * (n - 1)))])
            row(f"{label} rank load ms", pick)
    label_w = max(len(label) for label, _ in rows) + 2
    out = [f"{'metric':<{label_w}}" + "".join(f"{name:>{width}}" for name in names)]
    out += [f"{label:<{label_w}}" + "".join(f"{v:>{width}}" for v in values) for label, values in rows]
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.world_size < 1:
        parser.error("--world-size must be >= 1")
    specs = _load_specs(args, parser)
    cost = calibrate(args.device) if args.calibrate else CostModel.default()
    if args.comm_bytes_per_element is not None:
        cost = CostModel.from_dict({**cost.to_dict(), "comm_bytes_per_element": args.comm_bytes_per_element})
    strategy = args.strategy or default_strategy(args.world_size)
    fraction = args.grad_worker_fraction
    if args.shard_size is not None:
        try:
            default, default_fraction = sharded_strategy(args.world_size, args.shard_size)
        except ValueError as exc:
            parser.error(str(exc))
        strategy = args.strategy or default
        fraction = fraction if args.strategy else default_fraction
    kwargs = dict(cost_model=cost, grad_worker_fraction=fraction,
                  factor_update_steps=args.factor_update_steps, inv_update_steps=args.inv_update_steps,
                  split={"auto": None, "yes": True, "no": False}[args.split], memory_cap=args.memory_cap,
                  method=args.method)
    try:
        plan = make_plan(specs, args.world_size, strategy, assigner=args.assigner, **kwargs)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    source = args.model if args.model else str(args.json)
    print(f"# {source}: {len(specs)} layers; plan digest {plan.digest()[:16]}")
    print(plan.summary(max_ranks=args.max_ranks))
    if args.shard_size is not None:
        try:
            view = sharded_view(plan, specs, args.shard_size)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print()
        print(view.summary(max_ranks=args.max_ranks))
    if args.compare:
        plans: dict[str, Optional[Plan]] = {}
        for assigner in ASSIGNERS:
            try:
                plans[assigner] = make_plan(specs, args.world_size, strategy, assigner=assigner, **kwargs)
            except MemoryCapError:
                plans[assigner] = None
        print()
        print(f"# assigners compared ({strategy}, world_size={args.world_size})")
        print(_compare(plans, args.max_ranks))
    if args.output is not None:
        args.output.write_text(plan.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
