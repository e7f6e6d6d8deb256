"""K-FAC on FSDP2 / HSDP models: bytes per step next to FSDP's own traffic, per-rank memory, step time.

Each mesh (FSDP2 over 2 and 4 ranks, HSDP on 2 x 2) runs in its own gloo processes on THIS machine
(``torch.multiprocessing``, a deadline, ``--threads`` per rank). A small GPT-like model on SYNTHETIC tokens (token
and position embeddings, ``--layers`` ``nn.TransformerEncoderLayer`` blocks, a head; global batch ``--batch``
sequences of ``--seq-len``) is sharded with ``fully_shard`` per block and on the root, then trained side by side,
from the same weights, by SGD (momentum 0.9) and by ``kfac.KFAC`` around it (the default strategy for sharded
models, ``factor_update_steps=--factor-every``, ``inv_update_steps=--inv-every``). Nothing is learned; only cost is
measured. Per configuration, summed over ranks and averaged over the timed steps:

* FSDP's collectives, counted by wrapping ``torch.distributed``'s all-gather, reduce-scatter and (HSDP) replica
  all-reduce functions: bytes each rank sends, ring volumes (``(S - 1) / S`` of the buffer; ``2 (R - 1) / R`` for an
  all-reduce), the convention of :mod:`kfac.distributed.comm`;
* K-FAC's own bytes by category (its communicator's counters): ``gradients`` is the lossless gather / scatter of
  the sharded gradients (:mod:`kfac.distributed.fsdp`), next to the planner's prediction
  (:func:`kfac.planner.sharded_view`);
* per rank: parameter shard bytes, K-FAC's held state (factors, decompositions) and the largest transient whole
  gradients a rank forms (its own layers);
* median wall time per step (rotated windows, all configurations in the same processes).

Writes ``benchmarks/cpu/results/fsdp.json`` and ``fsdp.png`` (``--quick``: ``fsdp_quick.*``, smaller model, fewer
steps).

    python benchmarks/cpu/fsdp.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT))
from benchmarks.common import log, machine_info, rotated, save_png, write_json  # noqa: E402
from benchmarks.cpu.strategies.launch import launch  # noqa: E402

import kfac  # noqa: E402
from kfac.planner import LayerSpec, sharded_view  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MESHES = ((2,), (4,), (2, 2))
CONFIGS = ("sgd", "kfac")
COUNTS: dict[str, float] = {}
FSDP_GROUPS: list[Any] = []


class GPT(nn.Module):
    def __init__(self, vocab: int, seq_len: int, dim: int, layers: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True)
                                    for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def _count(kind: str, fn: Any) -> Any:
    """``fn`` (a torch.distributed collective) counting the bytes this rank sends into ``COUNTS[kind]``."""
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        group = kwargs.get("group")
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        if tensors and (kind != "replica_all_reduce" or any(group is g for g in FSDP_GROUPS[:-1])):
            n = dist.get_world_size(group)
            big = max(tensors, key=torch.Tensor.numel)
            share = 2 * (n - 1) / n if kind == "replica_all_reduce" else (n - 1) / n
            COUNTS[kind] = COUNTS.get(kind, 0.0) + big.numel() * big.element_size() * share
        return fn(*args, **kwargs)
    return wrapped


def _instrument() -> None:
    for kind, names in (("all_gather", ("all_gather_single", "all_gather_into_tensor")),
                        ("reduce_scatter", ("reduce_scatter_single", "reduce_scatter_tensor")),
                        ("replica_all_reduce", ("all_reduce",))):
        for name in names:
            if hasattr(dist, name):
                setattr(dist, name, _count(kind, getattr(dist, name)))


def worker(rank: int, world: int, settings: dict[str, Any]) -> dict[str, Any]:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(settings["threads"])
    mesh_shape = tuple(settings["mesh"])
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard")[-len(mesh_shape):])
    FSDP_GROUPS[:] = [mesh.get_group(i) for i in range(len(mesh_shape))]
    _instrument()
    s = settings
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, s["vocab"], (s["batch"], s["seq_len"] + 1), generator=g) for _ in range(4)]
    per = s["batch"] // world
    runs: dict[str, dict[str, Any]] = {}
    for name in CONFIGS:
        torch.manual_seed(0)
        model = GPT(s["vocab"], s["seq_len"], s["dim"], s["layers"])
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        base = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        opt = base if name == "sgd" else kfac.KFAC(model, base, factor_update_steps=s["factor_every"],
                                                   inv_update_steps=s["inv_every"], damping=1e-3)
        runs[name] = {"model": model, "opt": opt, "times": [], "fsdp": {}, "kfac": {}, "step": 0}

    def step(run: dict[str, Any]) -> None:
        ids = data[run["step"] % len(data)][rank * per:(rank + 1) * per]
        run["opt"].zero_grad()
        logits = run["model"](ids[:, :-1])
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
        run["opt"].step()
        run["step"] += 1

    for run in runs.values():
        for _ in range(s["warmup"]):
            step(run)
    for r in range(s["repeats"]):
        for name in rotated(list(CONFIGS), r):
            run = runs[name]
            kfac_before = dict(run["opt"].preconditioner.bytes_communicated) if name == "kfac" else {}
            COUNTS.clear()
            dist.barrier()
            for _ in range(s["window"]):
                t = time.perf_counter()
                step(run)
                run["times"].append(time.perf_counter() - t)
            for k, v in COUNTS.items():
                run["fsdp"][k] = run["fsdp"].get(k, 0.0) + v
            if name == "kfac":
                after = run["opt"].preconditioner.bytes_communicated
                for k, v in after.items():
                    run["kfac"][k] = run["kfac"].get(k, 0.0) + v - kfac_before.get(k, 0.0)
    steps = s["repeats"] * s["window"]
    out: dict[str, Any] = {}
    for name, run in runs.items():
        report: dict[str, Any] = {
            "step_times_s": run["times"], "fsdp_bytes_per_step": {k: v / steps for k, v in run["fsdp"].items()},
            "kfac_bytes_per_step": {k: v / steps for k, v in run["kfac"].items()},
            "param_shard_bytes": sum(p.to_local().numel() * p.element_size() for p in run["model"].parameters())}
        if name == "kfac":
            pre = run["opt"].preconditioner
            shards = pre.engine.shards
            own = [n for n in pre.layers if n in shards and shards.workers[n] == shards.position]
            report.update(
                strategy=pre.plan.strategy, held_bytes=pre.memory_usage(), owned_layers=len(own),
                transient_bytes=sum(pre.store[n].g_dim * pre.store[n].a_dim for n in own) * 4,
                layers=len(pre.layers), sharded_layers=sum(n in shards for n in pre.layers),
                specs=[[n, pre.store[n].a_dim, pre.store[n].g_dim, pre.store[n].a_diagonal] for n in pre.layers],
                plan_memory=list(pre.plan.rank_memory))
            report["_plan"] = pre.plan.to_json()
        out[name] = report
    return out


def summarise(mesh: tuple[int, ...], reports: list[dict[str, Any]]) -> dict[str, Any]:
    from kfac.planner import Plan

    world = len(reports)
    row: dict[str, Any] = {"mesh": "x".join(map(str, mesh)), "world": world}
    for name in CONFIGS:
        per_rank = [r[name] for r in reports]
        step_wall = [max(ts) for ts in zip(*(r["step_times_s"] for r in per_rank))]
        fsdp = {k: sum(r["fsdp_bytes_per_step"].get(k, 0.0) for r in per_rank)
                for k in ("all_gather", "reduce_scatter", "replica_all_reduce")}
        row[name] = {"median_step_ms": statistics.median(step_wall) * 1e3, "fsdp_bytes_per_step": fsdp,
                     "param_shard_bytes_max": max(r["param_shard_bytes"] for r in per_rank)}
        if name == "kfac":
            cats = sorted({k for r in per_rank for k in r["kfac_bytes_per_step"]})
            row[name]["kfac_bytes_per_step"] = {k: sum(r["kfac_bytes_per_step"].get(k, 0.0) for r in per_rank)
                                                for k in cats}
            row[name].update({k: [r[k] for r in per_rank] for k in ("held_bytes", "owned_layers",
                                                                    "transient_bytes")})
            row[name].update(strategy=per_rank[0]["strategy"], layers=per_rank[0]["layers"],
                             sharded_layers=per_rank[0]["sharded_layers"])
            plan = Plan.from_json(per_rank[0]["_plan"])
            specs = [LayerSpec(n, a, g, d) for n, a, g, d in per_rank[0]["specs"]]
            view = sharded_view(plan, specs, mesh[-1])
            row[name]["predicted_exchange_bytes_per_step"] = view.exchange_bytes
            row[name]["predicted_reduce_scatter_bytes_per_step"] = view.reduce_scatter_bytes
    k, sgd = row["kfac"], row["sgd"]
    row["ratios"] = {
        "step_time_kfac_over_sgd": k["median_step_ms"] / sgd["median_step_ms"],
        "gradient_exchange_over_reduce_scatter": (k["kfac_bytes_per_step"].get("gradients", 0.0)
                                                  / k["fsdp_bytes_per_step"]["reduce_scatter"]),
        "measured_exchange_over_predicted": (k["kfac_bytes_per_step"].get("gradients", 0.0)
                                             / k["predicted_exchange_bytes_per_step"])}
    return row


def table(rows: list[dict[str, Any]]) -> str:
    mib = 2.0 ** 20
    head = (f"{'mesh':>5} {'strategy':>9} {'SGD ms':>8} {'K-FAC ms':>9} {'x':>6} {'RS MiB':>8} {'AG MiB':>8} "
            f"{'AR MiB':>7} {'KF grad':>8} {'/RS':>6} {'/plan':>6} {'KF fact':>8} {'KF dec':>7} {'held MiB':>9} "
            f"{'trans MiB':>9}")
    lines = [head]
    for r in rows:
        k, fsdp = r["kfac"], r["kfac"]["fsdp_bytes_per_step"]
        kb = k["kfac_bytes_per_step"]
        lines.append(
            f"{r['mesh']:>5} {k['strategy']:>9} {r['sgd']['median_step_ms']:>8.1f} {k['median_step_ms']:>9.1f} "
            f"{r['ratios']['step_time_kfac_over_sgd']:>6.2f} {fsdp['reduce_scatter'] / mib:>8.2f} "
            f"{fsdp['all_gather'] / mib:>8.2f} {fsdp['replica_all_reduce'] / mib:>7.2f} "
            f"{kb.get('gradients', 0) / mib:>8.2f} {r['ratios']['gradient_exchange_over_reduce_scatter']:>6.3f} "
            f"{r['ratios']['measured_exchange_over_predicted']:>6.3f} {kb.get('factors', 0) / mib:>8.2f} "
            f"{kb.get('decompositions', 0) / mib:>7.2f} {max(k['held_bytes']) / mib:>9.2f} "
            f"{max(k['transient_bytes']) / mib:>9.2f}")
    lines.append("bytes per step summed over ranks (ring volumes); RS/AG/AR: FSDP's gradient reduce-scatter, parameter "
                 "all-gathers and HSDP replica all-reduce; KF grad: K-FAC's lossless gradient exchange (/RS: its "
                 "ratio to FSDP's reduce-scatter, /plan: measured over the planner's prediction); held / trans: "
                 "largest per-rank K-FAC state and transient whole gradients")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = 2.0 ** 20
    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = [r["mesh"] for r in rows]
    series = {"FSDP reduce-scatter": [r["kfac"]["fsdp_bytes_per_step"]["reduce_scatter"] / mib for r in rows],
              "FSDP all-gather": [r["kfac"]["fsdp_bytes_per_step"]["all_gather"] / mib for r in rows],
              "K-FAC gradient exchange": [r["kfac"]["kfac_bytes_per_step"].get("gradients", 0) / mib for r in rows],
              "K-FAC factors": [r["kfac"]["kfac_bytes_per_step"].get("factors", 0) / mib for r in rows]}
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(rows))], values, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [f"mesh {m}" for m in labels])
    ax.set_ylabel("MiB per step (all ranks)")
    ax.set_title("K-FAC on FSDP2 / HSDP: traffic per step (gloo, CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--deadline", type=float, default=900.0)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    settings: dict[str, Any] = dict(threads=args.threads, collective_timeout=300, vocab=96, seq_len=32, batch=8,
                                    dim=64, layers=4, factor_every=1, inv_every=5, warmup=2, window=5, repeats=3)
    if args.quick:
        settings.update(dim=32, layers=2, seq_len=16, window=2, repeats=2, warmup=1)
    rows = []
    for mesh in MESHES:
        world = 1
        for m in mesh:
            world *= m
        log(f"mesh {mesh}: {world} ranks")
        reports = launch(world, {**settings, "mesh": list(mesh)}, args.deadline, fn=worker)
        rows.append(summarise(mesh, reports))
    print(table(rows))
    stem = "fsdp_quick" if args.quick else "fsdp"
    record = {"benchmark": "fsdp", "settings": settings, "machine": machine_info(), "rows": rows}
    write_json(args.out_dir / f"{stem}.json", record, indent=1)
    plot(rows, args.out_dir / f"{stem}.png")
    print(f"wrote {args.out_dir / (stem + '.json')} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
