"""How the distributed benchmark starts its ranks: ``spawn`` (torch.multiprocessing, a FileStore, reports
through files) or ``torchrun`` (the script re-executed under ``python -m torch.distributed.run``), each with a
deadline so that a hang fails instead of blocking."""

from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import log
from benchmarks.cpu.strategies.worker import worker


def _entry(rank: int, world: int, out_dir: str, store: str, settings: dict[str, Any],
           fn: Callable[[int, int, dict[str, Any]], dict[str, Any]] = worker) -> None:
    out = Path(out_dir)
    init_rank_threads(settings["threads"])
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=_dt.timedelta(seconds=settings["collective_timeout"]))
    try:
        result: dict[str, Any] = fn(rank, world, settings)
    except Exception:  # noqa: BLE001 -- reported to the parent through the result file
        result = {"error": traceback.format_exc()}
    tmp = out / f"rank{rank}.json.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out / f"rank{rank}.json")
    try:  # orderly teardown: nobody leaves while a peer still talks to it
        dist.barrier()
    finally:
        dist.destroy_process_group()



def launch(world: int, settings: dict[str, Any], deadline_s: float,
           fn: Callable[[int, int, dict[str, Any]], dict[str, Any]] = worker) -> list[dict[str, Any]]:
    """Run ``fn(rank, world, settings)`` (a module-level function; default :func:`worker`) on ``world`` gloo
    processes; return each rank's report (raise on failure/deadline)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(settings["threads"]))  # inherited by the spawned processes
    os.environ.setdefault("MKL_NUM_THREADS", str(settings["threads"]))
    with tempfile.TemporaryDirectory(prefix="kfac_dist_bench_") as tmp:
        out = Path(tmp)
        store = out / f"pg_store_{uuid.uuid4().hex}"  # a FileStore file must be fresh for each process group
        ctx = mp.start_processes(_entry, args=(world, str(out), str(store), settings, fn), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + deadline_s
        try:
            while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"benchmark did not finish within --deadline {deadline_s:.0f} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        reports = []
        for r in range(world):
            path = out / f"rank{r}.json"
            if not path.exists():
                raise RuntimeError(f"rank {r} wrote no result")
            data = json.loads(path.read_text())
            if "error" in data:
                raise RuntimeError(f"rank {r} failed:\n{data['error']}")
            reports.append(data)
    return reports



def under_torchrun() -> bool:
    """Whether this process is a rank started by torchrun (``torch.distributed.run`` sets these variables)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ)



def torchrun_command(script: Path, world_size: int, argv: list[str]) -> list[str]:
    """The command that re-executes ``script`` under torchrun (``python -m torch.distributed.run``)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
            "--max-restarts=0", "--monitor-interval=1", str(script.resolve()), *argv]


def relaunch_with_torchrun(script: Path, argv: list[str], *, world_size: int, threads: int, deadline: float) -> int:
    """``--launcher torchrun`` (default) outside torchrun: run ``script`` again under torchrun, wait for it
    (killing the whole launch after ``deadline`` plus a grace period) and return its exit status. The ranks do
    all the work; rank 0 prints and writes the results."""
    cmd = torchrun_command(script, world_size, argv)
    env = dict(os.environ, GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               KFAC_BENCH_RELAUNCHED="1")
    log("launching: " + shlex.join(cmd))
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)  # own process group: killable as a whole
    limit = deadline + 120.0  # the ranks' own watchdog fires at the deadline; this catches a stuck launcher
    try:
        rc = proc.wait(timeout=limit)
    except BaseException as exc:  # timeout or Ctrl-C: take down torchrun and its ranks (our process group)
        for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        if isinstance(exc, subprocess.TimeoutExpired):
            raise TimeoutError(f"torchrun launch did not finish within {limit:.0f} s") from None
        raise
    if rc != 0:
        log(f"torchrun exited with status {rc}")
    return rc


def start_watchdog(seconds: float, rank: int) -> threading.Timer:
    """Abort this rank (exit status 124) after ``seconds``: torchrun then stops the others (max-restarts=0)."""
    def fire() -> None:
        sys.stderr.write(f"rank {rank}: benchmark did not finish within --deadline {seconds:.0f} s, aborting\n")
        sys.stderr.flush()
        os._exit(124)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer



def torchrun_launcher(world: int) -> dict[str, Any]:
    """What the JSON records under ``launcher`` for a rank started by torchrun (by the script or by the user)."""
    relaunched = os.environ.get("KFAC_BENCH_RELAUNCHED") == "1"
    return {
        "name": "torchrun",
        "how": ("python -m torch.distributed.run --standalone (c10d rendezvous, env://), "
                + ("re-executed by benchmarks/cpu/distributed.py --launcher torchrun" if relaunched
                   else "invoked directly by the user")),
        "relaunched_by_script": relaunched,
        "run_id": os.environ.get("TORCHELASTIC_RUN_ID"), "world_size": world,
        "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", world)),
        "max_restarts": os.environ.get("TORCHELASTIC_MAX_RESTARTS"),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "GLOO_SOCKET_IFNAME",
                                               "MASTER_ADDR")},
    }


def init_rank_threads(threads: int) -> None:
    """``threads`` intra-op threads and one inter-op thread in this rank (when not already fixed)."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
