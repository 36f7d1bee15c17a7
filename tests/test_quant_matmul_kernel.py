"""The quantized-matmul kernel in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py).

The three-way tolerance rule of shared/KERNEL_TESTING.md: the kernel's error against a float64
reference (the dequantized weight and x in float64) must be at most K_OUT times PyTorch's own
error at the same dtype (F.linear of x and the dequantized weight cast to x's dtype), plus a
per-dtype floor scaled by the reference's magnitude. Awkward shapes: rows 1, 7, 33; outputs 17,
40, 113; K not a multiple of the K step (per-channel int8 over 1500 and 200 inputs).
"""

import pytest
import torch
import torch.nn.functional as F

from minillm.kernels import quant_matmul as Q
from minillm.quantize import dequantize_weight, quantize_weight

K_OUT = 2  # FlashAttention's factor for outputs
FLOOR = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # ~2 ulp of the dtype
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _check(lead, n, k, bits, scheme, group, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    q = quantize_weight(w, bits, group, scheme)
    x = torch.randn(*lead, k, generator=g).to(dtype)
    with torch.no_grad():
        ours = Q.quant_matmul(x, q.qweight, q.scales, q.zeros, bits, group)
    deq64 = dequantize_weight(q.qweight, q.scales, q.zeros, bits, q.group_size, dtype=torch.float64)
    ref64 = F.linear(x.double(), deq64)
    torch_same = F.linear(x, deq64.to(dtype))
    assert ours.shape == (*lead, n) and ours.dtype == dtype
    err = (ours.double() - ref64).abs().max().item()
    torch_err = (torch_same.double() - ref64).abs().max().item()
    floor = FLOOR[dtype] * max(1.0, ref64.abs().max().item())
    assert err <= K_OUT * torch_err + floor, (
        f"{lead}x{k} -> {n}, int{bits} {scheme} group {group}, {dtype}: kernel error {err:.3g} > "
        f"{K_OUT} x torch's {torch_err:.3g} + floor {floor:.3g}")
    return ours


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,scheme,group", [
    (8, "symmetric", None), (8, "asymmetric", None), (8, "asymmetric", 64),
    (4, "symmetric", 32), (4, "asymmetric", 32), (4, "asymmetric", 128), (4, "symmetric", None)])
def test_matches_reference(bits, scheme, group, dtype):
    _check((7,), 40, 128, bits, scheme, group, dtype)


@pytest.mark.parametrize("lead,n,k,bits,scheme,group", [
    ((1,), 17, 64, 8, "symmetric", None),  # one row (decoding), outputs not a multiple of the tile
    ((2, 3, 5), 33, 96, 4, "asymmetric", 32),  # leading dims, K = 3 groups of 32
    ((33,), 113, 200, 8, "asymmetric", None),  # per-channel over K = 200: the last K step is partial
    ((3,), 24, 1500, 8, "symmetric", None),  # hidden size 1500
    ((5,), 16, 192, 4, "symmetric", 64),
])
def test_awkward_shapes(lead, n, k, bits, scheme, group):
    _check(lead, n, k, bits, scheme, group, torch.float16)


def test_non_contiguous_x_and_empty_batch():
    g = torch.Generator().manual_seed(1)
    q = quantize_weight(torch.randn(24, 64, generator=g), 4, 32, "asymmetric")
    x = torch.randn(64, 10, generator=g).t()  # (10, 64), last-dimension stride 10
    with torch.no_grad():
        ours = Q.quant_matmul(x, q.qweight, q.scales, q.zeros, 4, 32)
        assert torch.allclose(ours, Q.quant_matmul_reference(x, q.qweight, q.scales, q.zeros, 4, 32), atol=1e-5)
        empty = Q.quant_matmul(torch.zeros(0, 3, 64), q.qweight, q.scales, q.zeros, 4, 32)
    assert empty.shape == (0, 3, 24)


def test_half_precision_scales_are_accepted():
    """A model cast with .half() casts the scales too; the kernel reads them as float32."""
    q = quantize_weight(torch.randn(16, 64), 8)
    x = torch.randn(2, 64)
    with torch.no_grad():
        ours = Q.quant_matmul(x, q.qweight, q.scales.half(), None, 8, None)
    ref = Q.quant_matmul_reference(x, q.qweight, q.scales.half(), None, 8, None)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_bad_inputs_are_refused():
    q = quantize_weight(torch.randn(16, 96), 8, 48)
    x = torch.randn(2, 96)
    with pytest.raises(ValueError, match="group_size must be the whole row .* multiple of 32 .* got 48"):
        Q.quant_matmul(x, q.qweight, q.scales, None, 8, 48)
    q = quantize_weight(torch.randn(16, 96), 8, 32)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32, got torch.float64"):
        Q.quant_matmul(x.double(), q.qweight, q.scales, None, 8, 32)
    with pytest.raises(ValueError, match="x has 95 features"):
        Q.quant_matmul(torch.randn(2, 95), q.qweight, q.scales, None, 8, 32)
    with pytest.raises(ValueError, match="symmetric int8 qweight must be torch.int8, got torch.uint8"):
        Q.quant_matmul(x, q.qweight.view(torch.uint8), q.scales, None, 8, 32)
    with pytest.raises(ValueError, match="requires grad, but the kernel is inference only"):
        Q.quant_matmul(x.requires_grad_(), q.qweight, q.scales, None, 8, 32)


def test_launch_config_k_step_never_crosses_a_group():
    for group, k in [(32, 96), (64, 128), (96, 192), (128, 1024), (1500, 1500), (200, 200)]:
        for dtype in (torch.float16, torch.float32):
            c = Q.launch_config(1, group, k, dtype, k, interpreting=False)
            assert c.block_k in Q.BLOCK_KS and (group == k or group % c.block_k == 0)
    assert not Q.kernel_supports(48, 96) and Q.kernel_supports(96, 96)


def test_quantized_model_on_the_triton_backend_matches_the_reference(monkeypatch):
    """QuantizedLinear(backend='triton') runs the kernel through minillm.dispatch (once per layer);
    the logits of a tiny quantized GPT match those of the reference backend."""
    from minillm.config import ModelConfig
    from minillm.quantized import QuantizedLinear, quantize_model
    from minillm.tasks import build_model

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=2, max_seq_len=16)
    model = build_model(config, "causal-lm").eval()
    quantize_model(model, 4, 32, "asymmetric")
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        reference = model(ids).logits
        for layer in model.modules():
            if isinstance(layer, QuantizedLinear):
                layer.backend = "triton"
        calls = []
        kernel = Q.quant_matmul
        monkeypatch.setattr(Q, "quant_matmul", lambda *args: calls.append(1) or kernel(*args))
        ours = model(ids).logits
    assert len(calls) == 6  # q, k, v, out, fc_in, fc_out
    assert torch.allclose(ours, reference, atol=1e-4), (ours - reference).abs().max()


def test_triton_backend_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    from minillm import dispatch

    q = quantize_weight(torch.randn(16, 64), 8)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="quant backend='triton' needs CUDA tensors"):
        dispatch.quant_matmul(torch.randn(2, 64), q.qweight, q.scales, None, 8, 64, backend="triton")
    with pytest.raises(ValueError, match="must be a CUDA tensor for the Triton kernel"):
        Q.quant_matmul(torch.randn(2, 64), q.qweight, q.scales, None, 8, 64)
