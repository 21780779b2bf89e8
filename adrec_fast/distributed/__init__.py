# SPDX-License-Identifier: Apache-2.0
"""Distributed training on ``torch.distributed``: embedding tables sharded table-wise over the
ranks, dense towers under DDP, each rank on its own share of every global batch.

A run, on every rank (started by torchrun, or with its environment set by hand)::

    ctx = init_from_env(timeout_s=300)                 # gloo on CPU, NCCL on CUDA
    torch.manual_seed(seed); model = build_model(...)  # the same model on every rank
    check_same_config(ctx, model=model.config, schema=schema.to_dict(), seed=seed)
    shard_model(model, ctx)                            # tables -> their owners
    global_batch_dropout(model, ctx)                   # optional: one process's dropout masks
    global_batch_norm(model, ctx)                      # optional: batch norm over the global batch
    ddp = wrap_ddp(model, ctx)
    opt = torch.optim.Adam(ddp.parameters())           # the dense parameters
    for batch in global_batches:
        part = local_batch(batch, ctx)
        with ctx.guard("a training step"):             # a lost peer -> PeerFailure
            loss = model.loss(ddp(part), part.labels)
            opt.zero_grad(); loss.backward(); opt.step()   # tables updated inside backward
    save_sharded(run_dir, model, ctx, optimizer=opt)   # each rank its tables, rank 0 the rest

Dynamic tables (``vocab: dynamic``) are sharded by key instead (``ShardedDynamicEmbedding``,
owner ``owner_of(key, world)``), by the same ``shard_model``.

A saved run loads onto any number of ranks, with another plan (``load_sharded`` then
``load_optimizer``), or in one process with ``adrec_fast.models.load_model`` as it is.
``unshard_model(model)`` puts full tables back on every rank instead.
"""
from .checkpoint import load_optimizer, load_sharded, save_sharded
from .dynamic import ShardedDynamicEmbedding, owner_of
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
    GlobalBatchDropout,
    GlobalBatchNorm,
    ShardedEmbeddingBagCollection,
    global_batch_dropout,
    global_batch_norm,
    local_batch,
    local_rows,
    model_plans,
    shard_model,
    unshard_model,
    wrap_ddp,
)

__all__ = [
    "ConfigMismatch",
    "DistContext",
    "Exchange",
    "GlobalBatchDropout",
    "GlobalBatchNorm",
    "PeerFailure",
    "ShardedDynamicEmbedding",
    "ShardedEmbeddingBagCollection",
    "ShardingPlan",
    "access_from_batch",
    "check_same_config",
    "fingerprint",
    "global_batch_dropout",
    "global_batch_norm",
    "init_from_env",
    "local_batch",
    "load_optimizer",
    "load_sharded",
    "local_rows",
    "model_plans",
    "owner_of",
    "plan_tables",
    "probe_all_to_all",
    "save_sharded",
    "shard_model",
    "unshard_model",
    "wrap_ddp",
]
