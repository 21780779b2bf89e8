# SPDX-License-Identifier: Apache-2.0
"""The checkpoint format, under the name training code has imported it by: it lives in
:mod:`adrec_fast.models.checkpoint`, beside the models, so serving loads models without the
trainer."""
from ..models.checkpoint import (  # noqa: F401
    FORMAT,
    VERSION,
    load_model,
    load_state,
    read_meta,
    resolve,
    save_checkpoint,
)

__all__ = ["FORMAT", "VERSION", "load_model", "load_state", "read_meta", "resolve",
           "save_checkpoint"]
