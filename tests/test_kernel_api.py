"""The kernels as people call them: package exports, flash-attn's signatures and causal
alignment, and the custom ops that let torch.compile trace a model on the Triton backends.

Kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py). The independent
reference for both causal alignments is torch's own SDPA in float64 with an explicit bool mask;
rows that see no key are 0 (SDPA would give NaN there, so they are left out of its call).
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import minillm
import minillm.kernels
from minillm.kernels import attention as A
from minillm.kernels import ops
from test_attention_kernel import three_way
from test_import_without_triton import BLOCK_TRITON

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


# ------------------------------------------------------------------------------------------
# Package exports
# ------------------------------------------------------------------------------------------


def test_public_functions_import_from_the_package():
    from minillm.kernels import (add_layer_norm, add_layer_norm_reference, add_rms_norm,  # noqa: F401
                                 add_rms_norm_reference, attention_reference, flash_attn_func,
                                 flash_attn_varlen, flash_attn_varlen_func, layer_norm,
                                 layer_norm_reference, rms_norm, rms_norm_reference,
                                 scaled_dot_product_attention)
    from minillm.kernels import norms as ln_file  # the file: kernels/norms.py

    assert scaled_dot_product_attention is A.scaled_dot_product_attention
    assert flash_attn_func is A.flash_attn_func and flash_attn_varlen_func is A.flash_attn_varlen_func
    assert attention_reference is A.attention_reference
    assert rms_norm is ln_file.rms_norm and add_rms_norm is ln_file.add_rms_norm
    assert layer_norm is ln_file.layer_norm and layer_norm_reference is ln_file.layer_norm_reference
    assert set(minillm.kernels.__all__) <= set(dir(minillm.kernels))
    with pytest.raises(AttributeError, match="no attribute 'flash_attn_qkvpacked_func'"):
        minillm.kernels.flash_attn_qkvpacked_func


def _run_without_triton(code: str, tmp_path) -> None:
    """Run code in a fresh interpreter where `import triton` fails, without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([sys.executable, "-c", BLOCK_TRITON + textwrap.dedent(code)], env=env,
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, f"subprocess failed:\n{result.stdout}\n{result.stderr}"


def test_package_and_ops_import_without_triton_and_kernels_say_they_need_it(tmp_path):
    _run_without_triton("""
        import pytest
        import torch
        import torch.nn.functional as F

        import minillm.kernels
        from minillm.kernels import ops

        with pytest.raises(ImportError, match="scaled_dot_product_attention needs Triton, which is not installed"):
            from minillm.kernels import scaled_dot_product_attention
        with pytest.raises(ImportError, match="rms_norm needs Triton"):
            minillm.kernels.rms_norm
        # Without Triton the ops still run on CPU, as the PyTorch reference.
        q = torch.randn(1, 2, 5, 8)
        out, lse = torch.ops.minillm.attention_forward(q, q, q, None, 0.0, True, False, 0.5, None)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q, is_causal=True, scale=0.5))
        assert not any(m == "triton" or m.startswith("triton.") for m in __import__("sys").modules)
        """, tmp_path)


# ------------------------------------------------------------------------------------------
# Causal alignment against torch SDPA (float64, explicit bool mask)
# ------------------------------------------------------------------------------------------


def _sdpa_with_causal_mask(q, k, v, causal, bottom_right, scale=None):
    """(B, H, Lq, D) attention by torch SDPA with the causal mask spelled out as a bool tensor;
    query rows that see no key are 0 and left out of SDPA's call. GQA by repeating K/V heads."""
    Lq, Lk = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    rows = torch.arange(Lq)[:, None]
    cols = torch.arange(Lk)[None, :]
    diag = Lk - Lq if bottom_right else 0
    allowed = cols <= rows + diag if causal else torch.ones(Lq, Lk, dtype=torch.bool)  # (Lq, Lk)
    seen = allowed.any(dim=1)  # (Lq,) rows with at least one key
    out = torch.zeros(q.shape, dtype=q.dtype)
    if seen.any():
        attended = F.scaled_dot_product_attention(q[:, :, seen], k, v, attn_mask=allowed[seen], scale=scale)
        out = out.index_put((torch.arange(q.shape[0])[:, None, None], torch.arange(q.shape[1])[None, :, None],
                             seen.nonzero()[:, 0][None, None, :]), attended)
    return out


def _inputs(B, Lq, Lk, H, H_kv, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Lq, D, generator=g).to(dtype), torch.randn(B, H_kv, Lk, D, generator=g).to(dtype),
            torch.randn(B, H_kv, Lk, D, generator=g).to(dtype), torch.randn(B, H, Lq, D, generator=g).to(dtype))


def test_the_sdpa_oracle_knows_both_alignments():
    """The oracle itself: bottom-right and top-left differ when Lq != Lk, agree when Lq == Lk."""
    q, k, v, _ = _inputs(1, 3, 5, 1, 1, 8, torch.float64, seed=0)
    top, bottom = (_sdpa_with_causal_mask(q, k, v, True, br) for br in (False, True))
    torch.testing.assert_close(top, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    torch.testing.assert_close(bottom[:, :, -1], F.scaled_dot_product_attention(q, k, v)[:, :, -1])
    assert not torch.allclose(top, bottom)
    q5 = torch.cat([q, q[:, :, :2]], dim=2)  # Lq = Lk: one alignment
    torch.testing.assert_close(_sdpa_with_causal_mask(q5, k, v, True, True), _sdpa_with_causal_mask(q5, k, v, True, False))


# (Lq, Lk, H, H_kv, D, dtype): Lq < Lk, Lq > Lk (rows that see no key), Lq == Lk, GQA, length 1.
ALIGNMENT_CASES = [
    (5, 19, 2, 2, 24, F32),
    (19, 5, 2, 1, 16, F16),
    (17, 17, 4, 2, 40, BF16),
    (1, 9, 2, 2, 16, F32),
    (9, 1, 2, 2, 16, F32),
]


@pytest.mark.parametrize("Lq,Lk,H,H_kv,D,dtype", ALIGNMENT_CASES)
def test_flash_attn_func_causal_is_bottom_right(Lq, Lk, H, H_kv, D, dtype):
    q, k, v, do = _inputs(2, Lq, Lk, H, H_kv, D, dtype, seed=Lq * 100 + Lk)

    def kernel(q_, k_, v_):  # flash_attn_func speaks (B, L, H, D); the harness (B, H, L, D)
        bl = [t.transpose(1, 2).contiguous() for t in (q_, k_, v_)]  # (B, L, H, D)
        out = A.flash_attn_func(*bl, 0.0, None, True)
        assert out.shape == (2, Lq, H, D) and out.is_contiguous()  # laid out like q
        return out.transpose(1, 2)

    out, grads = three_way(kernel, lambda q_, k_, v_: _sdpa_with_causal_mask(q_, k_, v_, True, True),
                           q, k, v, do, label=f"bottom-right Lq={Lq} Lk={Lk}")
    if Lq > Lk:  # the first Lq - Lk queries see no key: output and dq exactly 0
        assert (out[:, :, : Lq - Lk] == 0).all() and (grads[0][:, :, : Lq - Lk] == 0).all()


@pytest.mark.parametrize("Lq,Lk,H,H_kv,D,dtype", ALIGNMENT_CASES[:3])
def test_sdpa_causal_stays_top_left(Lq, Lk, H, H_kv, D, dtype):
    q, k, v, do = _inputs(2, Lq, Lk, H, H_kv, D, dtype, seed=Lq * 100 + Lk + 1)
    three_way(lambda q_, k_, v_: A.scaled_dot_product_attention(q_, k_, v_, is_causal=True, enable_gqa=True),
              lambda q_, k_, v_: _sdpa_with_causal_mask(q_, k_, v_, True, False),
              q, k, v, do, label=f"top-left Lq={Lq} Lk={Lk}")


def test_flash_attn_func_scale_and_non_causal():
    q, k, v, do = _inputs(1, 7, 11, 2, 2, 16, F32, seed=3)
    three_way(lambda q_, k_, v_: A.flash_attn_func(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2),
                                                   softmax_scale=0.3).transpose(1, 2),
              lambda q_, k_, v_: _sdpa_with_causal_mask(q_, k_, v_, False, False, scale=0.3), q, k, v, do, "scale")


def _pack(lengths, H, D, g):
    """Packed (T, H, D) float32 tokens and int32 cumulative lengths."""
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return torch.randn(int(cu[-1]), H, D, generator=g), cu


def _varlen_oracle(q, k, v, cu_q, cu_k, bottom_right):
    """Per-sequence SDPA oracle on packed tensors; a sequence with no keys outputs 0."""
    outs = []
    for b in range(len(cu_q) - 1):
        qb = q[cu_q[b] : cu_q[b + 1]].transpose(0, 1)[None]  # (1, H, Lq_b, D)
        kb = k[cu_k[b] : cu_k[b + 1]].transpose(0, 1)[None]
        vb = v[cu_k[b] : cu_k[b + 1]].transpose(0, 1)[None]
        if kb.shape[2] == 0:
            outs.append(torch.zeros_like(qb[0].transpose(0, 1)))
            continue
        outs.append(_sdpa_with_causal_mask(qb, kb, vb, True, bottom_right)[0].transpose(0, 1))
    return torch.cat(outs)  # (T_q, H, D)


@pytest.mark.parametrize("bottom_right", [True, False], ids=["flash_attn_varlen_func", "flash_attn_varlen"])
def test_varlen_causal_alignment_per_sequence(bottom_right):
    g = torch.Generator().manual_seed(17)
    lens_q, lens_k = [5, 0, 1, 19, 7, 3], [19, 4, 1, 6, 0, 3]  # Lq < Lk, Lq = 0, 1 x 1, Lq > Lk, Lk = 0
    q, cu_q = _pack(lens_q, 4, 16, g)
    k, cu_k = _pack(lens_k, 2, 16, g)
    v, _ = _pack(lens_k, 2, 16, g)
    do = torch.randn(q.shape, generator=g)
    mq, mk = max(lens_q), max(lens_k)
    if bottom_right:  # flash-attn's positional order: dropout_p, softmax_scale, causal
        kernel = lambda a, b, c: A.flash_attn_varlen_func(a, b, c, cu_q, cu_k, mq, mk, 0.0, None, True)  # noqa: E731
    else:
        kernel = lambda a, b, c: A.flash_attn_varlen(a, b, c, cu_q, cu_k, mq, mk, causal=True)  # noqa: E731
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = kernel(*leaves)
    grads = torch.autograd.grad(out, leaves, do)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = _varlen_oracle(*ref_leaves, cu_q, cu_k, bottom_right)
    ref_grads = torch.autograd.grad(ref, ref_leaves, do.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    for name, got, expected in zip(("dq", "dk", "dv"), grads, ref_grads):
        torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------
# Signatures: a flash-attn-style positional call never means something else
# ------------------------------------------------------------------------------------------


def _varlen_args():
    g = torch.Generator().manual_seed(2)
    q, cu_q = _pack([3, 6], 2, 16, g)
    k, cu_k = _pack([5, 4], 2, 16, g)
    return q, k, k, cu_q, cu_k, 6, 5


def test_flash_attn_varlen_refuses_flash_attn_positional_options():
    """flash-attn's order is (dropout_p, softmax_scale, causal); minillm's flash_attn_varlen once
    read (0.0, None, True) as dropout 0, causal=None (off) and scale=True (1.0)."""
    with pytest.raises(TypeError, match="positional"):
        A.flash_attn_varlen(*_varlen_args(), 0.0, None, True)


def test_flash_attn_positional_calls_mean_what_flash_attn_means():
    q, k, v, cu_q, cu_k, mq, mk = _varlen_args()
    positional = A.flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, 0.0, 0.25, True)
    keywords = A.flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, softmax_scale=0.25, causal=True)
    torch.testing.assert_close(positional, keywords, atol=0, rtol=0)
    non_causal = A.flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, 0.0, 0.25, False)
    assert not torch.allclose(positional, non_causal)
    qd, kd = torch.randn(1, 3, 2, 16), torch.randn(1, 5, 2, 16)
    torch.testing.assert_close(A.flash_attn_func(qd, kd, kd, 0.0, 0.5, True),
                               A.flash_attn_func(qd, kd, kd, softmax_scale=0.5, causal=True), atol=0, rtol=0)


REFUSED = [
    ("window_size", (4, 0)), ("softcap", 30.0), ("alibi_slopes", torch.ones(2)), ("return_attn_probs", True),
]


@pytest.mark.parametrize("name,value", REFUSED, ids=[r[0] for r in REFUSED])
@pytest.mark.parametrize("fn", ["flash_attn_func", "flash_attn_varlen_func"])
def test_options_the_kernel_cannot_honour_are_refused(fn, name, value):
    q, k, v, cu_q, cu_k, mq, mk = _varlen_args()
    call = (lambda **kw: A.flash_attn_func(q[None], k[None], v[None], **kw)) if fn == "flash_attn_func" else \
        (lambda **kw: A.flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, **kw))
    with pytest.raises(ValueError, match=rf"{fn}: {name}=.* is not supported.*only the default {name}="):
        call(**{name: value})
    defaults = call(window_size=[-1, -1], softcap=0.0, alibi_slopes=None, return_attn_probs=False, deterministic=True)
    torch.testing.assert_close(defaults, call(), atol=0, rtol=0)


def test_flash_attn_options_beyond_causal_are_keyword_only():
    """flash-attn's own positional order past `causal` differs between its versions."""
    q, k, v, cu_q, cu_k, mq, mk = _varlen_args()
    with pytest.raises(TypeError, match="positional"):
        A.flash_attn_func(q[None], k[None], v[None], 0.0, None, False, (-1, -1))
    with pytest.raises(TypeError, match="positional"):
        A.flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, 0.0, None, False, (-1, -1))


def test_bad_flash_attn_arguments_name_the_argument():
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(TypeError, match="flash_attn_func: causal must be a bool, got None"):
        A.flash_attn_func(q, q, q, causal=None)
    with pytest.raises(ValueError, match=r"flash_attn_func: q must have 4 dims \(batch, seqlen, nheads, headdim\)"):
        A.flash_attn_func(q[0], q, q)
    with pytest.raises(ValueError, match=r"q heads \(2\) must be divisible by k heads \(3\)"):
        A.flash_attn_func(q, torch.randn(1, 4, 3, 16), torch.randn(1, 4, 3, 16))
    with pytest.raises(ValueError, match="flash_attn_varlen_func: block_table is not supported"):
        A.flash_attn_varlen_func(*_varlen_args(), block_table=torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="softmax_scale must be a finite float"):
        A.flash_attn_func(q, q, q, softmax_scale=float("inf"))


# ------------------------------------------------------------------------------------------
# Custom ops and torch.compile
# ------------------------------------------------------------------------------------------


def test_ops_pass_torch_library_opcheck(monkeypatch):
    """Schema, fake (shape) implementation and registered autograd agree with the real op, for
    the CPU reference path and the interpreted Triton path."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 5, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 7, 16, generator=g, requires_grad=True)
    x = torch.randn(6, 24, generator=g, requires_grad=True)
    w = torch.randn(24, generator=g, requires_grad=True)
    b = torch.randn(24, generator=g, requires_grad=True)
    for interpret in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        torch.library.opcheck(torch.ops.minillm.attention_forward.default, (q, k, k, None, 0.0, True, True, 0.25, None))
        torch.library.opcheck(torch.ops.minillm.norm_forward.default, (x, w, b, 1e-5, False))
        torch.library.opcheck(torch.ops.minillm.norm_forward.default, (x, w, None, 1e-6, True))


def test_reference_ops_on_cpu_match_torch(monkeypatch):
    """Without the interpreter, the CPU implementation is the PyTorch reference: it matches SDPA
    and F.layer_norm / F.rms_norm, forward and backward, both causal alignments."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, do = _inputs(2, 9, 4, 4, 2, 8, torch.float64, seed=5)
    for bottom_right in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, _ = ops.attention_forward(*leaves, None, 0.0, True, bottom_right, 0.35, None)
        ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = _sdpa_with_causal_mask(*ref_leaves, True, bottom_right, scale=0.35)
        torch.testing.assert_close(out, ref)
        for got, expected in zip(torch.autograd.grad(out, leaves, do), torch.autograd.grad(ref, ref_leaves, do)):
            torch.testing.assert_close(got, expected)
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, dtype=torch.float64, requires_grad=True)
    y, _, _ = ops.norm_forward(x, w, None, 1e-6, True)
    expected = F.rms_norm(x, (12,), w, 1e-6)
    torch.testing.assert_close(y, expected)
    dy = torch.randn(5, 12, dtype=torch.float64)
    for got, ref in zip(torch.autograd.grad(y, (x, w), dy), torch.autograd.grad(expected, (x, w), dy)):
        torch.testing.assert_close(got, ref)


def _tiny_model(norm: str):
    torch.manual_seed(0)
    config = minillm.preset("tiny", vocab_size=97, d_model=32, n_layers=2, max_seq_len=16, n_kv_heads=2,
                            norm=norm, attn_backend="triton", norm_backend="triton")
    return minillm.build_model(config, "causal-lm").train()


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_compiled_model_on_triton_backends_is_one_graph_and_matches_eager(norm):
    """torch.compile(fullgraph=True) of a minillm model whose attention and norms run as minillm's
    custom ops: one graph (fullgraph raises on a break; the counter sees one frame), the ops in
    it as single nodes, and the same loss and gradients as eager. Backend "aot_eager" traces the
    forward and backward graphs as Inductor would but runs them eagerly: Inductor's C++ compile
    of the model would take minutes on 2 cores and adds nothing to what is checked here."""
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # padding: a bool attn_mask reaches the kernel too

    eager = _tiny_model(norm)
    eager_loss = eager(ids, attention_mask=mask, labels=ids).loss
    eager_loss.backward()

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        run_eagerly = lambda g, _: make_boxed_func(g)  # noqa: E731  ("aot_eager" with the graph kept)
        return aot_autograd(fw_compiler=run_eagerly, bw_compiler=run_eagerly)(gm, example_inputs)

    compiled_model = _tiny_model(norm)
    compiled = torch.compile(compiled_model, backend=backend, fullgraph=True)
    loss = compiled(ids, attention_mask=mask, labels=ids).loss
    loss.backward()

    assert len(graphs) == 1
    targets = {str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"}
    assert "minillm.attention_forward.default" in targets, sorted(targets)
    norm_calls = [n for n in graphs[0].graph.nodes if str(n.target) == "minillm.norm_forward.default"]
    assert len(norm_calls) == 2 * 2 + 1  # two per block, one final
    torch.testing.assert_close(loss, eager_loss, atol=0, rtol=0)
    for (name, p), (_, p_eager) in zip(compiled_model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(p.grad, p_eager.grad, atol=1e-6, rtol=1e-5, msg=name)
