# SPDX-License-Identifier: Apache-2.0
"""Distributed training on ``torch.distributed``: embedding tables sharded table-wise over the
ranks, dense towers under DDP, each rank on its own share of every global batch.

A run, on every rank (started by torchrun, or with its environment set by hand)::

    ctx = init_from_env(timeout_s=300)                 # gloo on CPU, NCCL on CUDA
    torch.manual_seed(seed); model = build_model(...)  # the same model on every rank
    check_same_config(ctx, model=model.config, schema=schema.to_dict(), seed=seed)
    shard_model(model, ctx)                            # tables -> their owners
    ddp = wrap_ddp(model, ctx)
    opt = torch.optim.Adam(ddp.parameters())           # the dense parameters
    for batch in global_batches:
        part = local_batch(batch, ctx)
        with ctx.guard("a training step"):             # a lost peer -> PeerFailure
            loss = model.loss(ddp(part), part.labels)
            opt.zero_grad(); loss.backward(); opt.step()   # tables updated inside backward
    unshard_model(model)                               # full tables on every rank
"""
from .exchange import Exchange, probe_all_to_all
from .planner import ShardingPlan, access_from_batch, plan_tables
from .process_group import (
    ConfigMismatch,
    DistContext,
    PeerFailure,
    check_same_config,
    fingerprint,
    init_from_env,
)
from .sharding import (
    ShardedEmbeddingBagCollection,
    local_batch,
    local_rows,
    shard_model,
    unshard_model,
    wrap_ddp,
)

__all__ = [
    "ConfigMismatch",
    "DistContext",
    "Exchange",
    "PeerFailure",
    "ShardedEmbeddingBagCollection",
    "ShardingPlan",
    "access_from_batch",
    "check_same_config",
    "fingerprint",
    "init_from_env",
    "local_batch",
    "local_rows",
    "plan_tables",
    "probe_all_to_all",
    "shard_model",
    "unshard_model",
    "wrap_ddp",
]
