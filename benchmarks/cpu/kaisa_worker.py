"""KAISA (kfac-pytorch) timing worker for ``step_overhead.py`` -- a separate process, because KAISA's package is
also called ``kfac``.

Started by the benchmark with ``PYTHONPATH=<KAISA checkout>`` and the path of a ``torch.save`` file holding the
model (already initialised like the benchmark's own copies) and the synthetic batch pool. It never imports this
repository. It reads one JSON command per line on stdin and answers one JSON line on stdout:

* ``{"cmd": "steps", "steps": n}``: run ``n`` training steps (``zero_grad``, forward, cross-entropy, backward,
  ``KFACPreconditioner.step()``, ``SGD.step()``) with the garbage collector paused; answer ``{"seconds": s,
  "first_step": k}`` (``k``: steps done before these);
* ``{"cmd": "quit"}``: exit.

The first line it writes is ``{"ready": true, "kaisa": <KAISA's kfac.__file__>, "version": ...}`` (or
``{"error": ...}``).
"""

from __future__ import annotations

import gc
import json
import sys
import time
import traceback


def main() -> int:
    import torch
    import torch.nn.functional as F

    spec = json.loads(sys.argv[1])
    torch.set_num_threads(int(spec["threads"]))
    try:
        import kfac  # KAISA's package, from PYTHONPATH
        from kfac.enums import ComputeMethod
        from kfac.preconditioner import KFACPreconditioner

        payload = torch.load(spec["payload"], weights_only=False)
        model, batches = payload["model"], payload["batches"]
        model.train()
        opt = torch.optim.SGD(model.parameters(), **spec["sgd"])
        pre = KFACPreconditioner(model, factor_update_steps=spec["factor_update_steps"],
                                 inv_update_steps=spec["inv_update_steps"], lr=spec["sgd"]["lr"],
                                 compute_method=ComputeMethod[spec["method"].upper()], **spec["kfac"])
    except Exception:
        print(json.dumps({"error": traceback.format_exc()}), flush=True)
        return 1
    print(json.dumps({"ready": True, "kaisa": kfac.__file__, "version": getattr(kfac, "__version__", None)}),
          flush=True)
    cursor = done = 0
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        n = int(cmd["steps"])
        gc.collect()
        gc.disable()
        try:
            t0 = time.perf_counter()
            for _ in range(n):
                x, y = batches[cursor]
                cursor = (cursor + 1) % len(batches)
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                pre.step()
                opt.step()
            seconds = time.perf_counter() - t0
        finally:
            gc.enable()
        print(json.dumps({"seconds": seconds, "first_step": done}), flush=True)
        done += n
    return 0


if __name__ == "__main__":
    sys.exit(main())
