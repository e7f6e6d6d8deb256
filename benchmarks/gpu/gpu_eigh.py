"""Time torch.linalg.eigh / Cholesky inverse on the GPU for K-FAC factor sizes of ResNet-50 (each linalg backend)."""
import sys
import time

import torch

sizes = [int(s) for s in sys.argv[1:]] or [256, 577, 1024, 1153, 2048, 2305, 4609]
dev = torch.device("cuda")
for lib in ("cusolver", "magma"):
    try:
        torch.backends.cuda.preferred_linalg_library(lib)
    except Exception as exc:  # noqa: BLE001
        print(lib, "unavailable:", exc)
        continue
    for n in sizes:
        x = torch.randn(n, 2 * n, device=dev)
        m = x @ x.T / (2 * n) + 1e-3 * torch.eye(n, device=dev)
        for what, fn in (("eigh", lambda: torch.linalg.eigh(m)),
                         ("cholesky_inverse", lambda: torch.cholesky_inverse(torch.linalg.cholesky(m)))):
            try:
                fn()
                torch.cuda.synchronize()
                ts = []
                for _ in range(3):
                    t = time.perf_counter()
                    fn()
                    torch.cuda.synchronize()
                    ts.append(time.perf_counter() - t)
                print(f"{lib:9s} {what:17s} n={n:5d} {1e3 * sorted(ts)[1]:9.2f} ms")
            except Exception as exc:  # noqa: BLE001
                print(lib, what, n, "failed:", type(exc).__name__, str(exc)[:100])
