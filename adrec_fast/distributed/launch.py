# SPDX-License-Identifier: Apache-2.0
"""Start N ranks of a command under torchrun, for the user:

    python -m adrec_fast.distributed.launch --nproc 2 -- train data.csv --model dlrm --out runs/x

runs ``python -m torch.distributed.run --nproc-per-node 2 --standalone -m adrec_fast train ...``
(``--module`` names another module to run, ``--script`` a file). On one machine the rendezvous
is torchrun's ``--standalone`` (a free local port). Across machines, run the same command on
every machine with torchrun's usual rendezvous flags, which are passed through::

    --nnodes 2 --node-rank 0 --rdzv-backend c10d --rdzv-endpoint host0:29400 --rdzv-id job1

Each rank gets ``OMP_NUM_THREADS`` = this machine's cores // nproc (at least 1) unless it is set
already, so N ranks on one machine do not each start a thread per core. The exit code is
torchrun's: non-zero when any rank failed (torchrun then stops the others).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence

#: torchrun's flags that ``launch`` passes through (multi-machine rendezvous)
RDZV_FLAGS = ("nnodes", "node_rank", "rdzv_backend", "rdzv_endpoint", "rdzv_id", "master_addr",
              "master_port", "max_restarts")


def torchrun_command(nproc: int, argv: Sequence[str], module: str | None = "adrec_fast",
                     script: str | None = None, **rdzv) -> list[str]:
    """The torchrun command line that starts ``nproc`` ranks of ``module`` (or ``script``) with
    ``argv``; ``rdzv`` holds torchrun's rendezvous flags (``RDZV_FLAGS``, None = unset)."""
    if int(nproc) < 1:
        raise ValueError(f"launch: --nproc must be >= 1, got {nproc}")
    unknown = set(rdzv) - set(RDZV_FLAGS)
    if unknown:
        raise ValueError(f"launch: unknown torchrun flags {sorted(unknown)} (known: "
                         f"{', '.join(RDZV_FLAGS)})")
    if (module is None) == (script is None):
        raise ValueError("launch: give exactly one of a module and a script to run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(int(nproc))]
    given = {k: v for k, v in rdzv.items() if v is not None}
    if not given.get("rdzv_endpoint") and not given.get("master_addr") and \
            int(given.get("nnodes", 1) or 1) == 1:
        cmd.append("--standalone")  # one machine: torchrun picks a free local port
    for k, v in given.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    cmd += ["-m", module] if module is not None else [script]
    return cmd + list(argv)


def rank_threads(nproc: int) -> int:
    """Threads per rank when ``nproc`` ranks share this machine's cores."""
    return max(1, (os.cpu_count() or 1) // max(1, int(nproc)))


def launch(nproc: int, argv: Sequence[str], module: str | None = "adrec_fast",
           script: str | None = None, env: dict | None = None, **rdzv) -> int:
    """Run ``torchrun_command(...)`` and wait for it; returns its exit code."""
    cmd = torchrun_command(nproc, argv, module, script, **rdzv)
    env = dict(os.environ if env is None else env)
    env.setdefault("OMP_NUM_THREADS", str(rank_threads(nproc)))
    return subprocess.run(cmd, env=env).returncode


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        cut = argv.index("--")
        ours, rest = argv[:cut], argv[cut + 1:]
    else:
        ours, rest = argv, []
    p = argparse.ArgumentParser(
        prog="python -m adrec_fast.distributed.launch",
        description="Start N ranks of `adrec_fast <args>` (or --module / --script) under "
                    "torchrun. Everything after `--` goes to the ranks.")
    p.add_argument("--nproc", type=int, required=True, help="ranks on this machine")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--module", default=None, help="module to run (default: adrec_fast)")
    what.add_argument("--script", default=None, help="Python file to run instead of a module")
    for flag in RDZV_FLAGS:
        p.add_argument(f"--{flag.replace('_', '-')}", dest=flag, default=None,
                       help="passed to torchrun")
    a = p.parse_args(ours)
    if not rest:
        p.error("nothing to run: give the ranks' arguments after `--`")
    module = a.module if a.module or a.script else "adrec_fast"
    try:
        return launch(a.nproc, rest, module, a.script,
                      **{k: getattr(a, k) for k in RDZV_FLAGS})
    except ValueError as e:
        p.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
