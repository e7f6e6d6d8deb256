"""FSDP2 + K-FAC on a small GPT: train sharded, checkpoint with DCP, resume, then ask an influence query of the
sharded model (the GPT, corpus and generation of examples/gpt_influence.py).

    torchrun --standalone --nproc-per-node=2 examples/fsdp_gpt.py --quick --steps 20
    torchrun --standalone --nproc-per-node=2 examples/fsdp_gpt.py --quick --steps 40 --resume   # from step 20
    python examples/fsdp_gpt.py --quick                                                         # one process

Every transformer layer and the root are ``fully_shard``-ed over a 1-D mesh (gloo on CPU, nccl on CUDA);
``kfac.KFAC`` around SGD with momentum preconditions the sharded layers losslessly. Every rank takes its slice of
the same global batch (seeded by the step: any world size, and a resumed run, sees the batches of the
uninterrupted one). Rank 0 prints ``step    k  loss x`` (the global batch's loss) every few steps. At the end all
ranks save model and optimizer (K-FAC's factors included) to a DCP checkpoint folder; ``--resume`` loads it, at
this or another world size, and trains on to ``--steps``. Last, ``InfluenceAnalyzer(method="ekfac")`` fits on the
first training sequences (batch ``i`` on rank ``i % world``), a continuation of ``--prompt`` is generated, and
rank 0 prints the training sequences that most support it (score; most influential characters in [brackets]).
Offline; about 20 s with 2 processes on 2 CPU cores (``--quick``: under 10 s).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

try:  # FSDP2 and DCP: torch >= 2.4 with torch.distributed (FSDP2 under torch.distributed._composable before 2.6)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard
    HAVE_FSDP2 = True
except ImportError:
    HAVE_FSDP2 = False

import kfac
from gpt_influence import GPT, corpus, generate, lm_loss, sequences
from kfac.influence import CausalLMTask, InfluenceAnalyzer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="train until this global step (default 200; --quick 20)"
                   "%(default).0s")  # (an empty %(default): argparse adds no second "(default: None)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch of sequences (split over the ranks)")
    p.add_argument("--seq-len", type=int, default=32, help="characters per sequence")
    p.add_argument("--lr", type=float, default=0.3, help="SGD learning rate (momentum 0.9)")
    p.add_argument("--checkpoint", type=Path, default=Path("runs/fsdp_gpt/checkpoint"), help="DCP folder")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--prompt", default="Return the ", help="the influence query's prompt")
    p.add_argument("--influence-seqs", type=int, default=None, help="training sequences scored (default 256; "
                   "--quick 32)%(default).0s")
    p.add_argument("--top-k", type=int, default=3, help="training sequences printed")
    p.add_argument("--seed", type=int, default=0, help="initial weights and batch order")
    p.add_argument("--quick", action="store_true", help="tiny model, short corpus, few steps (tests)")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 20 if args.quick else 200
    if args.influence_seqs is None:
        args.influence_seqs = 32 if args.quick else 256
    return args


def setup() -> tuple[int, int, torch.device]:
    """Join (or, as a single process, create) the process group; this rank, the world size and the device."""
    cuda = torch.cuda.is_available()
    timeout = datetime.timedelta(seconds=180)
    if "RANK" in os.environ:  # torchrun
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    else:  # a mesh of one: the same code path
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return rank, world, device


class ShardedGPT(GPT):
    """examples/gpt_influence.py's GPT whose causal mask is built on the input's device."""

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        with torch.device(ids.device):
            return super().forward(ids, attention_mask)


def make_model(*, vocab: int, args: argparse.Namespace, world: int, device: torch.device) -> GPT:
    """The GPT (same initial weights at any world size), each transformer layer and then the root sharded."""
    torch.manual_seed(args.seed)
    dim, heads = (32, 2) if args.quick else (64, 4)
    model = ShardedGPT(vocab, args.seq_len, dim=dim, heads=heads, layers=2).to(device)
    mesh = init_device_mesh(device.type, (world,))
    for layer in model.body.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def make_optimizer(*, model: nn.Module, lr: float) -> kfac.KFAC:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LayerNorms keep their plain gradients (listed in .skipped)
        return kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), inv_update_steps=10)


def global_batch(*, data: Tensor, step: int, size: int, seed: int) -> Tensor:
    """Step ``step``'s global batch: the same on every rank and world size, and in a resumed run."""
    g = torch.Generator().manual_seed(seed * 100003 + step)
    return data[torch.randint(0, len(data), (size,), generator=g)]


def save(*, model: nn.Module, opt: kfac.KFAC, step: int, folder: Path) -> None:
    """All ranks: model and optimizer (with K-FAC's state) as a DCP checkpoint, each rank writing its shards to
    ``folder``.tmp, which then replaces ``folder`` (a crash mid-write leaves the previous checkpoint intact)."""
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd, "step": step, "world": dist.get_world_size()}, checkpoint_id=str(tmp))
    if dist.get_rank() == 0:  # dcp.save returned: every rank's shards and the metadata are written
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load(*, model: nn.Module, opt: kfac.KFAC, folder: Path) -> tuple[int, int]:
    """All ranks: restore ``folder`` into the fresh ``model`` and ``opt``; the saved step and world size."""
    msd, osd = get_state_dict(model, opt)  # the fresh optimizer's skeleton says what to read
    state = {"model": msd, "optim": osd, "step": 0, "world": 0}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return int(state["step"]), int(state["world"])


def influence(*, model: nn.Module, data: Tensor, chars: list[str], args: argparse.Namespace, rank: int,
              device: torch.device) -> None:
    """Fit EK-FAC on the first ``--influence-seqs`` sequences, generate a continuation of ``--prompt`` and print
    (rank 0) the training sequences that most support it. Every rank runs every call: the model is sharded."""
    model.eval()
    index = {c: i for i, c in enumerate(chars)}
    prompt = torch.tensor([index.get(c, 0) for c in args.prompt], device=device)
    query = generate(model, prompt, args.seq_len - len(prompt), args.seq_len)
    train = data[:args.influence_seqs].to(device)
    batches = [train[i:i + 8] for i in range(0, len(train), 8)]  # batch i on rank i % world
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LayerNorms get no influence (listed in analyzer.skipped)
        analyzer = InfluenceAnalyzer(model, CausalLMTask(), method="ekfac", progress=False).fit(batches)
    tokens = analyzer.per_token_scores([query[None]], batches)[0].cpu()  # [n, seq_len]
    totals = tokens.sum(-1)
    if rank != 0:
        return
    text = "".join(chars[i] for i in query.tolist())
    print(f"\ninfluence (EK-FAC on {len(train)} training sequences, {len(analyzer.layers)} layers): the model "
          f"continues {args.prompt!r} as {text!r}", flush=True)
    print(f"top {min(args.top_k, len(train))} supporting training sequences (score; the 4 most influential "
          "characters in [brackets]):", flush=True)
    for j in torch.topk(totals, min(args.top_k, len(train))).indices.tolist():
        marks = set(torch.topk(tokens[j], 4).indices.tolist())
        shown = "".join(f"[{chars[c]}]" if t in marks else chars[c] for t, c in enumerate(data[j].tolist()))
        print(f"  #{j:4d} {float(totals[j]):9.3g}  {shown!r}", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not HAVE_FSDP2:
        raise SystemExit(f"fsdp_gpt.py: FSDP2 (fully_shard) needs torch >= 2.4 built with torch.distributed; this is "
                         f"torch {torch.__version__}")
    torch.set_num_threads(1)
    # nn.Linear on (B, T, E) returns a reshaped view; nothing here modifies the logits in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    # get_state_dict calls opt.state_dict(), whose top-level "kfac" entry is this rank's shard under dp-kfac (hence
    # kfac's note); DCP drops that entry and saves K-FAC's complete state keyed per layer instead
    logging.getLogger("kfac").addFilter(lambda record: "holds only this rank's shard" not in record.getMessage())
    rank, world, device = setup()
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by the {world} ranks")
    text = corpus()[: 4000 if args.quick else 40000]
    chars, data = sequences(text, args.seq_len)
    n = len(data)
    model = make_model(vocab=len(chars), args=args, world=world, device=device)
    opt = make_optimizer(model=model, lr=args.lr)
    if rank == 0:
        print(f"{world} process(es) on {device.type}, FSDP2 + K-FAC ({opt.preconditioner.plan.strategy}): "
              f"{len(opt.preconditioner.layers)} layers preconditioned; {n} sequences of {args.seq_len} characters, "
              f"{len(chars)} symbols", flush=True)
    start = 0
    if args.resume:
        start, saved_by = load(model=model, opt=opt, folder=args.checkpoint)
        if rank == 0:
            print(f"resumed from {args.checkpoint} at step {start} (saved by {saved_by} process(es), now {world})",
                  flush=True)
    local = args.batch_size // world
    every = 5 if args.quick else 20
    model.train()
    for step in range(start, args.steps):
        ids = global_batch(data=data, step=step, size=args.batch_size, seed=args.seed)
        opt.zero_grad()
        loss = lm_loss(model, ids[rank * local:(rank + 1) * local].to(device))
        loss.backward()
        opt.step()
        done = step + 1
        if done % every == 0 or done == args.steps:
            mean = loss.detach().clone()
            dist.all_reduce(mean)  # every rank: the global batch's loss
            if rank == 0:
                print(f"step {done:4d}  loss {float(mean) / world:.4f}", flush=True)
    save(model=model, opt=opt, step=max(start, args.steps), folder=args.checkpoint)
    if rank == 0:
        print(f"saved DCP checkpoint {args.checkpoint} at step {max(start, args.steps)}", flush=True)
    influence(model=model, data=data, chars=chars, args=args, rank=rank, device=device)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
