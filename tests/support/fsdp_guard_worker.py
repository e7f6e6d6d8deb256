"""One gloo process: a model with FSDP2's ``fully_shard`` on its first layer. ``kfac.KFAC`` refuses the DTensor
shards with a clear error (not ``aten.mm ... mixed torch.Tensor and DTensor`` at the first step), and trains the
rest when the sharded module is skipped. Prints what it saw; run by tests/integration/test_fsdp_guard.py."""

import tempfile

import torch
import torch.distributed as dist
from torch import nn

import kfac
try:
    from torch.distributed.fsdp import fully_shard
except ImportError:
    from torch.distributed._composable.fsdp import fully_shard
from torch.distributed.device_mesh import init_device_mesh
f = tempfile.mktemp()
dist.init_process_group("gloo", init_method=f"file://{f}", rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
fully_shard(model[0], mesh=mesh)
try:
    kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1))
except ValueError as e:
    print("ERROR:", e)
opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), skip_layers=["0"])
model(torch.randn(3, 4)).sum().backward()
opt.step()
print("LAYERS:", opt.preconditioner.layers)
dist.destroy_process_group()
