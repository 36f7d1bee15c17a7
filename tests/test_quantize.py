"""Weight quantization in plain PyTorch: error bounds per scheme, int4 packing, QuantizedLinear,
quantize_model's choice of layers, and every bad setting refused with a message naming it."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm import dispatch
from minillm.config import ModelConfig
from minillm.lora import add_lora
from minillm.quantize import (
    check_settings, dequantize_weight, pack_int4, quant_matmul_reference, quantize_weight, unpack_int4)
from minillm.quantized import QUANT_TARGETS, QuantizedLinear, quantize_model
from minillm.tasks import build_model

CASES = [(bits, scheme, group) for bits in (8, 4) for scheme in ("symmetric", "asymmetric") for group in (None, 32)]


def weight(n=24, k=96, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) + offset  # rows of different ranges
    w[0, :] = 0.0  # an all-zero row: no division by zero, exact codes
    w[1, :5] = torch.tensor([3.0, -2.0, 0.5, 1e-3, -1e-7])  # a few outliers
    return w


@pytest.mark.parametrize("bits,scheme,group", CASES)
@pytest.mark.parametrize("offset", [0.0, 1.5])
def test_dequantize_error_is_at_most_half_a_step(bits, scheme, group, offset):
    """|w - deq(q(w))| <= s / 2 for every element, s its group's scale; zero stays exactly zero."""
    w = weight(offset=offset)
    q = quantize_weight(w, bits, group, scheme)
    deq = dequantize_weight(q.qweight, q.scales, q.zeros, bits, q.group_size)
    assert deq.shape == w.shape and deq.dtype == torch.float32
    n, k = w.shape
    step = q.scales.repeat_interleave(q.group_size, dim=1)  # (N, K): each element's scale
    err = (w - deq).abs()
    assert (err <= step / 2 * (1 + 1e-5)).all(), (err / step).max()
    assert (deq[w == 0] == 0).all()
    assert torch.isfinite(q.scales).all() and (q.scales > 0).all()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [None, 32])
def test_asymmetric_step_never_coarser_than_symmetric(bits, group):
    """(hi - lo) / (2^b - 1) <= 2 max|w| / (2^b - 2): min-max never loses resolution to absmax, and
    gains on one-sided groups (all positive here, about twice as fine)."""
    w = weight()
    sym = quantize_weight(w, bits, group, "symmetric")
    asym = quantize_weight(w, bits, group, "asymmetric")
    assert (asym.scales <= sym.scales * (1 + 1e-6)).all()
    positive = w.abs() + 0.1
    ratio = quantize_weight(positive, bits, group, "asymmetric").scales / quantize_weight(positive, bits, group).scales
    assert ratio.max() < 0.51


def test_storage_format():
    """int8: (N, K) int8 symmetric, uint8 asymmetric with uint8 zero points; int4: (N, K/2) uint8;
    float32 scales of shape (N, K / group_size)."""
    w = weight()
    q = quantize_weight(w, 8)
    assert q.qweight.dtype == torch.int8 and q.qweight.shape == (24, 96) and q.zeros is None
    assert q.scales.shape == (24, 1) and q.scales.dtype == torch.float32 and q.group_size == 96
    assert q.qweight.abs().max() == 127  # absmax maps to the end of the range
    q = quantize_weight(w, 8, 32, "asymmetric")
    assert q.qweight.dtype == torch.uint8 and q.zeros.shape == (24, 3) and q.zeros.dtype == torch.uint8
    q = quantize_weight(w, 4, 32)
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (24, 48) and q.scales.shape == (24, 3)
    codes = unpack_int4(q.qweight)
    assert codes.min() >= 1 and codes.max() <= 15  # symmetric codes q + 8, q in [-7, 7]


def test_int4_pack_unpack_round_trip_and_layout():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (5, 34), generator=g, dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 17) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    assert packed[0, 0] == codes[0, 0] + 16 * codes[0, 1]  # input 0 in the low nibble, input 1 in the high
    every = torch.arange(256, dtype=torch.uint8).reshape(1, 256)
    assert torch.equal(pack_int4(unpack_int4(every)), every)


def test_pack_int4_refuses_bad_codes():
    with pytest.raises(ValueError, match="even number of columns"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 15\], got a maximum of 16"):
        pack_int4(torch.full((2, 2), 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        unpack_int4(torch.zeros(2, 2, dtype=torch.int8))


@pytest.mark.parametrize("bits,group_size,scheme,message", [
    (3, None, "symmetric", "bits must be 4 or 8, got 3"),
    (16, None, "symmetric", "bits must be 4 or 8, got 16"),
    (True, None, "symmetric", "bits must be 4 or 8, got True"),
    (8, 0, "symmetric", "group_size must be an integer >= 1.*got 0"),
    (8, -32, "symmetric", "group_size must be an integer >= 1.*got -32"),
    (8, 2.5, "symmetric", "group_size must be an integer >= 1.*got 2.5"),
    (8, None, "absmax", "scheme must be one of .*got 'absmax'"),
])
def test_bad_settings_are_refused(bits, group_size, scheme, message):
    with pytest.raises(ValueError, match=message):
        check_settings(bits, group_size, scheme)
    with pytest.raises(ValueError, match=message):
        quantize_weight(weight(), bits, group_size, scheme)
    with pytest.raises(ValueError, match=message):
        quantize_model(tiny_gpt(), bits, group_size, scheme)


def test_shapes_that_do_not_group_or_pack_are_refused():
    with pytest.raises(ValueError, match="in_features 96 is not a multiple of group_size 40"):
        quantize_weight(weight(), 8, 40)
    with pytest.raises(ValueError, match="in_features must be even, got 33"):
        quantize_weight(torch.randn(4, 33), 4)
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_weight(torch.tensor([[1.0, float("nan")]]), 8)
    with pytest.raises(ValueError, match="2-D floating-point"):
        quantize_weight(torch.ones(4, 4, dtype=torch.int32), 8)
    q = quantize_weight(weight(), 4, 32)
    with pytest.raises(ValueError, match=r"scales must be floating point of shape \(24, 3\)"):
        dequantize_weight(q.qweight, q.scales[:, :2], None, 4, 32)
    with pytest.raises(ValueError, match="packed int4 qweight must be torch.uint8, got torch.int8"):
        dequantize_weight(q.qweight.to(torch.int8), q.scales, None, 4, 32)
    with pytest.raises(ValueError, match="x has 95 features"):
        quant_matmul_reference(torch.randn(2, 95), q.qweight, q.scales, None, 4, 32)


@pytest.mark.parametrize("bits,scheme,group", CASES)
def test_quantized_linear_is_the_linear_of_the_dequantized_weight(bits, scheme, group):
    torch.manual_seed(0)
    linear = nn.Linear(64, 40)
    layer = QuantizedLinear.from_linear(linear, bits, group, scheme)
    x = torch.randn(3, 5, 64)
    deq = layer.dequantized_weight()
    assert torch.allclose(layer(x), F.linear(x, deq, linear.bias), atol=1e-5)
    # and close to the original layer: within the half-step bound times sum |x|
    bound = (x.abs().sum(-1, keepdim=True) * layer.scales.max() / 2)
    assert ((layer(x) - linear(x)).abs() <= bound).all()
    assert not any(p.requires_grad for p in layer.parameters())  # inference only: buffers


def tiny_gpt(**overrides):
    torch.manual_seed(0)
    fields = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, activation="swiglu")
    return build_model(ModelConfig(**{**fields, **overrides}), "causal-lm")


def test_quantize_model_replaces_the_block_projections_only():
    model = tiny_gpt()
    ids = torch.randint(0, 64, (2, 9))
    before = model(ids).logits
    names = quantize_model(model, 8)
    expected = [f"decoder.blocks.{i}.{part}" for i in range(2)
                for part in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj",
                             "mlp.fc_gate", "mlp.fc_in", "mlp.fc_out")]
    assert sorted(names) == sorted(expected)
    assert all(isinstance(model.get_submodule(n), QuantizedLinear) for n in names)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert all(n.rpartition(".")[2] not in QUANT_TARGETS for n in linears)  # only heads stay nn.Linear
    assert type(model.lm_head) is nn.Linear  # the head, tied to the token table, stays as it was
    assert type(model.decoder.embeddings.token) is nn.Embedding
    after = model(ids).logits
    assert (after - before).abs().max() < 0.05 * before.abs().max()


def test_quantize_model_skip_and_refusals():
    model = tiny_gpt()
    names = quantize_model(model, 4, 16, "asymmetric", skip=("decoder.blocks.0.*",))
    assert names and not any(n.startswith("decoder.blocks.0.") for n in names)
    with pytest.raises(ValueError, match="no .* nn.Linear layers left to quantize"):
        quantize_model(model, 4, 16, skip=("decoder.blocks.0.*",))  # block 1 is quantized already
    with pytest.raises(ValueError, match=r"skip patterns \['nothing\.\*'\] match none"):
        quantize_model(tiny_gpt(), 8, skip=("nothing.*",))
    lora = tiny_gpt()
    add_lora(lora, 2, 4.0)
    with pytest.raises(ValueError, match="LoRA layer; merge the adapters first"):
        quantize_model(lora, 8)
    untouched = tiny_gpt(d_ff=48)  # fc_out has 48 inputs: groups of 32 do not fit it
    with pytest.raises(ValueError, match="fc_out: in_features 48 is not a multiple of group_size 32"):
        quantize_model(untouched, 8, 32)
    assert not any(isinstance(m, QuantizedLinear) for m in untouched.modules())  # all or nothing


def test_dispatch_picks_the_reference_on_cpu_and_refuses_unknown_backends():
    q = quantize_weight(weight(), 8, 32, "asymmetric")
    x = torch.randn(2, 96)
    assert dispatch.resolve_quant_backend("auto", x, 32, 96) == "reference"
    ours = dispatch.quant_matmul(x, q.qweight, q.scales, q.zeros, 8, 32, backend="reference")
    assert torch.equal(ours, quant_matmul_reference(x, q.qweight, q.scales, q.zeros, 8, 32))
    with pytest.raises(ValueError, match="quant backend: got 'cuda', expected one of"):
        dispatch.quant_matmul(x, q.qweight, q.scales, q.zeros, 8, 32, backend="cuda")
