# SPDX-License-Identifier: Apache-2.0
"""Optional peer libraries of the benchmarks (FBGEMM TBE, TorchRec), imported on demand.

Each loader returns a dict of the classes a benchmark uses; ``optional(loader)`` turns an import
failure into ``(None, reason)`` so the peer is skipped with a message instead of failing the run.
"""
from __future__ import annotations

import warnings


def import_fbgemm():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import fbgemm_gpu  # noqa: F401
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
            EmbeddingLocation,
            PoolingMode,
        )
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            SplitTableBatchedEmbeddingBagsCodegen,
        )
    return dict(
        TBE=SplitTableBatchedEmbeddingBagsCodegen, ComputeDevice=ComputeDevice,
        EmbeddingLocation=EmbeddingLocation, PoolingMode=PoolingMode, OptimType=EmbOptimType,
        version=getattr(fbgemm_gpu, "__version__", "?"),
    )


def import_torchrec():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torchrec
        import torchrec.optim as trec_optim
        from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
        from torchrec.modules.embedding_modules import EmbeddingBagCollection
        from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    return dict(
        EBC=EmbeddingBagCollection, FusedEBC=FusedEmbeddingBagCollection,
        Config=EmbeddingBagConfig, PoolingType=PoolingType, KJT=KeyedJaggedTensor,
        RowWiseAdagrad=trec_optim.RowWiseAdagrad, version=getattr(torchrec, "__version__", "?"),
    )


def optional(loader):
    try:
        return loader(), None
    except Exception as e:  # noqa: BLE001 - any import failure makes the peer optional
        return None, f"{type(e).__name__}: {e}".splitlines()[0][:300]
