"""Facts about the GPU and the compiled extension that the GPU step-time benchmark records."""

from __future__ import annotations

import subprocess
from typing import Any

import torch

import kfac


def gpu_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if device.type != "cuda":
        return info
    props = torch.cuda.get_device_properties(device)
    info.update({"gpu_name": props.name, "gpu_total_memory_bytes": props.total_memory,
                 "gpu_capability": f"{props.major}.{props.minor}", "gpu_sm_count": props.multi_processor_count,
                 "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
                 "cudnn_benchmark": torch.backends.cudnn.benchmark})
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20,
                             check=False).stdout.strip()
        info["nvidia_smi"] = out or None
        info["driver"] = out.split(",")[0].strip() if out else None
    except (OSError, subprocess.SubprocessError):
        info["driver"] = None
    return info


def ext_info() -> dict[str, Any]:
    try:
        info = kfac.ext.info()
        return {k: info.get(k) for k in ("available", "disabled", "error", "cuda_kernels", "backend", "build_info")}
    except Exception as exc:  # noqa: BLE001 - informational only
        return {"available": False, "error": repr(exc)}

