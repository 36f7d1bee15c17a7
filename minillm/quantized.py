"""QuantizedLinear, and quantizing the linear layers of a model (the math: minillm.quantize).

`quantize_model` replaces the attention and MLP projections of every block (QUANT_TARGETS: q, k,
v, out and XLNet's r projection; fc_in, fc_gate, fc_out) by QuantizedLinear layers holding int8
or packed int4 codes, float32 scales and, asymmetric, zero points. What stays in floating point:
embeddings (and with them the LM head tied to the token table), the untied heads (LM head, MLM
head, NSP head, pooler, classifier), norms and biases: lookups rather than matmuls, weights
shared with a lookup, or small and sensitive ones.

How a QuantizedLinear multiplies is decided in `minillm.dispatch.quant_matmul`: the Triton
kernel of kernels/quant_matmul.py, which dequantizes in registers, on CUDA; elsewhere the
reference, which dequantizes the whole weight and calls torch.matmul. Inference only: the layers
hold buffers, not parameters, and no gradient reaches them. LoRA layers must be merged first.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.nn as nn

from minillm import dispatch
from minillm.quantize import check_settings, dequantize_weight, group_size_for, quantize_weight

# The projections of the attention and MLP blocks, by their names in minillm.model.
QUANT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "r_proj", "fc_in", "fc_gate", "fc_out")


# --------------------------------------------------------------------------------------------
# The layer and the model
# --------------------------------------------------------------------------------------------


class QuantizedLinear(nn.Module):
    """y = x w'^T + b with w' the dequantized int8/int4 weight; inference only.

    Buffers (saved in the state dict): qweight, scales, zeros (asymmetric only), bias (when the layer
    has one, kept in floating point). `backend` picks how the product runs (minillm.dispatch.quant_matmul).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = None,
                 scheme: str = "symmetric", bias: bool = True, backend: str = "auto"):
        super().__init__()
        check_settings(bits, group_size, scheme, "QuantizedLinear")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.scheme, self.backend = bits, scheme, backend
        self.group_size = group_size_for(in_features, bits, group_size, "QuantizedLinear")
        groups = in_features // self.group_size
        if bits == 4:
            qweight = torch.zeros(out_features, in_features // 2, dtype=torch.uint8)
        else:
            qweight = torch.zeros(out_features, in_features, dtype=torch.int8 if scheme == "symmetric" else torch.uint8)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", torch.ones(out_features, groups))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8)
                             if scheme == "asymmetric" else None)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None = None, scheme: str = "symmetric",
                    backend: str = "auto") -> QuantizedLinear:
        layer = cls(linear.in_features, linear.out_features, bits, group_size, scheme, linear.bias is not None, backend)
        quantized = quantize_weight(linear.weight, bits, layer.group_size, scheme)
        layer.qweight.copy_(quantized.qweight)
        layer.scales.copy_(quantized.scales)
        if quantized.zeros is not None:
            layer.zeros.copy_(quantized.zeros)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer.to(linear.weight.device)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (N, K) weight this layer multiplies by."""
        return dequantize_weight(self.qweight, self.scales, self.zeros, self.bits, self.group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        y = dispatch.quant_matmul(x, self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.backend)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, scheme={self.scheme}, bias={self.bias is not None}")


def _quantizable(model: nn.Module) -> dict[str, nn.Linear]:
    """{name: layer} of every nn.Linear named one of QUANT_TARGETS, in the model's order."""
    for name, module in model.named_modules():
        if hasattr(module, "lora_A"):
            raise ValueError(f"quantize_model: {name} is a LoRA layer; merge the adapters first "
                             f"(minillm.lora.merge_lora(model))")
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rpartition(".")[2] in QUANT_TARGETS}


def quantize_model(model: nn.Module, bits: int, group_size: int | None = None, scheme: str = "symmetric",
                   skip: tuple[str, ...] = (), backend: str = "auto") -> list[str]:
    """Replace the attention and MLP projections of `model` by QuantizedLinear layers, in place;
    returns their names. Embeddings, heads, norms and biases stay in floating point (module docstring).

    group_size: inputs per group; None: one group per output channel (per-channel int8).
    skip: fnmatch patterns of layer names to keep in floating point ("decoder.blocks.0.*"); a
    pattern that matches no quantizable layer is a ValueError, as is a model with none left.
    """
    check_settings(bits, group_size, scheme, "quantize_model")
    layers = _quantizable(model)
    unmatched = [p for p in skip if not any(fnmatch.fnmatchcase(name, p) for name in layers)]
    if unmatched:
        raise ValueError(f"quantize_model: skip patterns {unmatched} match none of the quantizable layers "
                         f"({list(layers)[:4]}...)")
    chosen = [name for name in layers if not any(fnmatch.fnmatchcase(name, p) for p in skip)]
    if not chosen:
        raise ValueError(f"quantize_model: {type(model).__name__} has no {QUANT_TARGETS} nn.Linear layers left to "
                         f"quantize (already quantized, or all skipped)")
    for name in chosen:  # check every shape before replacing any layer: all or nothing
        group_size_for(layers[name].in_features, bits, group_size, f"quantize_model: {name}")
    for name in chosen:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, QuantizedLinear.from_linear(layers[name], bits, group_size, scheme, backend))
    return chosen


def make_quantized_layers(model: nn.Module, names: list[str], bits: int, group_size: int | None, scheme: str,
                          backend: str = "auto") -> None:
    """Replace the layers `names` of a freshly built model by empty QuantizedLinear layers of the same
    shapes, ready for a quantized checkpoint's state dict (minillm.checkpoint.load_model)."""
    check_settings(bits, group_size, scheme, "quantization")
    layers = _quantizable(model)
    missing = [name for name in names if name not in layers]
    if missing:
        raise ValueError(f"quantization: the model has no quantizable layers named {missing[:4]}")
    for name in names:
        linear = layers[name]
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, QuantizedLinear(linear.in_features, linear.out_features, bits, group_size, scheme,
                                              linear.bias is not None, backend))
