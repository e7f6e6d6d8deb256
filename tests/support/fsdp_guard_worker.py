"""One gloo process: parameters sharded in ways K-FAC does not model (tensor parallelism's ``Shard(1)``) are a
clear error naming the placements, not ``aten.mm ... mixed torch.Tensor and DTensor`` at the first step; the rest
trains with ``skip_layers``. Prints what it saw; run by tests/integration/test_fsdp_guard.py."""

import tempfile

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

import kfac

f = tempfile.mktemp()
dist.init_process_group("gloo", init_method=f"file://{f}", rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
parallelize_module(model, mesh, {"0": RowwiseParallel()})
try:
    kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1))
except ValueError as e:
    print("ERROR:", e)
opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), skip_layers=["0"])
model(torch.randn(3, 4)).sum().backward()
opt.step()
print("LAYERS:", opt.preconditioner.layers)
dist.destroy_process_group()
