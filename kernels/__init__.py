"""Triton kernels for minillm's GPU hot path, each file opening with its pure-PyTorch reference.

Installed as `minillm.kernels`. Kernels never import model code; the model reaches them only
through `minillm.dispatch`. The minillm modules they import are `minillm.attention` and
`minillm.quantize`: torch-only math that is both the model's `reference` backend and the oracle
the attention and quantized-matmul kernels are tested against.

Public API (``from minillm.kernels import ...``)
------------------------------------------------
Attention (kernels/attention.py):
    scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
        is_causal=False, scale=None, enable_gqa=False)        torch's SDPA, (B, H, L, D), top-left causal
    flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, *, ...)
                                                               flash-attn's, (B, L, H, D), bottom-right causal
    flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        dropout_p=0.0, softmax_scale=None, causal=False, *, ...)  flash-attn's, packed, bottom-right
    flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
        dropout_p=0.0, causal=False, scale=None)               packed, top-left causal like SDPA
    attention_reference, draw_dropout_seed, dropout_keep_mask
Norms (kernels/norms.py):
    layer_norm, rms_norm, add_layer_norm, add_rms_norm, and their references
    layer_norm_reference, rms_norm_reference, add_layer_norm_reference, add_rms_norm_reference
Quantized matmul (kernels/quant_matmul.py):
    quant_matmul(x, qweight, scales, zeros=None, bits=8, group_size=None)   int8 / packed int4 weights
    quant_matmul_reference                                     dequantize, then torch.matmul
Custom ops (kernels/ops.py, torch only): `ops`, registering torch.ops.minillm.attention_forward,
attention_backward, norm_forward and norm_backward, which torch.compile traces without a break.
Checks (kernels/tolerance.py, torch only; `import minillm.kernels.tolerance`): the three-way
tolerance rule the kernel tests and benchmarks/gpu_suite.py judge the kernels by.

Design: lazy attributes. `import minillm.kernels` works without Triton, and so does `ops`; a
name above is imported from its kernel file when first touched (module `__getattr__`, PEP 562),
and that file imports Triton. Touching one where Triton is not installed raises an ImportError
saying so. `import minillm` itself never imports this package, so minillm imports and trains
where Triton is not installed; `minillm.dispatch` imports a kernel only when a Triton backend runs.
"""

import importlib

# Public name -> the module (under minillm.kernels) that defines it.
_EXPORTS = {
    **dict.fromkeys(
        ("scaled_dot_product_attention", "flash_attn_func", "flash_attn_varlen_func", "flash_attn_varlen",
         "attention_reference", "draw_dropout_seed", "dropout_keep_mask"),
        "attention"),
    **dict.fromkeys(
        ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "layer_norm_reference",
         "rms_norm_reference", "add_layer_norm_reference", "add_rms_norm_reference"),
        "norms"),
    **dict.fromkeys(("quant_matmul", "quant_matmul_reference"), "quant_matmul"),
}

__all__ = sorted(_EXPORTS) + ["ops"]


def __getattr__(name: str):
    if name == "ops":
        return importlib.import_module(f"{__name__}.ops")
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        import triton  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"minillm.kernels.{name} needs Triton, which is not installed (`import triton` failed: {error}). "
            "Install Triton (Linux; it comes with CUDA builds of torch), or use the PyTorch paths: "
            "torch.nn.functional.scaled_dot_product_attention, layer_norm, rms_norm, or "
            "minillm.attention.attention_reference."
        ) from error
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
