# SPDX-License-Identifier: Apache-2.0
"""Reading safetensors files: every reader of the package's files (checkpoints, dynamic tables,
text caches) goes through here, so a file that is not one fails the same way, naming it."""
from __future__ import annotations


def _unreadable(file, e) -> ValueError:
    return ValueError(f"{file}: not a readable safetensors file, truncated or corrupt ({e})")


def read_tensors(file) -> dict:
    """The tensors of the safetensors file ``file``; a ValueError naming the file when it is
    not one (truncated, corrupt, another format)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except SafetensorError as e:
        raise _unreadable(file, e) from None


def read_metadata(file) -> dict:
    """The string metadata of the safetensors file ``file`` ({} when it has none); a ValueError
    naming the file when it is not one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return f.metadata() or {}
    except SafetensorError as e:
        raise _unreadable(file, e) from None
