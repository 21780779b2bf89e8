# SPDX-License-Identifier: Apache-2.0
"""The process group of a distributed run: set up from torchrun's environment, with a timeout
on every collective, a start-up check that all ranks run the same configuration, and one
translation of a failed collective into an error that says a peer rank is gone."""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

#: torchrun sets these for every rank; a run started by hand must set them too
ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
#: long enough for a slow step on a loaded machine, short enough that a dead or hung rank
#: ends the run instead of holding every other rank forever
DEFAULT_TIMEOUT_S = 300.0


class PeerFailure(RuntimeError):
    """A collective failed: another rank died, or stopped answering within the timeout."""


class ConfigMismatch(ValueError):
    """The ranks of one run were started with different configurations."""


@dataclass
class DistContext:
    """Where this process sits in the run and the groups it talks through.

    ``group`` is the default group (DDP's gradient all-reduce); ``emb_group`` carries the
    embedding exchange, so its collectives never interleave with DDP's asynchronous ones in one
    queue (both must be issued in the same order on every rank, which the autograd engine does
    not promise across two independent streams of work).
    """

    rank: int
    world: int
    local_rank: int
    backend: str
    device: torch.device
    timeout_s: float
    group: object
    emb_group: object

    @contextlib.contextmanager
    def guard(self, what: str):
        """Run a block of collectives; a transport error or timeout in it becomes a
        ``PeerFailure`` that names this rank, ``what`` was running and the timeout."""
        try:
            yield
        except PeerFailure:
            raise
        except RuntimeError as e:
            if not is_comm_error(e):
                raise
            raise PeerFailure(
                f"rank {self.rank} of {self.world}: {what} failed: another rank died or did not "
                f"answer within the {self.timeout_s:g} s timeout ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else e!r})"
            ) from e

    def destroy(self) -> None:
        """Leave the process group (call once, at the end of a run that succeeded)."""
        if dist.is_initialized():
            dist.destroy_process_group()


def is_comm_error(e: BaseException) -> bool:
    """Whether ``e`` comes from the communication layer (a dead peer, a timeout), as opposed
    to a bug in the code between two collectives."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e).lower()
    return any(k in text for k in ("gloo", "nccl", "timed out", "timeout", "connection closed",
                                   "connection reset", "broken pipe"))


def _env_int(name: str) -> int:
    raw = os.environ.get(name)
    if raw is None:
        raise RuntimeError(f"distributed run: environment variable {name} is not set; start the "
                           f"ranks with torchrun, or set {', '.join(ENV_VARS)} by hand")
    try:
        return int(raw)
    except ValueError:
        raise RuntimeError(f"distributed run: {name}={raw!r} is not an integer") from None


def init_from_env(device: str | torch.device | None = None,
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Join the run described by torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``, optional ``LOCAL_RANK``), or use the process group the
    caller already made.

    The backend follows the device: NCCL on CUDA (``cuda:LOCAL_RANK``), gloo on the CPU.
    ``device=None`` picks CUDA when available. Every collective of the run fails after
    ``timeout_s`` seconds instead of waiting forever (a dead peer on gloo fails at once, when its
    connection closes).
    """
    if not dist.is_available():
        raise RuntimeError("distributed run: this torch build has no torch.distributed")
    if not timeout_s > 0:
        raise ValueError(f"distributed run: timeout_s must be > 0, got {timeout_s}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"distributed run: device must be cpu or cuda, got {device}")
    timeout = datetime.timedelta(seconds=float(timeout_s))
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    else:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise RuntimeError(f"distributed run: environment variable {name} is not set; "
                                   f"start the ranks with torchrun, or set {', '.join(ENV_VARS)}")
        rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
        if world < 1:
            raise RuntimeError(f"distributed run: WORLD_SIZE must be >= 1, got {world}")
        if not 0 <= rank < world:
            raise RuntimeError(f"distributed run: RANK={rank} is outside [0, WORLD_SIZE={world})")
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=timeout)
    elif dist.get_backend() != backend:
        raise RuntimeError(f"distributed run: the existing process group uses "
                           f"{dist.get_backend()}, but device {device} needs {backend}")
    emb_group = dist.new_group(backend=backend, timeout=timeout)
    return DistContext(rank=rank, world=world, local_rank=local_rank, backend=backend,
                       device=device, timeout_s=float(timeout_s), group=dist.group.WORLD,
                       emb_group=emb_group)


def fingerprint(obj) -> str:
    """A short stable hash of a JSON-able value (a schema's dict, a model config)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _short(value):
    """``value`` in JSON form (tuples as lists), or its fingerprint when that is long."""
    text = json.dumps(value, sort_keys=True, default=str)
    return json.loads(text) if len(text) <= 80 else f"fingerprint {fingerprint(value)}"


def check_same_config(ctx: DistContext, **items) -> None:
    """Raise ``ConfigMismatch`` on every rank when any ``items`` value differs between ranks.

    ``items`` maps a name ("model", "schema", "seed", ...) to a JSON-able value; a dict is
    compared key by key, and a long value by its ``fingerprint``. The world size and the torch
    version are always part of the check. The message names each differing item and every
    rank's value, and all ranks raise the same error (they compare the same gathered list), so
    none is left waiting.
    """
    mine = {"world size": ctx.world, "torch": torch.__version__}
    for name, value in items.items():
        if isinstance(value, dict):  # compared key by key, so a message names the key
            mine[name] = {str(k): _short(v) for k, v in value.items()}
        else:
            mine[name] = _short(value)
    everyone: list = [None] * ctx.world
    with ctx.guard("the start-up configuration check"):
        dist.all_gather_object(everyone, mine, group=ctx.group)
    bad = []
    for name in mine:
        values = [r.get(name, "<missing>") for r in everyone]
        if all(isinstance(v, dict) for v in values):
            keys = sorted(set().union(*values), key=str)
            parts = [(f"{name}: {k}", [v.get(k, "<missing>") for v in values]) for k in keys]
        else:
            parts = [(name, values)]
        for label, vals in parts:
            if any(v != vals[0] for v in vals[1:]):
                per_rank = ", ".join(f"rank {r} has {v!r}" for r, v in enumerate(vals))
                bad.append(f"{label}: {per_rank}")
    for r, theirs in enumerate(everyone):
        extra = sorted(set(theirs) - set(mine))
        if extra:
            bad.append(f"rank {r} checks items that rank {ctx.rank} does not: {extra}")
    if bad:
        raise ConfigMismatch("distributed run: the ranks were started with different "
                             "configurations: " + "; ".join(bad))
