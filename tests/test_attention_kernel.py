"""The fused attention kernel in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py).

Three-way rule (minillm/kernels/tolerance.py, shared with benchmarks/gpu_suite.py): the kernel's
error against a float64 oracle must be at most 2x (forward) / 3x (dQ, dK, dV) PyTorch's own
error at the kernel's dtype, plus a small floor per dtype. "PyTorch's own" is the explicit reference (softmax(QK^T * scale) V, which is torch's
math SDPA backend written out) evaluated in that dtype. Shapes are small and awkward: the
interpreter runs programs one by one, so we vary shapes instead of growing them.
"""

import math

import pytest
import torch

from minillm.kernels import attention as A

from minillm.kernels.tolerance import ATTENTION_FLOOR as FLOOR
from minillm.kernels.tolerance import attention_three_way as three_way
from minillm.kernels.tolerance import max_abs_error as _max_err
from minillm.kernels.tolerance import outputs_and_grads as _grads

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


def _inputs(B, H, H_kv, Lq, Lk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g).to(dtype)
    k = torch.randn(B, H_kv, Lk, D, generator=g).to(dtype)
    v = torch.randn(B, H_kv, Lk, D, generator=g).to(dtype)
    do = torch.randn(B, H, Lq, D, generator=g).to(dtype)
    return q, k, v, do


def _cast_mask(mask, dtype):
    """Float masks must match the inputs' dtype, as in torch."""
    return mask if mask is None or mask.dtype == torch.bool else mask.to(dtype)


def _sdpa(attn_mask=None, **kw):
    return lambda q, k, v: A.scaled_dot_product_attention(q, k, v, attn_mask=_cast_mask(attn_mask, q.dtype), **kw)


def _reference(attn_mask=None, **kw):
    return lambda q, k, v: A.attention_reference(q, k, v, attn_mask=_cast_mask(attn_mask, q.dtype), **kw)


def test_the_reference_is_the_models_math():
    """One implementation of the math: the kernel is checked against the model's reference
    backend (minillm/attention.py), which the kernel file re-exports, not against a copy."""
    from minillm.attention import attention_reference

    assert A.attention_reference is attention_reference


# ------------------------------------------------------------------------------------------
# Shapes, head dims, dtypes, causal
# ------------------------------------------------------------------------------------------

# (Lq, Lk, D, dtype, causal): every awkward length pair and every required head dim appears,
# each dtype meets causal and non-causal, Lq < Lk and Lq > Lk.
SHAPE_CASES = [
    (1, 1, 16, F16, False),
    (1, 1, 64, F32, True),
    (7, 13, 24, BF16, False),
    (7, 13, 80, F16, True),
    (13, 7, 40, F32, False),
    (13, 7, 16, BF16, True),
    (17, 33, 64, F16, False),
    (17, 33, 24, F32, True),
    (33, 17, 128, BF16, False),
    (113, 203, 16, F16, True),
    (113, 203, 40, BF16, False),
]


@pytest.mark.parametrize("Lq,Lk,D,dtype,causal", SHAPE_CASES)
def test_matches_reference_awkward_shapes(Lq, Lk, D, dtype, causal):
    q, k, v, do = _inputs(1, 2, 2, Lq, Lk, D, dtype, seed=Lq * 1000 + Lk)
    three_way(_sdpa(is_causal=causal), _reference(is_causal=causal), q, k, v, do,
              label=f"Lq={Lq} Lk={Lk} D={D} {dtype} causal={causal}")


@pytest.mark.parametrize("D,dtype", [(160, F16), (256, BF16), (96, F32)])
def test_large_head_dims(D, dtype):
    q, k, v, do = _inputs(1, 1, 1, 9, 19, D, dtype, seed=D)
    three_way(_sdpa(is_causal=True), _reference(is_causal=True), q, k, v, do, label=f"D={D}")


def test_custom_scale_and_batch():
    q, k, v, do = _inputs(3, 2, 2, 5, 11, 32, F16, seed=3)
    three_way(_sdpa(scale=0.37), _reference(scale=0.37), q, k, v, do, label="scale")


@pytest.mark.parametrize("H_kv,causal,dtype", [(2, False, F16), (1, True, BF16), (2, True, F32)])
def test_grouped_query_attention(H_kv, causal, dtype):
    q, k, v, do = _inputs(2, 4, H_kv, 11, 19, 24, dtype, seed=H_kv)
    three_way(_sdpa(is_causal=causal, enable_gqa=True), _reference(is_causal=causal, enable_gqa=True),
              q, k, v, do, label=f"GQA 4 over {H_kv}")


# ------------------------------------------------------------------------------------------
# Masks and fully masked rows
# ------------------------------------------------------------------------------------------


def _key_padding_mask(B, Lq, lengths):
    """(B, 1, Lq, Lk) bool mask: batch b attends to its first lengths[b] keys (0 = none)."""
    Lk = max(max(lengths), 1)
    keys = torch.arange(Lk)[None, :] < torch.tensor(lengths)[:, None]  # (B, Lk)
    return keys[:, None, None, :].expand(B, 1, Lq, Lk)


@pytest.mark.parametrize("dtype", [F16, BF16, F32])
def test_bool_key_padding_with_empty_sequence(dtype):
    lengths = [9, 0, 17, 3]  # batch 1 has no keys at all: every one of its rows is fully masked
    mask = _key_padding_mask(4, 13, lengths)
    q, k, v, do = _inputs(4, 2, 2, 13, 17, 40, dtype, seed=11)
    out, grads = three_way(_sdpa(attn_mask=mask), _reference(attn_mask=mask), q, k, v, do, label="padding")
    assert (out[1] == 0).all(), "fully masked rows must output exactly 0"
    for g in grads:
        assert torch.isfinite(g).all()
    assert (grads[0][1] == 0).all() and (grads[1][1] == 0).all() and (grads[2][1] == 0).all()


def test_additive_mask_broadcast_with_masked_rows():
    Lq, Lk = 15, 21
    g = torch.Generator().manual_seed(5)
    mask = torch.randn(Lq, Lk, generator=g)  # broadcast over B and H: strides 0 there
    mask[::2, 3:8] = float("-inf")
    mask[4] = float("-inf")  # one fully masked row
    q, k, v, do = _inputs(2, 3, 3, Lq, Lk, 24, F16, seed=6)
    out, grads = three_way(_sdpa(attn_mask=mask), _reference(attn_mask=mask), q, k, v, do, label="additive")
    assert (out[:, :, 4] == 0).all()
    assert (grads[0][:, :, 4] == 0).all()


def test_per_head_bool_mask_and_causal_empty_rows():
    B, H, Lq, Lk = 2, 2, 10, 7
    g = torch.Generator().manual_seed(9)
    mask = torch.rand(B, H, Lq, Lk, generator=g) > 0.4
    mask[0, 1, 2] = False
    mask[1, 0, :, 0] = False
    q, k, v, do = _inputs(B, H, H, Lq, Lk, 16, BF16, seed=10)
    out, _ = three_way(_sdpa(attn_mask=mask), _reference(attn_mask=mask), q, k, v, do, label="per-head mask")
    assert (out[0, 1, 2] == 0).all()


# ------------------------------------------------------------------------------------------
# Dropout
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal,dtype,H_kv", [(False, F16, 2), (True, F32, 1)])
def test_dropout_matches_reference_with_recovered_mask(causal, dtype, H_kv):
    B, H, Lq, Lk, D, p = 2, 2, 19, 23, 24, 0.3
    q, k, v, do = _inputs(B, H, H_kv, Lq, Lk, D, dtype, seed=21)
    torch.manual_seed(1234)
    out, grads = _grads(_sdpa(dropout_p=p, is_causal=causal, enable_gqa=True), q, k, v, do, dtype)
    torch.manual_seed(1234)  # the seed the call drew, recovered through torch's generator
    keep = A.dropout_keep_mask(A.draw_dropout_seed(), B, H, Lq, Lk, p)
    assert keep.shape == (B, H, Lq, Lk) and keep.dtype == torch.bool
    three_way(lambda q_, k_, v_: _replay(q_, k_, v_, out, grads),
              _reference(dropout_p=p, is_causal=causal, enable_gqa=True, dropout_mask=keep),
              q, k, v, do, label="dropout")
    # The same mask with one row flipped must not match: the check can fail.
    wrong = keep.clone()
    wrong[0, 0, Lq - 1] = ~wrong[0, 0, Lq - 1]
    ref_wrong = A.attention_reference(q.double(), k.double(), v.double(), dropout_p=p, is_causal=causal,
                                      enable_gqa=True, dropout_mask=wrong)
    assert _max_err(out, ref_wrong) > 10 * FLOOR[dtype]


class _Replay(torch.autograd.Function):
    """Hands back an already computed output and gradients, so three_way can compare them."""

    @staticmethod
    def forward(ctx, q, k, v, out, dq, dk, dv):
        ctx.grads = (dq, dk, dv)
        return out.clone()

    @staticmethod
    def backward(ctx, dout):
        return (*ctx.grads, None, None, None, None)


def _replay(q, k, v, out, grads):
    return _Replay.apply(q, k, v, out, *grads)


def test_dropout_rate_and_reproducibility():
    p = 0.17
    keep = A.dropout_keep_mask(seed=77, batch=2, heads=4, len_q=128, len_k=160, dropout_p=p)  # 163,840 draws
    assert abs((1 - keep.float().mean().item()) - p) < 0.01
    assert keep.float().mean(dim=(0, 1, 2)).min() > 0.7  # no column stuck at "drop"
    assert not torch.equal(keep, A.dropout_keep_mask(78, 2, 4, 128, 160, p))

    q, k, v, _ = _inputs(1, 2, 2, 16, 16, 16, F16, seed=2)
    torch.manual_seed(0)
    a = A.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(0)
    b = A.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    c = A.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b), "torch.manual_seed must reproduce dropout"
    assert not torch.equal(a, c)


# ------------------------------------------------------------------------------------------
# Layouts: non-contiguous inputs and grad_output
# ------------------------------------------------------------------------------------------


def test_non_contiguous_inputs_and_grad_output():
    B, H, Lq, Lk, D = 2, 3, 11, 14, 40
    g = torch.Generator().manual_seed(4)
    # (B, L, H, D) storage viewed as (B, H, L, D), as a model's projections produce it.
    q = torch.randn(B, Lq, H, D, generator=g).to(F16).transpose(1, 2)
    k = torch.randn(B, Lk, H, 2 * D, generator=g).to(F16).transpose(1, 2)[..., ::2]  # D stride 2
    v = torch.randn(B, H, D, Lk, generator=g).to(F16).transpose(2, 3)  # D stride Lk
    do = torch.randn(B, H, D, Lq, generator=g).to(F16).transpose(2, 3)  # non-contiguous dO
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or do.is_contiguous())
    # _grads casts with .to(dtype), a no-op here, so the kernel sees exactly these strides.
    three_way(_sdpa(is_causal=True), _reference(is_causal=True), q, k, v, do, label="strided")


# ------------------------------------------------------------------------------------------
# Variable-length packed sequences
# ------------------------------------------------------------------------------------------


def _pack(lengths, H, D, dtype, gen):
    total = sum(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return torch.randn(total, H, D, generator=gen).to(dtype), cu


def _varlen_reference(q, k, v, cu_q, cu_k, causal, dropout_keep=None, dropout_p=0.0):
    """Per-sequence reference on (1, H, L, D) slices; sequences with no keys output 0."""
    outs = []
    group = q.shape[1] // k.shape[1]
    for b in range(len(cu_q) - 1):
        qs, qe, ks, ke = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        if qe == qs:
            continue
        if ke == ks:
            outs.append(q[qs:qe] * 0)
            continue
        qb = q[qs:qe].transpose(0, 1)[None]  # (1, H, Lq_b, D)
        kb = k[ks:ke].transpose(0, 1)[None]  # (1, H_kv, Lk_b, D)
        vb = v[ks:ke].transpose(0, 1)[None]
        mask = None if dropout_keep is None else dropout_keep[b : b + 1, :, : qe - qs, : ke - ks]
        o = A.attention_reference(qb, kb, vb, is_causal=causal, enable_gqa=group > 1,
                                  dropout_p=dropout_p, dropout_mask=mask)
        outs.append(o[0].transpose(0, 1))  # (Lq_b, H, D)
    return torch.cat(outs)


@pytest.mark.parametrize("causal,dtype,H_kv", [(False, BF16, 2), (True, F16, 1), (True, F32, 2)])
def test_varlen_matches_per_sequence_reference(causal, dtype, H_kv):
    g = torch.Generator().manual_seed(31)
    lens_q, lens_k = [5, 17, 1, 0, 9], [12, 0, 1, 4, 9]  # includes an empty q and an empty k sequence
    q, cu_q = _pack(lens_q, 4, 24, dtype, g)
    k, cu_k = _pack(lens_k, H_kv, 24, dtype, g)
    v, _ = _pack(lens_k, H_kv, 24, dtype, g)
    do = torch.randn(q.shape, generator=g).to(dtype)
    kernel = lambda q_, k_, v_: A.flash_attn_varlen(q_, k_, v_, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal)
    reference = lambda q_, k_, v_: _varlen_reference(q_, k_, v_, cu_q, cu_k, causal)
    out, grads = three_way(kernel, reference, q, k, v, do, label="varlen")
    assert (out[cu_q[1] : cu_q[2]] == 0).all()  # sequence 1 has queries but no keys
    assert all(torch.isfinite(gr).all() for gr in grads)


def test_varlen_dropout_uses_recovered_mask():
    g = torch.Generator().manual_seed(8)
    lens_q, lens_k, p = [6, 13, 3], [10, 4, 15], 0.25
    q, cu_q = _pack(lens_q, 2, 16, F32, g)
    k, cu_k = _pack(lens_k, 2, 16, F32, g)
    v, _ = _pack(lens_k, 2, 16, F32, g)
    do = torch.randn(q.shape, generator=g)
    torch.manual_seed(99)
    out, grads = _grads(lambda a, b, c: A.flash_attn_varlen(a, b, c, cu_q, cu_k, 13, 15, dropout_p=p),
                        q, k, v, do, F32)
    torch.manual_seed(99)
    keep = A.dropout_keep_mask(A.draw_dropout_seed(), 3, 2, 13, 15, p)
    three_way(lambda a, b, c: _replay(a, b, c, out, grads),
              lambda a, b, c: _varlen_reference(a, b, c, cu_q, cu_k, False, keep, p), q, k, v, do,
              label="varlen dropout")


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------

_q = torch.randn(2, 4, 8, 16)
_k = torch.randn(2, 4, 8, 16)
BAD_SDPA = [
    ("rank", dict(query=_q[0]), ValueError, "query must have 4 dims"),
    ("head dim", dict(key=torch.randn(2, 4, 8, 32)), ValueError, "key head dim"),
    ("mixed dtypes", dict(key=_k.half()), TypeError, "key dtype"),
    ("dtype", dict(query=_q.double(), key=_k.double(), value=_k.double()), TypeError, "query dtype"),
    ("mask shape", dict(attn_mask=torch.ones(3, 8, 8, dtype=torch.bool)), ValueError, "attn_mask shape"),
    ("mask rank", dict(attn_mask=torch.ones(1, 1, 1, 8, 8, dtype=torch.bool)), ValueError, "attn_mask shape"),
    ("mask dtype", dict(attn_mask=torch.ones(8, 8, dtype=torch.int64)), TypeError, "attn_mask dtype"),
    ("mask and causal", dict(attn_mask=torch.ones(8, 8, dtype=torch.bool), is_causal=True), ValueError, "attn_mask"),
    ("GQA divisibility", dict(key=torch.randn(2, 3, 8, 16), value=torch.randn(2, 3, 8, 16), enable_gqa=True),
     ValueError, r"query heads \(4\) must be divisible by key heads \(3\)"),
    ("GQA not enabled", dict(key=torch.randn(2, 2, 8, 16), value=torch.randn(2, 2, 8, 16)), ValueError, "enable_gqa"),
    ("dropout", dict(dropout_p=1.0), ValueError, "dropout_p"),
    ("scale", dict(scale=float("nan")), ValueError, "scale"),
    ("device", dict(key=_k.to("meta"), value=_k.to("meta")), ValueError, "key must be on query's device"),
]


@pytest.mark.parametrize("name,override,error,message", BAD_SDPA, ids=[c[0] for c in BAD_SDPA])
@pytest.mark.parametrize("fn", [A.scaled_dot_product_attention, A.attention_reference], ids=["kernel", "reference"])
def test_bad_input_names_the_argument(fn, name, override, error, message):
    args = {**dict(query=_q, key=_k, value=_k), **override}
    if fn is A.attention_reference and name == "dtype":
        args = dict(args, query=_q.to(torch.int32), key=_k.to(torch.int32), value=_k.to(torch.int32))
    with pytest.raises(error, match=message):
        fn(**args)


# Limits of the kernel alone: the reference follows torch's SDPA, which has neither.
KERNEL_LIMITS = [
    ("value head dim", dict(value=torch.randn(2, 4, 8, 24)), "value head dim"),
    ("D > 256", dict(query=torch.randn(1, 1, 2, 272), key=torch.randn(1, 1, 2, 272),
                     value=torch.randn(1, 1, 2, 272)), r"query head dim must be in \[1, 256\]"),
]


@pytest.mark.parametrize("name,override,message", KERNEL_LIMITS, ids=[c[0] for c in KERNEL_LIMITS])
def test_kernel_limits_name_the_argument_and_the_reference_has_none(name, override, message):
    args = {**dict(query=_q, key=_k, value=_k), **override}
    with pytest.raises(ValueError, match=message):
        A.scaled_dot_product_attention(**args)
    expected = torch.nn.functional.scaled_dot_product_attention(**args)
    torch.testing.assert_close(A.attention_reference(**args), expected, atol=1e-6, rtol=1e-5)


def test_mask_requiring_grad_is_refused():
    mask = torch.zeros(8, 8, requires_grad=True)
    with pytest.raises(ValueError, match="attn_mask.requires_grad"):
        A.scaled_dot_product_attention(_q, _k, _k, attn_mask=mask)


def _varlen_args(**override):
    q = torch.randn(10, 4, 16)
    k = torch.randn(12, 2, 16)
    args = dict(q=q, k=k, v=k, cu_seqlens_q=torch.tensor([0, 4, 10], dtype=torch.int32),
                cu_seqlens_k=torch.tensor([0, 5, 12], dtype=torch.int32), max_seqlen_q=6, max_seqlen_k=7)
    return {**args, **override}


BAD_VARLEN = [
    ("rank", dict(q=torch.randn(2, 10, 4, 16)), ValueError, "q must have 3 dims"),
    ("non-monotonic", dict(cu_seqlens_q=torch.tensor([0, 7, 4, 10], dtype=torch.int32),
                           cu_seqlens_k=torch.tensor([0, 5, 6, 12], dtype=torch.int32)),
     ValueError, "cu_seqlens_q must be non-decreasing"),
    ("cu end", dict(cu_seqlens_k=torch.tensor([0, 5, 11], dtype=torch.int32)), ValueError, "cu_seqlens_k must start at 0"),
    ("cu dtype", dict(cu_seqlens_q=torch.tensor([0, 4, 10])), TypeError, "cu_seqlens_q must be torch.int32"),
    ("batch mismatch", dict(cu_seqlens_k=torch.tensor([0, 12], dtype=torch.int32), max_seqlen_k=12),
     ValueError, "same batch"),
    ("max too small", dict(max_seqlen_q=5), ValueError, "max_seqlen_q must be >="),
    ("heads", dict(k=torch.randn(12, 3, 16), v=torch.randn(12, 3, 16)), ValueError, r"q heads \(4\) must be divisible by k heads \(3\)"),
    ("head dim", dict(v=torch.randn(12, 2, 8)), ValueError, "head dim"),
    ("D > 256", dict(q=torch.randn(10, 4, 300), k=torch.randn(12, 2, 300), v=torch.randn(12, 2, 300)),
     ValueError, r"q head dim must be in \[1, 256\]"),
    ("mixed dtypes", dict(v=torch.randn(12, 2, 16).half()), TypeError, "v dtype"),
    ("device", dict(cu_seqlens_q=torch.tensor([0, 4, 10], dtype=torch.int32, device="meta")),
     ValueError, "cu_seqlens_q must be on"),
]


@pytest.mark.parametrize("name,override,error,message", BAD_VARLEN, ids=[c[0] for c in BAD_VARLEN])
def test_varlen_bad_input_names_the_argument(name, override, error, message):
    with pytest.raises(error, match=message):
        A.flash_attn_varlen(**_varlen_args(**override))


# ------------------------------------------------------------------------------------------
# Configuration tables
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("D", [16, 24, 40, 64, 80, 96, 128, 160, 256])
def test_every_head_dim_has_configs_for_both_architectures(D):
    assert A.head_dim_bucket(D) >= max(D, 16)
    assert A.head_dim_bucket(D) & (A.head_dim_bucket(D) - 1) == 0
    for arch in (80, 90):
        for kernel in ("fwd", "dkdv", "dq"):
            for dtype in (F16, BF16, F32):
                configs = A.shipped_configs(arch, kernel, D, dtype)
                assert configs, (arch, kernel, D, dtype)
                for c in configs:  # every tl.dot dimension >= 16, powers of two for tl.arange
                    for n in (c.block_m, c.block_n):
                        assert n >= 16 and n & (n - 1) == 0
                    assert c.num_warps in (1, 2, 4, 8, 16) and c.num_stages >= 1


def test_interpreter_uses_one_small_config():
    c = A._INTERPRETER_CONFIG
    assert A._interpreting()
    assert (c.block_m, c.block_n) == (16, 16)
    assert math.isclose(A.LOG2E, math.log2(math.e))
