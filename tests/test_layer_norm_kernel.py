"""The layer-norm kernels in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py).

Every check uses the three-way tolerance rule of shared/KERNEL_TESTING.md (the helper in
minillm/kernels/tolerance.py, shared with benchmarks/gpu_suite.py): the kernel's error
against a float64 reference must be at most K times PyTorch's own error at the same dtype, plus
a per-dtype floor (scaled by the reference's magnitude). The output and every gradient are
checked. Under the interpreter the single-block limit is INTERPRETER_MAX_BLOCK_N (1024), so
hidden sizes 1500 and 3000 run the loop-over-the-row path; the shipped 8192 limit is
exercised by a 65536+ row and compiled for real GPUs in test_layer_norm_compile.py.
"""

import pytest
import torch
import torch.nn.functional as F

from minillm.kernels import norms as ln
from minillm.kernels.tolerance import GRAD_FACTOR as K_GRAD
from minillm.kernels.tolerance import OUTPUT_FACTOR as K_OUT
from minillm.kernels.tolerance import check_norm_three_way as _assert_three_way
from minillm.kernels.tolerance import leaves as _leaves
from minillm.kernels.tolerance import norm_three_way as _check
from minillm.kernels.tolerance import run_with_grads as _run

pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")


def _make(shape, dtype, weight=True, bias=True, wdtype=None, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = (torch.randn(shape, generator=g) * 2 + offset).to(dtype)
    w = (1 + 0.5 * torch.randn(n, generator=g)).to(wdtype or dtype) if weight else None
    b = (0.5 * torch.randn(n, generator=g)).to(wdtype or dtype) if bias else None
    dy = torch.randn(shape, generator=g)
    return x, w, b, dy


def _check_norm(kind, shape, dtype, weight=True, bias=True, wdtype=None, offset=0.0, eps=None):
    x, w, b, dy = _make(shape, dtype, weight, bias and kind == "layer", wdtype, offset)
    n = shape[-1]
    if kind == "layer":
        eps = 1e-5 if eps is None else eps
        _check(f"layer_norm{shape} {dtype}", lambda x, w, b: ln.layer_norm(x, (n,), w, b, eps),
               lambda x, w, b: F.layer_norm(x, (n,), w, b, eps),
               lambda x, w, b: F.layer_norm(x, (n,), w, b, eps), [x, w, b], [dy], dtype, "xwb")
    else:  # eps=None is finfo(input dtype).eps; the float64 reference must use the same value
        ref_eps = torch.finfo(dtype).eps if eps is None else eps
        _check(f"rms_norm{shape} {dtype}", lambda x, w: ln.rms_norm(x, (n,), w, eps),
               lambda x, w: F.rms_norm(x, (n,), w, eps),
               lambda x, w: F.rms_norm(x, (n,), w, ref_eps), [x, w], [dy], dtype, "xw")


# ---- hidden sizes, shapes, dtypes, affine parameters ---------------------------------------

@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("n", [1, 33, 100, 1023, 1500, 3000])
def test_hidden_sizes_fp32(kind, n):
    _check_norm(kind, (3, 7, n), torch.float32)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,wdtype", [(100, None), (1500, torch.float32)])
def test_half_precision(kind, dtype, n, wdtype):
    """fp16/bf16 activations with same-dtype weights (one block) and fp32 weights (loop path)."""
    _check_norm(kind, (2, 3, n), dtype, wdtype=wdtype)


@pytest.mark.parametrize("shape", [(1, 1, 100), (13, 100), (2, 3, 5, 100)])
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_batch_shapes(kind, shape):
    """One row (fewer rows than groups), a prime row count (uneven groups), 3 leading dims."""
    _check_norm(kind, shape, torch.float32)


@pytest.mark.parametrize("weight,bias", [(False, False), (True, False), (False, True)])
def test_layer_norm_optional_affine(weight, bias):
    _check_norm("layer", (11, 33), torch.float32, weight, bias)


def test_rms_norm_without_weight_bf16():
    _check_norm("rms", (11, 33), torch.bfloat16, weight=False)


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_large_mean_loop_path(kind):
    """|mean| >> std over several chunks: the chunked variance must not cancel catastrophically."""
    _check_norm(kind, (5, 3000), torch.float32, offset=1000.0)


def test_multi_dim_normalized_shape():
    x, _, _, dy = _make((6, 4, 25), torch.float32)
    w, b = torch.rand(4, 25) + 0.5, torch.randn(4, 25)
    shape = (4, 25)
    fn = lambda x, w, b: F.layer_norm(x, shape, w, b)  # noqa: E731
    _check("layer_norm (4, 25)", lambda x, w, b: ln.layer_norm(x, shape, w, b), fn, fn,
           [x, w, b], [dy], torch.float32, "xwb")


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_beyond_65536_with_the_shipped_block(kind, monkeypatch):
    """A 70001-wide row under the real GPU limit: 9 chunks of MAX_BLOCK_N, the last one partial."""
    monkeypatch.setattr(ln, "INTERPRETER_MAX_BLOCK_N", ln.MAX_BLOCK_N)
    assert ln.block_config(70001) == (ln.MAX_BLOCK_N, False)
    _check_norm(kind, (2, 70001), torch.float32)


@pytest.mark.parametrize("n", [100, 1500])
def test_fewer_rows_than_groups(n, monkeypatch):
    """64 groups for 5 rows: every group holds one row and the partial sums still add up."""
    monkeypatch.setattr(ln, "INTERPRETER_GROUPS", 64)
    _check_norm("layer", (5, n), torch.float32)


# ---- layouts -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_non_contiguous_input_and_grad(kind):
    """Input is a strided slice of a wider tensor; dy is a transposed view."""
    base = torch.randn(6, 5, 2 * 96)
    x = base[..., 96:]  # row stride 192, last dim contiguous: no copy needed
    w = torch.rand(96) + 0.5
    dy = torch.randn(5, 6, 96).transpose(0, 1)
    assert not x.is_contiguous() and not dy.is_contiguous()
    fn = ((lambda x, w: F.layer_norm(x, (96,), w)) if kind == "layer"
          else (lambda x, w: F.rms_norm(x, (96,), w, 1e-6)))
    ours = ((lambda x, w: ln.layer_norm(x, (96,), w)) if kind == "layer"
            else (lambda x, w: ln.rms_norm(x, (96,), w, 1e-6)))
    xs = x.detach().requires_grad_()  # a non-contiguous leaf
    (y,), (dx, dw) = _run(ours, [xs, w.clone().requires_grad_()], [dy])
    (y64,), (dx64, dw64) = _run(fn, _leaves(x, w, dtype=torch.float64), [dy])
    (y32,), (dx32, dw32) = _run(fn, _leaves(x, w), [dy])
    for what, a, s, r, k in [("y", y, y32, y64, K_OUT), ("dx", dx, dx32, dx64, K_GRAD),
                             ("dw", dw, dw32, dw64, K_GRAD)]:
        _assert_three_way(f"{kind} non-contiguous {what}", a, s, r, k, torch.float32)


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_sum_backward_broadcast_grad(kind):
    """loss = y.sum() hands the backward an expanded dy whose strides are all 0."""
    x, w, b, _ = _make((4, 5, 40), torch.float32, bias=kind == "layer")
    xs, ws = _leaves(x, w)
    xt, wt = _leaves(x, w)
    if kind == "layer":
        ln.layer_norm(xs, (40,), ws, b).sum().backward()
        F.layer_norm(xt, (40,), wt, b).sum().backward()
    else:
        ln.rms_norm(xs, (40,), ws).sum().backward()
        F.rms_norm(xt, (40,), wt).sum().backward()
    torch.testing.assert_close(xs.grad, xt.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ws.grad, wt.grad, atol=1e-4, rtol=1e-4)


def test_empty_batch():
    x = torch.randn(0, 7, 64, requires_grad=True)
    w = torch.ones(64, requires_grad=True)
    y = ln.layer_norm(x, (64,), w)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros(64))


# ---- residual fusion -----------------------------------------------------------------------

def _torch_add_norm(kind, eps):
    def fn(x, r, w, b=None):
        h = x + r  # torch at the inputs' dtype: the sum is rounded before the norm
        y = F.layer_norm(h, h.shape[-1:], w, b, eps) if kind == "layer" else F.rms_norm(h, h.shape[-1:], w, eps)
        return y.to(x.dtype), h
    return fn


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("dtype,n", [(torch.float32, 100), (torch.float32, 1500), (torch.bfloat16, 100),
                                     (torch.float16, 1500)])
def test_add_norm(kind, dtype, n):
    """Gradients flow into both x and residual through the norm and through the returned sum."""
    x, w, b, dy = _make((2, 3, n), dtype, bias=kind == "layer")
    r = torch.randn(2, 3, n).to(dtype)
    dh = torch.randn(2, 3, n)
    eps = 1e-5
    if kind == "layer":
        ours = lambda x, r, w, b: ln.add_layer_norm(x, r, w, b, eps)  # noqa: E731
        ref = lambda x, r, w, b: ln.add_layer_norm_reference(x, r, w, b, eps)  # noqa: E731
        inputs, names = [x, r, w, b], ["x", "residual", "w", "b"]
    else:
        ours = lambda x, r, w: ln.add_rms_norm(x, r, w, eps)  # noqa: E731
        ref = lambda x, r, w: ln.add_rms_norm_reference(x, r, w, eps)  # noqa: E731
        inputs, names = [x, r, w], ["x", "residual", "w"]
    _check(f"add_{kind}_norm {dtype} {n}", ours, _torch_add_norm(kind, eps), ref, inputs,
           [dy, dh], dtype, names)


def test_add_norm_fp32_residual_stream():
    """bf16 activations, fp32 residual stream: the sum is stored in fp32 and both grads match."""
    x, w, b, dy = _make((5, 200), torch.bfloat16, wdtype=torch.float32)
    r = torch.randn(5, 200)
    xs, rs, ws, bs = _leaves(x, r, w, b)
    y, h = ln.add_layer_norm(xs, rs, ws, bs, residual_dtype=torch.float32)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    assert torch.equal(h, x.float() + r)  # exact: the fp32 sum of a bf16 and an fp32 value
    torch.autograd.backward([y, h], [dy.bfloat16(), dy])
    x64, r64, w64, b64 = _leaves(x, r, w, b, dtype=torch.float64)
    y64, h64 = ln.add_layer_norm_reference(x64, r64, w64, b64)
    torch.autograd.backward([y64, h64], [dy.double(), dy.double()])
    assert xs.grad.dtype == torch.bfloat16 and rs.grad.dtype == torch.float32
    torch.testing.assert_close(rs.grad.double(), r64.grad, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(xs.grad.double(), x64.grad, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(ws.grad.double(), w64.grad, atol=1e-1, rtol=2e-2)


@pytest.mark.parametrize("fn", [ln.add_layer_norm, ln.add_rms_norm])
def test_add_norm_without_residual(fn):
    x, w, _, dy = _make((4, 50), torch.float32, bias=False)
    xs = x.clone().requires_grad_()
    y, h = fn(xs, None, w, *([None] if fn is ln.add_layer_norm else []))
    assert h is xs
    plain = ln.layer_norm(x, (50,), w) if fn is ln.add_layer_norm else ln.rms_norm(x, (50,), w)
    assert torch.equal(y, plain)
    (y * dy).sum().backward()
    assert xs.grad is not None and xs.grad.shape == x.shape


# ---- the references themselves -------------------------------------------------------------

def test_references_match_torch():
    x, w, b, _ = _make((4, 7, 48), torch.float64)
    torch.testing.assert_close(ln.layer_norm_reference(x, 48, w, b), F.layer_norm(x, (48,), w, b))
    torch.testing.assert_close(ln.rms_norm_reference(x, (48,), w), F.rms_norm(x, (48,), w))
    torch.testing.assert_close(ln.rms_norm_reference(x.float(), (48,)), F.rms_norm(x.float(), (48,)))


# ---- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("call,exc,words", [
    (lambda x: ln.layer_norm(x, (32,)), ValueError, ["normalized_shape", "[32]", "input"]),
    (lambda x: ln.rms_norm(x, (4, 64)), ValueError, ["normalized_shape", "trailing"]),
    (lambda x: ln.layer_norm(x, (64,), torch.ones(32)), ValueError, ["weight", "[64]", "[32]"]),
    (lambda x: ln.layer_norm(x, (64,), None, torch.ones(2, 64)), ValueError, ["bias", "[64]"]),
    (lambda x: ln.layer_norm(x.long(), (64,)), TypeError, ["input", "torch.int64", "float16"]),
    (lambda x: ln.rms_norm(x.double(), (64,)), TypeError, ["input", "torch.float64"]),
    (lambda x: ln.layer_norm(x, (64,), torch.ones(64, dtype=torch.int32)), TypeError, ["weight"]),
    (lambda x: ln.layer_norm(x, (64,), torch.ones(64, device="meta")), ValueError,
     ["weight", "meta", "same device"]),
    (lambda x: ln.add_rms_norm(x, torch.randn(3, 64), None), ValueError, ["residual", "[2, 3, 64]"]),
    (lambda x: ln.add_layer_norm(x, torch.randn(2, 3, 64, device="meta"), None, None), ValueError,
     ["residual", "meta"]),
    (lambda x: ln.add_layer_norm(x.int(), None, None, None), TypeError, ["x", "torch.int32"]),
    (lambda x: ln.add_layer_norm(x, x, None, None, residual_dtype=torch.int8), TypeError,
     ["residual_dtype"]),
    (lambda x: ln.layer_norm(x.numpy(), (64,)), TypeError, ["input", "Tensor"]),
])
def test_bad_input_names_the_argument(call, exc, words):
    x = torch.randn(2, 3, 64)
    with pytest.raises(exc) as info:
        call(x)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
