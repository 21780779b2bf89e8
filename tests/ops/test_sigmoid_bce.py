# SPDX-License-Identifier: Apache-2.0
"""sigmoid_bce and score: the C++ CPU kernels vs the reference."""
from __future__ import annotations

import pytest
import torch

from adrec_fast import functional as F
from adrec_fast import reference as R
from adrec_fast.nn import SigmoidBCEHead

from ..conftest import assert_close_verbose, rerun_in_child


def _truth_and_grad(z, y, w):
    z64 = z.detach().double().requires_grad_(True)
    loss = R.sigmoid_bce(z64, y.double(), None if w is None else w.double())
    loss.backward()
    return loss.detach(), z64.grad


@pytest.mark.parametrize("api", ["functional", "ops"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [1, 17, 4096, 5000])
def test_matches_reference(api, weighted, dtype, B):
    z = (torch.randn(B, dtype=dtype) * 4).requires_grad_(True)
    y = torch.randint(0, 2, (B,)).to(dtype)
    w = torch.rand(B, dtype=dtype) if weighted else None
    if api == "functional":
        loss = F.sigmoid_bce(z, y, w)
        loss.backward()
        grad = z.grad
    else:
        loss, grad = torch.ops.adrec.sigmoid_bce(z.detach(), y, w)
    truth, truth_grad = _truth_and_grad(z, y, w)
    assert loss.shape == () and loss.dtype == dtype
    assert_close_verbose(loss, truth.to(dtype))
    assert_close_verbose(grad, truth_grad.to(dtype))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("B", [1, 15, 16, 17, 63, 64, 65, 2047, 2048, 2049, 4097])
def test_float32_vector_tails_and_extremes(weighted, B):
    """float32 runs 64 elements per step in 16-lane vectors (AVX-512 where the CPU has it) with
    a masked tail, in 2048-element chunks: every remainder, chunk edge and the clamped range."""
    g = torch.Generator().manual_seed(1000 + B)
    z = torch.randn(B, generator=g) * 6
    special = torch.tensor([-1e30, -100.0, -87.5, -87.0, -20.0, -1e-8, 0.0, 1e-8, 20.0, 87.0, 100.0, 1e30])
    k = min(B, special.numel())
    z[torch.randperm(B, generator=g)[:k]] = special[:k]
    y = torch.rand(B, generator=g)  # soft labels exercise every term of the loss
    w = torch.rand(B, generator=g) * 2 if weighted else None
    loss, grad = torch.ops.adrec.sigmoid_bce(z, y, w)
    truth, truth_grad = _truth_and_grad(z, y, w)
    assert_close_verbose(loss, truth.float())
    assert_close_verbose(grad, truth_grad.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_and_inf_logits_follow_the_reference(dtype):
    """A NaN logit makes the loss and that element's gradient NaN (never a finite gradient), and
    infinite logits give what the reference gives; every position of a 16-lane vector."""
    for pos in range(0, 20, 3):
        z = torch.randn(20, dtype=dtype)
        y = torch.randint(0, 2, (20,)).to(dtype)
        z[pos] = float("nan")
        loss, grad = torch.ops.adrec.sigmoid_bce(z, y, None)
        assert torch.isnan(loss) and torch.isnan(grad[pos])
        finite = torch.arange(20) != pos
        _, truth_grad = _truth_and_grad(z, y, None)
        assert_close_verbose(grad[finite], truth_grad[finite].to(dtype))
    z = torch.tensor([float("inf"), -float("inf"), 1.0], dtype=dtype)
    for yv in (0.0, 1.0):
        y = torch.full((3,), yv, dtype=dtype)
        loss, grad = torch.ops.adrec.sigmoid_bce(z, y, None)
        truth, truth_grad = _truth_and_grad(z, y, None)
        torch.testing.assert_close(loss, truth.to(dtype), equal_nan=True)
        torch.testing.assert_close(grad, truth_grad.to(dtype), equal_nan=True)


def test_portable_float32_path_matches_reference():
    """ADREC_CPU_ISA=base (read once per process) keeps float32 on the portable loop instead of
    the AVX-512 one: rerun the float32 comparisons in a child with it set."""
    rerun_in_child(__file__, "((matches_reference and float32) or vector_tails or large_logits"
                             " or thread_count or nan_and_inf) and not portable",
                   ADREC_CPU_ISA="base")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_logits_are_stable(dtype):
    z = torch.tensor([-1e30, -1e4, -100.0, -88.0, -30.0, 0.0, 30.0, 88.0, 100.0, 1e4, 1e30], dtype=dtype)
    for y in (torch.zeros_like(z), torch.ones_like(z), torch.full_like(z, 0.25)):
        loss, grad = torch.ops.adrec.sigmoid_bce(z, y, None)
        truth, truth_grad = _truth_and_grad(z, y, None)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert_close_verbose(loss, truth.to(dtype))
        assert_close_verbose(grad, truth_grad.to(dtype))


def test_soft_and_integer_labels():
    z = torch.randn(64)
    y_soft = torch.rand(64)
    assert_close_verbose(F.sigmoid_bce(z, y_soft), R.sigmoid_bce(z, y_soft))
    y_int = torch.randint(0, 2, (64,))
    assert_close_verbose(F.sigmoid_bce(z, y_int), R.sigmoid_bce(z, y_int))


def test_non_contiguous():
    z = torch.randn(40, dtype=torch.float64)[::2]
    y = torch.randint(0, 2, (60,)).double()[::3]
    w = torch.rand(20, 2, dtype=torch.float64)[:, 1]
    assert not (z.is_contiguous() or y.is_contiguous() or w.is_contiguous())
    loss, grad = torch.ops.adrec.sigmoid_bce(z, y, w)
    truth, truth_grad = _truth_and_grad(z, y, w)
    assert_close_verbose(loss, truth)
    assert_close_verbose(grad, truth_grad)


def test_empty_batch_is_nan_like_torch():
    z = torch.zeros(0, requires_grad=True)
    loss = F.sigmoid_bce(z, torch.zeros(0))
    assert torch.isnan(loss) and torch.isnan(R.sigmoid_bce(z.detach(), torch.zeros(0)))
    loss.backward()
    assert z.grad.shape == (0,)


def test_literal_example():
    # z = 0: sigmoid 1/2, loss log 2 for either label; grad (1/2 - y) / B.
    z = torch.tensor([0.0, 0.0], requires_grad=True)
    y = torch.tensor([1.0, 0.0])
    loss = F.sigmoid_bce(z, y)
    assert_close_verbose(loss, torch.tensor(0.6931471805599453))
    loss.backward()
    assert_close_verbose(z.grad, torch.tensor([-0.25, 0.25]))
    # Weighted: w = [2, 0] -> loss = (2 log 2 + 0) / 2.
    assert_close_verbose(F.sigmoid_bce(z.detach(), y, torch.tensor([2.0, 0.0])), torch.tensor(0.6931471805599453))


def test_gradcheck():
    z = torch.randn(7, dtype=torch.float64, requires_grad=True)
    y = torch.rand(7, dtype=torch.float64)
    w = torch.rand(7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: F.sigmoid_bce(a, y, w), (z,))


def test_loss_does_not_depend_on_thread_count():
    z = torch.randn(10_000) * 3
    y = torch.randint(0, 2, (10_000,)).float()
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.adrec.sigmoid_bce(z, y, None)[0]
        torch.set_num_threads(2)
        two = torch.ops.adrec.sigmoid_bce(z, y, None)[0]
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, two)


def test_bad_dtype_names_argument():
    z = torch.randn(4)
    with pytest.raises(TypeError, match="logits"):
        torch.ops.adrec.sigmoid_bce(z.long(), z, None)
    with pytest.raises(TypeError, match="weight"):
        torch.ops.adrec.sigmoid_bce(z, z, z.double())


def test_bad_shape():
    z = torch.randn(4)
    with pytest.raises(ValueError, match="labels"):
        torch.ops.adrec.sigmoid_bce(z, torch.zeros(5), None)
    with pytest.raises(ValueError, match="weight"):
        torch.ops.adrec.sigmoid_bce(z, torch.zeros(4), torch.ones(3))
    with pytest.raises(ValueError, match="logits"):
        torch.ops.adrec.sigmoid_bce(z[None], torch.zeros(1, 4), None)


# score: x [B, K], w [K], b -> sigmoid(x @ w + b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (1, 432), (7, 17), (300, 16), (0, 5)], ids=str)
@pytest.mark.parametrize("b_shape", [(), (1,)])
def test_score_matches_reference(dtype, shape, b_shape):
    B, K = shape
    x = torch.randn(B, K, dtype=dtype)
    w = torch.randn(K, dtype=dtype) / K**0.5
    b = torch.randn(b_shape, dtype=dtype)
    out = F.score(x, w, b)
    assert out.shape == (B,)
    assert_close_verbose(out, R.score(x.double(), w.double(), b.double()).to(dtype))


def test_score_large_logits_and_python_bias():
    x = torch.tensor([[1e3], [-1e3], [0.0]])
    w = torch.tensor([1.0])
    assert_close_verbose(F.score(x, w, 0.0), torch.tensor([1.0, 0.0, 0.5]))


def test_score_gradcheck_and_head():
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn((), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(F.score, (x, w, b))
    head = SigmoidBCEHead(3).double()
    assert_close_verbose(head.predict(x.detach()), torch.sigmoid(head(x.detach())))


def test_score_bad_inputs():
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match="w"):
        torch.ops.adrec.score(x, torch.randn(3, dtype=torch.float64), torch.zeros(()))
    with pytest.raises(ValueError, match="w"):
        torch.ops.adrec.score(x, torch.randn(4), torch.zeros(()))
    with pytest.raises(ValueError, match="b"):
        torch.ops.adrec.score(x, torch.randn(3), torch.zeros(2))


def test_grad_output_carries_no_gradient():
    z = torch.randn(5, requires_grad=True)
    loss, grad = torch.ops.adrec.sigmoid_bce(z, torch.ones(5), None)
    assert loss.requires_grad and not grad.requires_grad


@pytest.mark.parametrize("seed", [1.0, 2.5, 0.0, -1.0], ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_scales_by_the_incoming_gradient(seed, dtype):
    """The C++ autograd returns grad_logits as it is when the incoming gradient is exactly 1
    (loss.backward()) and multiplies otherwise; both must equal the reference's gradient, also
    when the graph is kept and run twice and while the caller holds the op's grad_logits."""
    B = 37
    z = (torch.randn(B, dtype=dtype) * 3).requires_grad_(True)
    y = torch.randint(0, 2, (B,)).to(dtype)
    loss, held = torch.ops.adrec.sigmoid_bce(z, y, None)
    held_copy = held.clone()
    seed_t = torch.tensor(seed, dtype=dtype)
    loss.backward(seed_t, retain_graph=True)
    first = z.grad.clone()
    loss.backward(seed_t)
    _, truth_grad = _truth_and_grad(z, y, None)
    assert_close_verbose(first, seed * truth_grad.to(dtype))
    assert_close_verbose(z.grad, 2 * seed * truth_grad.to(dtype))
    assert_close_verbose(held, held_copy)  # the caller's tensor was not changed in place


def test_backward_inside_a_larger_graph():
    """A seed other than 1 reaches the op through the graph (here: 3 * loss + 0.5 * loss)."""
    z = torch.randn(20, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 2, (20,)).double()
    (3 * F.sigmoid_bce(z, y) + 0.5 * F.sigmoid_bce(z, y)).backward()
    _, truth_grad = _truth_and_grad(z, y, None)
    assert_close_verbose(z.grad, 3.5 * truth_grad)


def test_second_backward_without_retain_graph_raises():
    z = torch.randn(8, requires_grad=True)
    loss = F.sigmoid_bce(z, torch.ones(8))
    loss.backward()
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


def test_in_place_change_of_saved_gradient_is_detected():
    """The op's second output is the saved gradient: changing it in place before backward must
    raise, not silently change the gradient."""
    z = torch.randn(8, requires_grad=True)
    loss, grad = torch.ops.adrec.sigmoid_bce(z, torch.ones(8), None)
    grad.mul_(2)
    with pytest.raises(RuntimeError, match="in-place"):
        loss.backward()


def test_no_graph_without_grad():
    z = torch.randn(8, requires_grad=True)
    with torch.no_grad():
        loss = F.sigmoid_bce(z, torch.ones(8))
    assert not loss.requires_grad and loss.grad_fn is None
    loss = F.sigmoid_bce(z.detach(), torch.ones(8))
    assert loss.grad_fn is None
    loss = F.sigmoid_bce(z, torch.ones(8))
    assert loss.grad_fn is not None and loss.grad_fn.name() == "SigmoidBceBackward"


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_forward_mode_ad_is_refused():
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        z = fwAD.make_dual(torch.randn(8), torch.ones(8))
        with pytest.raises(RuntimeError, match="forward-mode"):
            F.sigmoid_bce(z, torch.ones(8))
