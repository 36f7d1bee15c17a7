"""Half-precision attention on a CPU runs torch's SDPA in fp32 (minillm.dispatch._cpu_sdpa_in_fp32).

torch's CPU attention kernels are several times slower in bf16 than in fp32 (the backward, at the
tiny GPT's shapes), so `dispatch.attention` computes bf16/fp16 CPU inputs in fp32 and returns the
inputs' dtype. These tests check that SDPA really sees fp32, also under autocast (which would
otherwise cast the inputs back down), and that the result is the fp32 result rounded once: the
same masks, GQA and gradients as before.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minillm import dispatch


def _qkv(dtype, heads=4, kv_heads=4, T=16, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, T, D, generator=g).to(dtype)
    k = torch.randn(2, kv_heads, T, D, generator=g).to(dtype)
    v = torch.randn(2, kv_heads, T, D, generator=g).to(dtype)
    return q, k, v


@pytest.fixture
def sdpa_dtypes(monkeypatch):
    """The dtypes of the query that every F.scaled_dot_product_attention call receives."""
    seen, real = [], F.scaled_dot_product_attention

    def recording(query, *args, **kwargs):
        seen.append(query.dtype)
        return real(query, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_reach_sdpa_in_fp32(sdpa_dtypes, dtype):
    q, k, v = _qkv(dtype)
    out = dispatch.attention(q, k, v, is_causal=True, backend="sdpa")
    assert sdpa_dtypes == [torch.float32]
    assert out.dtype == dtype and out.shape == q.shape


def test_fp32_inputs_are_untouched(sdpa_dtypes):
    q, k, v = _qkv(torch.float32)
    out = dispatch.attention(q, k, v, is_causal=True, backend="sdpa")
    assert sdpa_dtypes == [torch.float32]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=0, atol=0)


def test_autocast_cannot_cast_the_fp32_inputs_back(sdpa_dtypes):
    q, k, v = _qkv(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dispatch.attention(q, k, v, is_causal=True, backend="sdpa")
    assert out.dtype == torch.bfloat16
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).bfloat16()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # the fp32 result, rounded once


@pytest.mark.parametrize("case", ["causal", "bool mask", "additive bf16 mask", "grouped-query heads", "scale"])
def test_the_result_is_the_fp32_result_rounded(case):
    kv_heads = 2 if case == "grouped-query heads" else 4
    q, k, v = _qkv(torch.bfloat16, kv_heads=kv_heads)
    options = {"is_causal": case in ("causal", "grouped-query heads")}
    if case == "bool mask":
        keep = torch.ones(2, 1, 16, 16, dtype=torch.bool)
        keep[0, :, :, 10:] = False  # the first sequence's last six keys are padding
        options["attn_mask"] = keep
    if case == "additive bf16 mask":
        options["attn_mask"] = torch.randn(2, 4, 16, 16).bfloat16()  # a bias table, as T5's under autocast
    if case == "scale":
        options["scale"] = 1.0
    out = dispatch.attention(q, k, v, backend="sdpa", **options)
    mask = options.get("attn_mask")
    fp32_options = {**options, "attn_mask": mask.float() if mask is not None and mask.is_floating_point() else mask}
    if kv_heads != 4:
        fp32_options["enable_gqa"] = True
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **fp32_options).bfloat16()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_gradients_flow_back_in_the_inputs_dtype():
    q, k, v = (t.requires_grad_() for t in _qkv(torch.bfloat16))
    dispatch.attention(q, k, v, is_causal=True, backend="sdpa").float().square().sum().backward()
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    F.scaled_dot_product_attention(q32, k32, v32, is_causal=True).square().sum().backward()
    for half, full in ((q, q32), (k, k32), (v, v32)):
        assert half.grad.dtype == torch.bfloat16
        torch.testing.assert_close(half.grad.float(), full.grad, rtol=2e-2, atol=2e-2)


def test_a_bf16_model_step_matches_fp32_closely():
    """The whole tiny GPT under bf16 autocast: its loss stays near the fp32 loss."""
    from minillm.config import ModelConfig
    from minillm.model import CausalLM

    torch.manual_seed(0)
    config = ModelConfig(arch="decoder", vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=16)
    model = CausalLM(config)
    ids = torch.randint(0, 50, (3, 16))
    fp32 = model(ids, labels=ids).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(ids, labels=ids).loss
    assert abs(bf16.item() - fp32.item()) < 0.02
