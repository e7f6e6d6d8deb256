"""Sharding planner for distributed K-FAC: which rank decomposes, preconditions and holds what.

Pure Python at plan time: nothing here touches ``torch.distributed``, and torch itself is only imported lazily by
:func:`calibrate` and :func:`layer_specs`. Every rank computes the same :class:`Plan` from the same inputs;
compare :meth:`Plan.digest` across ranks at start-up. Typical use::

    from kfac.planner import LayerSpec, make_plan
    specs = [LayerSpec(e.name, e.a_dim, e.g_dim, e.a_diagonal) for e in preconditioner.store.values()]
    plan = make_plan(specs, world_size=64, strategy="dp-kfac", factor_update_steps=1, inv_update_steps=10)
    plan.owner("layer4.0.conv2", "A"), plan.grad_source("fc", rank), plan.summary()

Command line: ``python -m kfac.planner --model resnet50 --world-size 64 --strategy dp-kfac --compare``.

Modules (imports only point down): :mod:`~kfac.planner.cost` (layer shapes, cost model) and
:mod:`~kfac.planner.assign` (LPT and the baselines, on plain numbers) <- :mod:`~kfac.planner.plan` (the
:class:`Plan` data model, imports ``cost`` only) <- :mod:`~kfac.planner.search` (:func:`make_plan`);
:mod:`~kfac.planner.sharded` describes a plan of an FSDP2 / HSDP model (``--shard-size`` on the command line).
"""

from .assign import MemoryCapError, lpt
from .cost import METHODS, CostModel, LayerSpec, cache_path, calibrate, layer_specs
from .plan import STRATEGIES, CommBytes, LayerAssignment, Plan, grad_workers_per_layer
from .search import ASSIGNERS, default_strategy, make_plan
from .sharded import ShardedView, sharded_strategy, sharded_view

__all__ = [
    "LayerSpec", "CostModel", "Plan", "LayerAssignment", "CommBytes", "make_plan", "calibrate", "layer_specs",
    "STRATEGIES", "ASSIGNERS", "METHODS", "default_strategy", "grad_workers_per_layer", "MemoryCapError",
    "cache_path", "lpt", "ShardedView", "sharded_strategy", "sharded_view",
]
