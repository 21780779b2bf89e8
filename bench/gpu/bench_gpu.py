# SPDX-License-Identifier: Apache-2.0
"""GPU benchmark driver for bench/gpu/run_device_checks.sh.

Measures the device-to-device copy bandwidth (bytes read + written), then times every op
against PyTorch eager and torch.compile on Criteo-like shapes (T=26 tables, D=64, B=65536; 1 and
10-20 ids per field), and reports GB/s over the fewest bytes each op must move and the % of the
copy bandwidth. Prints a short table last and writes it (plus JSON) to --out.

``--dry-run`` runs the same code on CPU tensors under TRITON_INTERPRET=1 at tiny shapes, with
wall-clock timing: it checks the plumbing, its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch


def parse():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--budget-s", type=float, default=200.0, help="skip what would start later")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile providers")
    return ap.parse_args()


ARGS = parse()
DRY = ARGS.dry_run
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"

from adrec_fast.kernels import embedding_bag as keb

import adrec_fast
from adrec_fast import functional as F
from adrec_fast import reference as R

DEV = "cpu" if DRY else "cuda"
CUDA_BUILT = adrec_fast._C.build_info()["cuda"]
START = time.time()
ROWS = []  # result rows


def over_budget() -> bool:
    return time.time() - START > ARGS.budget_s


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def bench(fn, setup=None, reps=None) -> float:
    """Median seconds of fn(); setup() runs before each timed call, untimed."""
    if DEV == "cuda" and setup is None:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
    reps = reps or (1 if DRY else 20)
    times = []
    for i in range(reps + 1):
        if setup is not None:
            setup()
        sync()
        if DEV == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            t = a.elapsed_time(b) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            t = time.perf_counter() - t0
        if i:  # first call is the warm-up
            times.append(t)
    return statistics.median(times)


def record(op, shape, provider, seconds, nbytes, copy_bw, note=""):
    gbs = nbytes / seconds / 1e9 if seconds and seconds > 0 else float("nan")
    row = dict(op=op, shape=shape, provider=provider, ms=seconds * 1e3 if seconds else float("nan"),
               GBps=gbs, pct_copy=100 * gbs / copy_bw if copy_bw else float("nan"), note=note)
    ROWS.append(row)
    print(f"  {op:<22} {shape:<14} {provider:<20} {row['ms']:9.3f} ms {gbs:8.1f} GB/s "
          f"{row['pct_copy']:6.1f}% {note}", flush=True)


def run(op, shape, provider, fn, nbytes, copy_bw, setup=None, check=None):
    if over_budget():
        record(op, shape, provider, None, nbytes, copy_bw, "skipped: time budget")
        return
    try:
        if check is not None:
            check()
        t = bench(fn, setup)
        record(op, shape, provider, t, nbytes, copy_bw)
    except Exception as e:  # a provider that fails must not hide the others
        record(op, shape, provider, None, nbytes, copy_bw, f"FAILED: {type(e).__name__}: {e}"[:160])


def copy_bandwidth() -> float:
    n = (2 << 30) // 4 if not DRY else 1 << 20  # 2 GiB of fp32
    a = torch.randn(n, device=DEV)
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a))
    bw = 2 * a.numel() * 4 / t / 1e9
    print(f"device-to-device copy: {2 * a.numel() * 4 / 1e9:.2f} GB moved in {t * 1e3:.3f} ms "
          f"= {bw:.0f} GB/s (read + write)", flush=True)
    return bw


def maybe_compile(fn):
    if ARGS.no_compile or DRY:
        return None
    return torch.compile(fn, dynamic=False)


# ---------------------------------------------------------------- embedding bag
def make_tbe(T, rows, B, lo, hi, D, dtype=torch.float32):
    w = torch.randn(T * rows, D, device=DEV, dtype=dtype) * 0.01
    tofs = torch.arange(T + 1, device=DEV, dtype=torch.long) * rows
    lengths = torch.randint(lo, hi + 1, (T * B,), device=DEV)
    offsets = torch.zeros(T * B + 1, dtype=torch.long, device=DEV)
    offsets[1:] = lengths.cumsum(0)
    nnz = int(offsets[-1])
    indices = torch.randint(0, rows, (nnz,), device=DEV)
    return w, tofs, indices, offsets


def bench_embedding(copy_bw):
    T, D = (26, 64) if not DRY else (3, 16)
    B, rows = (65536, 1_000_000) if not DRY else (4, 50)
    for lo, hi in ((1, 1), (10, 20)):
        _bench_embedding_shape(copy_bw, T, D, B, rows, lo, hi)
        if DEV == "cuda":
            torch.cuda.empty_cache()


def _bench_embedding_shape(copy_bw, T, D, B, rows, lo, hi):
    shape = f"L={lo}" if lo == hi else f"L={lo}-{hi}"
    w, tofs, idx, ofs = make_tbe(T, rows, B, lo, hi, D)
    nnz = idx.numel()
    fwd_bytes = nnz * (D * 4 + 8) + B * T * D * 4 + ofs.numel() * 8
    # Minimal bytes of a training step: the forward, grad_out once, each unique row read and
    # written once (+ its state for row-wise Adagrad).
    tbl = torch.repeat_interleave(torch.arange(T * B, device=DEV) // B, ofs[1:] - ofs[:-1])
    grow = tofs[tbl] + idx  # [nnz] global rows
    U = int(torch.unique(grow).numel())
    step_bytes = fwd_bytes + B * T * D * 4 + nnz * 8 + 2 * U * D * 4
    step_bytes_ada = step_bytes + 2 * U * 4
    ref_out = R.embedding_bag(w, tofs, idx, ofs, None, 0)

    def check_fwd(fn):
        return lambda: torch.testing.assert_close(fn(), ref_out)

    # forward
    trit = lambda: keb.embedding_bag_fwd(w, tofs, idx, ofs, None, 0)
    trit_nc = lambda: keb.embedding_bag_fwd(w, tofs, idx, ofs, None, 0, check=False)
    run("emb_fwd", shape, "triton", trit, fwd_bytes, copy_bw, check=check_fwd(trit))
    run("emb_fwd", shape, "triton(no idcheck)", trit_nc, fwd_bytes, copy_bw)
    if CUDA_BUILT and DEV == "cuda":
        cu = lambda: torch.ops.adrec.embedding_bag(w, tofs, idx, ofs, None, 0)
        run("emb_fwd", shape, "cuda", cu, fwd_bytes, copy_bw, check=check_fwd(cu))
    # eager peer: one concatenated nn.EmbeddingBag over global row ids (T*B bags)
    ebag = torch.nn.EmbeddingBag.from_pretrained(w, mode="sum", freeze=False, sparse=True)
    o32 = ofs[:-1]

    def eager_fwd():
        return ebag(grow, o32).reshape(T, B, D).transpose(0, 1).reshape(B, T * D)

    run("emb_fwd", shape, "eager nn.EmbeddingBag", eager_fwd, fwd_bytes, copy_bw,
        check=check_fwd(eager_fwd))
    run("emb_fwd", shape, "eager reference", lambda: R.embedding_bag(w, tofs, idx, ofs, None, 0),
        fwd_bytes, copy_bw)
    comp = maybe_compile(eager_fwd)
    if comp is not None:
        run("emb_fwd", shape, "compile nn.EmbeddingBag", comp, fwd_bytes, copy_bw,
            check=check_fwd(comp))

    # training step: forward + backward + optimizer update of the touched rows
    g = torch.randn(B, T * D, device=DEV) * 1e-3
    state = torch.zeros(T * rows, device=DEV)
    for opt_name, opt, nbytes in (("sgd", 0, step_bytes), ("rowwise_adagrad", 1, step_bytes_ada)):
        def trit_step():
            keb.embedding_bag_fwd(w, tofs, idx, ofs, None, 0)
            keb.embedding_bag_bwd_update(g, w, state, tofs, idx, ofs, None, 0, opt, 0.01, 1e-8)

        run(f"emb_step_{opt_name}", shape, "triton", trit_step, nbytes, copy_bw)
        if CUDA_BUILT and DEV == "cuda":
            def cu_step():
                torch.ops.adrec.embedding_bag(w, tofs, idx, ofs, None, 0)
                torch.ops.adrec.embedding_bag_bwd_update(
                    g, w, state, tofs, idx, ofs, None, 0, opt, 0.01, 1e-8)

            run(f"emb_step_{opt_name}", shape, "cuda", cu_step, nbytes, copy_bw)
        torch_opt = (torch.optim.SGD(ebag.parameters(), lr=0.01) if opt == 0 else
                     torch.optim.Adagrad(ebag.parameters(), lr=0.01))

        def eager_step():
            torch_opt.zero_grad(set_to_none=True)
            out = eager_fwd()
            out.backward(g)
            torch_opt.step()

        # torch's Adagrad is element-wise (dense [N, D] state): the nearest eager peer.
        run(f"emb_step_{opt_name}", shape, "eager nn.EmbeddingBag+sparse " +
            ("SGD" if opt == 0 else "Adagrad"), eager_step, nbytes, copy_bw)
        del torch_opt


# ---------------------------------------------------------------- dense ops
def bench_dense(copy_bw):
    B = 65536 if not DRY else 16
    Fn, D = (27, 64) if not DRY else (5, 16)
    el = 4

    def fwdbwd(fn, inputs, extra=()):
        def go():
            out = fn(*inputs, *extra)
            out.backward(torch.ones_like(out))
        return go

    def providers(op, shape, fn_public, fn_ref, make_inputs, extra, nbytes):
        # GPU: the public function with ADREC_BACKEND=triton (triton_op + autograd). Dry run:
        # on CPU tensors the triton_op runs the reference, so call the launchers instead.
        os.environ["ADREC_BACKEND"] = "triton"
        ins = make_inputs()
        go = _launchers_fwdbwd(op, ins, extra) if DRY else fwdbwd(fn_public, ins, extra)
        run(op, shape, "triton", go, nbytes, copy_bw)
        ins = make_inputs()
        run(op, shape, "eager reference", fwdbwd(fn_ref, ins, extra), nbytes, copy_bw)
        comp = maybe_compile(fn_ref)
        if comp is not None:
            ins = make_inputs()
            run(op, shape, "compile reference", fwdbwd(comp, ins, extra), nbytes, copy_bw)

    shape = f"B={B} F={Fn} D={D}"

    def emb():
        return [torch.randn(B, Fn, D, device=DEV, requires_grad=True)]

    # fwd+bwd: read emb twice (fwd, bwd), write grad once; outputs are small.
    providers("fm_interaction", shape, F.fm_interaction, R.fm_interaction, emb, (),
              3 * B * Fn * D * el)
    providers("dot_interaction", shape, F.dot_interaction, R.dot_interaction, emb, (False,),
              3 * B * Fn * D * el + 2 * B * Fn * (Fn - 1) // 2 * el)
    K = 512 if not DRY else 32

    def cross_in():
        return [torch.randn(B, K, device=DEV, requires_grad=True),
                torch.randn(B, K, device=DEV, requires_grad=True),
                (torch.randn(K, K, device=DEV) / math.sqrt(K)).requires_grad_(True),
                torch.randn(K, device=DEV, requires_grad=True)]

    # GEMM-heavy: 3 GEMMs of 2*B*K*K flops; bytes: x0, x, xw, out, g, gx0, gx (7 B*K tensors).
    providers("cross_layer", f"B={B} K={K}", F.cross_layer, R.cross_layer, cross_in, (),
              7 * B * K * el)
    L, Da = (50, 64) if not DRY else (5, 16)
    Ba = B if not DRY else 4
    offs = torch.arange(Ba + 1, device=DEV) * L

    def attn_in():
        return [torch.randn(Ba, Da, device=DEV, requires_grad=True),
                torch.randn(Ba * L, Da, device=DEV, requires_grad=True)]

    # fwd: keys once; bwd: keys twice + grad_keys once.
    providers("attention_pooling", f"B={Ba} L={L} D={Da}", F.attention_pooling,
              R.attention_pooling if DRY else _attn_ref_vectorized, attn_in, (offs,),
              4 * Ba * L * Da * el)
    Bb = B * 64 if not DRY else 64
    y = (torch.rand(Bb, device=DEV) > 0.5).float()

    def bce_in():
        return [torch.randn(Bb, device=DEV, requires_grad=True)]

    providers("sigmoid_bce", f"B={Bb}", F.sigmoid_bce, R.sigmoid_bce, bce_in, (y,), 3 * Bb * el)
    os.environ.pop("ADREC_BACKEND", None)


def _launchers_fwdbwd(op, ins, extra):
    """Forward + backward through the kernels/ launchers (dry run, interpreter)."""
    from adrec_fast.kernels import attention_pooling as ka
    from adrec_fast.kernels import cross_layer as kc
    from adrec_fast.kernels import dot_interaction as kd
    from adrec_fast.kernels import fm_interaction as kf
    from adrec_fast.kernels import sigmoid_bce as ks

    x = [t.detach() for t in ins]

    def go():
        if op == "fm_interaction":
            out = kf.fm_interaction_fwd(x[0])
            kf.fm_interaction_bwd(torch.ones_like(out), x[0])
        elif op == "dot_interaction":
            out = kd.dot_interaction_fwd(x[0], *extra)
            kd.dot_interaction_bwd(torch.ones_like(out), x[0], *extra)
        elif op == "cross_layer":
            out, xw = kc.cross_layer_fwd(*x)
            kc.cross_layer_bwd(torch.ones_like(out), x[0], x[1], x[2], xw)
        elif op == "attention_pooling":
            out, probs = ka.attention_pooling_fwd(x[0], x[1], *extra)
            ka.attention_pooling_bwd(torch.ones_like(out), x[0], x[1], *extra, probs)
        else:
            ks.sigmoid_bce_fwd(x[0], *extra)
    return go


def _attn_ref_vectorized(query, keys, offsets):
    """Eager attention pooling for equal-length sequences (the reference loops over samples in
    Python, which would time the interpreter, not the GPU)."""
    B, D = query.shape
    k = keys.reshape(B, -1, D)  # [B, L, D]
    p = torch.softmax(torch.einsum("bld,bd->bl", k, query) / math.sqrt(D), dim=1)
    return torch.einsum("bl,bld->bd", p, k)


def main():
    print(f"torch {torch.__version__}, device {DEV}"
          + (f" ({torch.cuda.get_device_name()})" if DEV == "cuda" else "")
          + f", _C built with CUDA: {CUDA_BUILT}", flush=True)
    torch.manual_seed(0)
    copy_bw = copy_bandwidth()
    bench_embedding(copy_bw)
    bench_dense(copy_bw)
    os.makedirs(ARGS.out, exist_ok=True)
    with open(os.path.join(ARGS.out, "bench_gpu.json"), "w") as f:
        json.dump(dict(copy_GBps=copy_bw, dry_run=DRY, rows=ROWS, torch=torch.__version__), f,
                  indent=1)
    # Short table last: the reply carries the end of the output.
    lines = [f"copy bandwidth: {copy_bw:.0f} GB/s" + ("   (DRY RUN: numbers meaningless)" if DRY else ""),
             f"{'op':<24} {'shape':<12} {'provider':<30} {'ms':>8} {'GB/s':>7} {'%copy':>6}"]
    for r in ROWS:
        if r["note"].startswith(("FAILED", "skipped")):
            lines.append(f"{r['op']:<24} {r['shape'][:12]:<12} {r['provider'][:30]:<30} "
                         f"{r['note'][:40]}")
        else:
            lines.append(f"{r['op']:<24} {r['shape'][:12]:<12} {r['provider'][:30]:<30} "
                         f"{r['ms']:8.3f} {r['GBps']:7.0f} {r['pct_copy']:6.1f}")
    table = "\n".join(lines)
    with open(os.path.join(ARGS.out, "bench_gpu_table.txt"), "w") as f:
        f.write(table + "\n")
    print("\n" + table)
    failed = [r for r in ROWS if r["note"].startswith("FAILED")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
