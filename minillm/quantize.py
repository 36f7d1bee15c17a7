"""Weight-only quantization of linear layers: per-channel int8 and group-wise int4, for inference.

Each weight row (one output channel) is cut into groups of `group_size` consecutive inputs
(group_size=None: the whole row, one group per output channel). Every group gets its own float32
scale s (and, asymmetric, an integer zero point z); a weight w is stored as an integer code q:

    symmetric (absmax):   s = max|w| / Qs,             q = clamp(round(w / s), -Qs, Qs),      w' = q s
    asymmetric (min-max): lo = min(min w, 0), hi = max(max w, 0),
                          s = (hi - lo) / Qa,  z = round(-lo / s),
                          q = clamp(round(w / s) + z, 0, Qa),                             w' = (q - z) s

with Qs = 2^(b-1) - 1 (127 for int8, 7 for int4) and Qa = 2^b - 1 (255, 15). Both keep every
element within half a step of its value, |w - w'| <= s / 2, because the clamp never cuts: |w / s|
<= Qs, and w / s + z lies in [-1/2, Qa + 1/2] (z is -lo / s rounded). The asymmetric range always
holds 0 (so a zero weight stays exactly zero and z is in [0, Qa]), and its step is never coarser:
(hi - lo) / (2^b - 1) <= 2 max|w| / (2^b - 2). An all-zero group gets the smallest normal float32
as its scale, so no division by zero happens and every code is exact.

Storage (what a QuantizedLinear holds; `N` outputs, `K` inputs, `G = K / group_size` groups):
    qweight   int8 symmetric: (N, K) int8, codes in [-127, 127]
              int8 asymmetric: (N, K) uint8, codes in [0, 255]
              int4: (N, K / 2) uint8, two codes per byte: input 2j in the low nibble, 2j + 1 in the
              high one; symmetric codes are stored offset by 8 (q + 8 in [1, 15]), asymmetric ones as is
    scales    (N, G) float32
    zeros     (N, G) uint8, asymmetric only
so that in every case w' = (code - zero) * scale, with zero = zeros[n, g], 8 (symmetric int4) or
0 (symmetric int8). Per-channel int8 costs 8 bits a weight plus 32 (or 40) bits a row; int4 with
groups of 128 costs 4.25 (4.31) bits a weight.

The layer that holds these tensors, and `quantize_model`, which puts it in a model, are in
minillm.quantized. This module is plain PyTorch and the semantics of the Triton kernel
(kernels/quant_matmul.py): `quant_matmul_reference` dequantizes the whole weight and calls
torch.matmul. Not supported: bit widths other than 4 and 8, activation quantization, and
training through quantized weights (rounding has no useful gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (4, 8)
SCHEMES = ("symmetric", "asymmetric")
INT4_SYMMETRIC_OFFSET = 8  # symmetric int4 codes q in [-7, 7] are stored as q + 8, one unsigned nibble


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


def check_settings(bits, group_size, scheme, where: str = "quantize") -> None:
    """ValueError naming the argument unless bits is 4 or 8, group_size None or an int >= 1, and
    scheme 'symmetric' or 'asymmetric'."""
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"{where}: bits must be 4 or 8, got {bits!r}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size <= 0):
        raise ValueError(f"{where}: group_size must be an integer >= 1, or None for one group per output channel, "
                         f"got {group_size!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"{where}: scheme must be one of {SCHEMES}, got {scheme!r}")


def group_size_for(in_features: int, bits: int, group_size: int | None, where: str) -> int:
    """The group size of a layer with `in_features` inputs (None: the whole row); refuses shapes
    that cannot be grouped or packed."""
    size = in_features if group_size is None else group_size
    if in_features % size:
        raise ValueError(f"{where}: in_features {in_features} is not a multiple of group_size {size}; choose a "
                         f"group_size that divides it, or None for one group per output channel")
    if bits == 4 and in_features % 2:
        raise ValueError(f"{where}: int4 packs two inputs per byte, so in_features must be even, got {in_features}")
    return size


# --------------------------------------------------------------------------------------------
# Packing int4 codes two to a byte
# --------------------------------------------------------------------------------------------


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 codes in [0, 15] -> (N, K / 2) uint8: input 2j in the low nibble, 2j + 1 in the high."""
    if codes.dtype != torch.uint8 or codes.dim() != 2 or codes.shape[1] % 2:
        raise ValueError(f"pack_int4: expected a 2-D uint8 tensor with an even number of columns, "
                         f"got {codes.dtype} of shape {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"pack_int4: codes must be in [0, 15], got a maximum of {int(codes.max())}")
    return codes[:, 0::2] | (codes[:, 1::2] << 4)  # (N, K/2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K / 2) uint8 -> (N, K) uint8 codes in [0, 15]; the inverse of pack_int4."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack_int4: expected a 2-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    low, high = packed & 0x0F, packed >> 4  # (N, K/2) each
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)  # (N, K/2, 2) -> (N, K)


# --------------------------------------------------------------------------------------------
# Quantize and dequantize one weight
# --------------------------------------------------------------------------------------------


@dataclass
class QuantizedWeight:
    qweight: torch.Tensor  # int8 (N, K), uint8 (N, K) or packed uint8 (N, K/2): see the module docstring
    scales: torch.Tensor  # (N, G) float32 (a model cast to half precision casts them too)
    zeros: torch.Tensor | None  # (N, G) uint8, asymmetric only
    bits: int
    group_size: int  # inputs per group (K for one group per output channel)


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int | None = None,
                    scheme: str = "symmetric") -> QuantizedWeight:
    """Quantize an (N, K) weight group-wise (module docstring); group_size None: per output channel."""
    check_settings(bits, group_size, scheme, "quantize_weight")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_weight: expected a 2-D floating-point weight, got {weight.dtype} "
                         f"of shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError("quantize_weight: the weight holds inf or NaN values, which have no integer code")
    n, k = weight.shape
    size = group_size_for(k, bits, group_size, "quantize_weight")
    w = weight.detach().float().reshape(n, k // size, size)  # (N, G, S)
    tiny = torch.finfo(torch.float32).tiny
    if scheme == "symmetric":
        q_max = 2 ** (bits - 1) - 1
        scales = (w.abs().amax(dim=-1) / q_max).clamp_min(tiny)  # (N, G)
        q = torch.round(w / scales[..., None]).clamp(-q_max, q_max)  # (N, G, S)
        zeros = None
        codes = q.to(torch.int8) if bits == 8 else (q + INT4_SYMMETRIC_OFFSET).to(torch.uint8)
    else:
        q_max = 2**bits - 1
        lo = w.amin(dim=-1).clamp(max=0.0)  # (N, G): the range always holds 0
        hi = w.amax(dim=-1).clamp(min=0.0)
        scales = ((hi - lo) / q_max).clamp_min(tiny)  # (N, G)
        zero = torch.round(-lo / scales).clamp(0, q_max)  # (N, G)
        q = (torch.round(w / scales[..., None]) + zero[..., None]).clamp(0, q_max)  # (N, G, S)
        zeros = zero.to(torch.uint8)
        codes = q.to(torch.uint8)
    codes = codes.reshape(n, k)  # (N, K)
    qweight = pack_int4(codes) if bits == 4 else codes
    return QuantizedWeight(qweight.contiguous(), scales.contiguous(), zeros, bits, size)


def check_quantized(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                    group_size: int, where: str) -> tuple[int, int]:
    """(N, K) of a quantized weight after checking that its tensors fit together; ValueError naming
    the tensor otherwise. Shared by the reference and the kernel's launcher."""
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"{where}: bits must be 4 or 8, got {bits!r}")
    if qweight.dim() != 2:
        raise ValueError(f"{where}: qweight must be 2-D (N, K) or packed (N, K/2), got shape {tuple(qweight.shape)}")
    allowed = (torch.uint8,) if bits == 4 or zeros is not None else (torch.int8,)
    if qweight.dtype not in allowed:
        kind = "packed int4" if bits == 4 else ("asymmetric int8" if zeros is not None else "symmetric int8")
        raise ValueError(f"{where}: a {kind} qweight must be {allowed[0]}, got {qweight.dtype}")
    n = qweight.shape[0]
    k = qweight.shape[1] * (2 if bits == 4 else 1)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or k % group_size:
        raise ValueError(f"{where}: group_size must be an integer >= 1 dividing K={k}, got {group_size!r}")
    groups = k // group_size
    if scales.shape != (n, groups) or not scales.is_floating_point():
        raise ValueError(f"{where}: scales must be floating point of shape {(n, groups)} (N, K/group_size), got "
                         f"{scales.dtype} of shape {tuple(scales.shape)}")
    if zeros is not None and (zeros.shape != (n, groups) or zeros.dtype != torch.uint8):
        raise ValueError(f"{where}: zeros must be uint8 of shape {(n, groups)}, got {zeros.dtype} of shape "
                         f"{tuple(zeros.shape)}")
    return n, k


def dequantize_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                      bits: int = 8, group_size: int | None = None, dtype: torch.dtype = torch.float32
                      ) -> torch.Tensor:
    """w' = (code - zero) * scale as an (N, K) tensor of `dtype`, computed in float32 (float64 stays);
    group_size None: one group per row."""
    if group_size is None:
        group_size = qweight.shape[1] * (2 if bits == 4 else 1)
    n, k = check_quantized(qweight, scales, zeros, bits, group_size, "dequantize_weight")
    codes = unpack_int4(qweight) if bits == 4 else qweight  # (N, K)
    wide = torch.promote_types(dtype, torch.float32)
    if zeros is not None:
        zero = zeros.to(wide)
    else:
        zero = torch.full_like(scales, INT4_SYMMETRIC_OFFSET if bits == 4 else 0, dtype=wide)  # (N, G)
    groups = codes.to(wide).reshape(n, k // group_size, group_size)  # (N, G, S)
    w = (groups - zero[..., None]) * scales.to(wide)[..., None]  # (N, G, S)
    return w.reshape(n, k).to(dtype)


def quant_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                           zeros: torch.Tensor | None = None, bits: int = 8, group_size: int | None = None
                           ) -> torch.Tensor:
    """x @ w'^T for x of shape (..., K): the whole weight dequantized, then one torch.matmul, in
    float32 (float64 for float64 x); the result in x's dtype. The semantics the kernel is tested against."""
    wide = torch.promote_types(x.dtype, torch.float32)
    w = dequantize_weight(qweight, scales, zeros, bits, group_size, dtype=wide)  # (N, K)
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"quant_matmul: x has {x.shape[-1]} features in its last dimension, the weight expects {w.shape[1]}")
    return torch.matmul(x.to(wide), w.t()).to(x.dtype)  # (..., K) @ (K, N) -> (..., N)
