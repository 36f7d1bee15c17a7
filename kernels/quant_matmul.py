"""Weight-only quantized matmul in Triton: y = x w'^T with int8 or packed int4 weights, dequantized in registers.

Legend: M rows of activations (every leading dimension flattened), K inputs, N outputs,
G = K / group_size groups per weight row.

Public function:
    quant_matmul(x, qweight, scales, zeros=None, bits=8, group_size=None) -> (..., N)
with the pure-PyTorch reference `quant_matmul_reference` (minillm/quantize.py, re-exported here),
which dequantizes the whole weight and calls torch.matmul, and defines the semantics. The weight
format (codes, scales, zero points, the int4 packing) is minillm/quantize.py's.

Supported:
    - activations x of shape (..., K) in float16, bfloat16 or float32 on a CUDA device (or on CPU
      under TRITON_INTERPRET=1); the result takes x's dtype and shape (..., N);
    - symmetric int8 (int8 codes), asymmetric int8 (uint8 codes and zero points), int4 packed two
      per uint8 byte (symmetric codes offset by 8, or asymmetric codes and zero points);
    - one group per weight row (per-channel, any K), or groups whose size is a multiple of 32;
    - scales of any floating dtype (converted to float32, a copy of N * G numbers).
Not supported:
    - gradients: this is inference only, so there is no autograd.Function; an x that requires grad
      (with grad mode on) is refused rather than given a result gradients cannot flow through;
    - group sizes that are not multiples of 32 (except the whole row): the dispatcher's `auto`
      uses the reference for those, and this function raises;
    - float64 (use the reference), and CPU tensors outside the interpreter;
    - torch.compile: unlike the attention and norm kernels, this one is not registered as a torch
      custom op (kernels/ops.py), and compiling a model through it is untested.

Algorithm. Each program owns a (BLOCK_M, BLOCK_N) tile of y and walks K in steps of BLOCK_K, a
step that never crosses a group boundary (BLOCK_K divides group_size, or there is one group).
Within a step every output column n has one scale s_n and one zero point z_n, so

    y[m, n] = sum over steps of  s_n * sum_k x[m, k] (q[n, k] - z_n)

The centred codes q - z are integers in [-255, 255], exact in float16 and bfloat16 (and fp32), so
the inner sum runs on tensor cores with the weight tile cast to x's dtype without any rounding,
accumulated in float32; the scale multiplies the float32 partial sum once per step and column.
The weight tile is loaded as stored, (BLOCK_N, BLOCK_K) with k contiguous (vectorised loads), and
transposed for the dot. An int4 tile is loaded as (BLOCK_N, BLOCK_K / 2) bytes; the low and high
nibbles are joined side by side and flattened, which puts inputs 2j and 2j + 1 back in order.
Float32 inputs use input_precision="ieee" (exact fp32 FMA, not TF32), as the attention kernel
does, on a narrow tile: float32 is supported, not fast. Offsets are int32, so x, y and the codes
must each hold fewer than 2^31 elements (checked).

Memory traffic, with s bytes per element of x and b bits per weight: the codes N K b / 8 bytes,
the scales and zero points N G (4 + 1) bytes, read once per block of BLOCK_M rows; x (M K s) once
per block of BLOCK_N columns; y (M N s) once. At M <= 16 (decoding) that is one read of the
codes: b / 16 of an fp16 weight's bytes. Dequantize-then-matmul moves the codes too, then writes
and reads the whole dequantized weight (2 N K * 4 bytes, float32) on every call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from minillm.quantize import INT4_SYMMETRIC_OFFSET, check_quantized, quant_matmul_reference

__all__ = ["quant_matmul", "quant_matmul_reference", "kernel_supports", "launch_config"]

# The reference is minillm.quantize.quant_matmul_reference (imported above): it dequantizes the
# whole weight in float32 and calls torch.matmul. The kernel computes the same sum, in a different
# order: the scale multiplies each step's partial sum instead of each weight.


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST is set only under TRITON_INTERPRET=1, whose numpy
    `tl.dot` multiplies bf16 bit patterns as integers; the upcast is exact."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _quant_matmul_kernel(
    X,  # activations, (M, K), last dimension contiguous
    W,  # codes: (N, K) int8 or uint8, or (N, K/2) uint8 holding two int4 codes a byte
    Scales,  # (N, G) float32, contiguous
    Zeros,  # (N, G) uint8, contiguous; read only if HAS_ZEROS
    Y,  # written: (M, N) in x's dtype, contiguous
    M,  # rows of x
    N,  # output features
    K,  # input features
    stride_xm,  # elements between consecutive rows of X
    stride_wn,  # elements (bytes) between consecutive rows of W
    group_size,  # inputs per group: K for one group per row, else a multiple of BLOCK_K
    BITS: tl.constexpr,  # 8 or 4
    HAS_ZEROS: tl.constexpr,  # asymmetric: per-group zero points in Zeros
    ZERO: tl.constexpr,  # the implicit zero point without HAS_ZEROS: 8 (int4) or 0 (int8)
    BLOCK_M: tl.constexpr,  # rows of x per program
    BLOCK_N: tl.constexpr,  # output columns per program
    BLOCK_K: tl.constexpr,  # inputs per step; divides group_size (or there is one group)
    UPCAST: tl.constexpr,  # interpreter only: dot operands in fp32 (see _dot)
    PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee" for fp32 inputs
):
    """Program (i, j) computes y[i*BLOCK_M : (i+1)*BLOCK_M, j*BLOCK_N : (j+1)*BLOCK_N]."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    groups = K // group_size
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (BM, BK)
        # The weight tile as stored, (BN, BK) with k contiguous, so that its loads are vectorised.
        if BITS == 8:
            codes = tl.load(W + offs_n[:, None] * stride_wn + offs_k[None, :],
                            mask=mask_n[:, None] & mask_k[None, :], other=0).to(tl.int32)  # (BN, BK)
        else:
            offs_byte = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(W + offs_n[:, None] * stride_wn + offs_byte[None, :],
                             mask=mask_n[:, None] & (offs_byte < K // 2)[None, :], other=0).to(tl.int32)  # (BN, BK/2)
            # Input 2j is byte j's low nibble, 2j + 1 its high one: join them side by side and
            # flatten, (BN, BK/2, 2) -> (BN, BK), which puts them back in k order.
            codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_N, BLOCK_K))
        group = k0 // group_size  # the same for the whole step
        scale = tl.load(Scales + offs_n * groups + group, mask=mask_n, other=0.0).to(tl.float32)  # (BN,)
        if HAS_ZEROS:
            zero = tl.load(Zeros + offs_n * groups + group, mask=mask_n, other=0).to(tl.int32)  # (BN,)
            centred = codes - zero[:, None]
        else:
            centred = codes - ZERO
        # Padding lanes (k >= K) have x = 0, so their centred code (-zero) adds nothing.
        if UPCAST:  # the interpreter's int32 -> bf16 cast gives garbage; fp32 is exact too
            w = centred.to(tl.float32)  # (BN, BK)
        else:
            w = centred.to(X.dtype.element_ty)  # (BN, BK), exact: |q - z| <= 255
        acc += _dot(x, tl.trans(w), UPCAST, PRECISION) * scale[None, :]  # (BM, BK) @ (BK, BN)
    y_ptrs = Y + offs_m[:, None] * N + offs_n[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# --------------------------------------------------------------------------------------------
# Launcher: check inputs, allocate, choose blocks, launch
# --------------------------------------------------------------------------------------------

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_GROUP_MULTIPLE = 32  # the smallest K step; grouped weights need group_size % 32 == 0


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# On a GPU, by (BLOCK_M, BLOCK_N, num_warps, num_stages): a short tile for decoding (M <= 16 rows,
# one token per sequence), a wide one for prefill and batches, and a narrow one (K step 32) for
# float32 and for weight rows not 16-byte aligned (K % 16 != 0 int8, K % 32 != 0 int4), whose
# byte-wise loads the larger tiles spill on (tests/test_quant_matmul_compile.py).
# Under the interpreter: one small tile (programs run one by one).
DECODE_TILE = (16, 64, 4, 3)
PREFILL_TILE = (64, 128, 8, 3)
NARROW_TILE = (16, 32, 4, 2)
INTERPRETER_TILE = (16, 16, 1, 1)
BLOCK_KS = (32, 64)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernel_supports(group_size: int, in_features: int) -> bool:
    """Whether the kernel takes this grouping: one group per row, or groups a multiple of 32 inputs."""
    return group_size == in_features or group_size % _GROUP_MULTIPLE == 0


def launch_config(m: int, group_size: int, in_features: int, dtype: torch.dtype, row_bytes: int,
                  interpreting: bool | None = None) -> LaunchConfig:
    """The blocks for M rows of `dtype`, this grouping and weight rows of `row_bytes` bytes: the
    tile by M, dtype and alignment (see DECODE_TILE); BLOCK_K 64 when it divides the group (or
    there is one group) and the tile is not the narrow one, else 32."""
    interpreting = _interpreting() if interpreting is None else interpreting
    narrow = dtype == torch.float32 or row_bytes % 16 != 0
    if interpreting:
        tile = INTERPRETER_TILE
    else:
        tile = NARROW_TILE if narrow else (DECODE_TILE if m <= 16 else PREFILL_TILE)
    one_group = group_size == in_features
    block_k = 64 if not narrow and (one_group or group_size % 64 == 0) else 32
    return LaunchConfig(tile[0], tile[1], block_k, tile[2], tile[3])


def _check_inputs(x, qweight, scales, zeros, bits, group_size) -> tuple[int, int]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quant_matmul: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"quant_matmul: x must be float16, bfloat16 or float32, got {x.dtype} "
                        f"(use quant_matmul_reference for others)")
    if x.device.type != "cuda" and not _interpreting():
        raise ValueError(f"quant_matmul: x must be a CUDA tensor for the Triton kernel (or set TRITON_INTERPRET=1 "
                         f"for CPU tensors), got device {x.device}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if t is not None and t.device != x.device:
            raise ValueError(f"quant_matmul: {name} is on {t.device}, x on {x.device}; put them on one device")
    if torch.is_grad_enabled() and x.requires_grad:
        raise ValueError("quant_matmul: x requires grad, but the kernel is inference only (no backward); run it "
                         "under torch.no_grad() or use quant_matmul_reference")
    n, k = check_quantized(qweight, scales, zeros, bits, group_size, "quant_matmul")
    if x.shape[-1] != k:
        raise ValueError(f"quant_matmul: x has {x.shape[-1]} features in its last dimension, the weight expects {k}")
    if max(x.numel(), qweight.numel(), x.numel() // max(k, 1) * n) >= 2**31:
        raise ValueError("quant_matmul: tensors of 2^31 elements or more are not supported (the kernel's offsets "
                         "are int32); split x into smaller batches")
    if not kernel_supports(group_size, k):
        raise ValueError(f"quant_matmul: group_size must be the whole row ({k}) or a multiple of {_GROUP_MULTIPLE} "
                         f"for the kernel, got {group_size}; use quant_matmul_reference")
    return n, k


def _quant_matmul_forward(x, qweight, scales, zeros, bits, group_size) -> torch.Tensor:
    """Check, allocate and launch; x (..., K) -> y (..., N)."""
    n, k = _check_inputs(x, qweight, scales, zeros, bits, group_size)
    x2 = x.reshape(-1, k).contiguous()  # (M, K), rows K apart
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)  # (M, N)
    if m == 0 or n == 0:
        return y.reshape(*x.shape[:-1], n)
    scales32 = scales.to(torch.float32).contiguous()
    zeros_arg = zeros.contiguous() if zeros is not None else scales32  # never read without HAS_ZEROS
    c = launch_config(m, group_size, k, x.dtype, qweight.shape[1])
    grid = (triton.cdiv(m, c.block_m), triton.cdiv(n, c.block_n))
    _quant_matmul_kernel[grid](
        x2, qweight.contiguous(), scales32, zeros_arg, y, m, n, k, k, qweight.shape[1], group_size,
        BITS=bits, HAS_ZEROS=zeros is not None, ZERO=INT4_SYMMETRIC_OFFSET if bits == 4 else 0,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, UPCAST=_interpreting(),
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=c.num_warps, num_stages=c.num_stages)
    return y.reshape(*x.shape[:-1], n)


# --------------------------------------------------------------------------------------------
# Public function (inference only: no autograd.Function, see the module docstring)
# --------------------------------------------------------------------------------------------


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                 bits: int = 8, group_size: int | None = None) -> torch.Tensor:
    """x @ w'^T, w' the dequantized weight (minillm.quantize's format); group_size None: one group
    per weight row. x (..., K) -> (..., N) in x's dtype."""
    if group_size is None:
        group_size = qweight.shape[-1] * (2 if bits == 4 else 1) if qweight.dim() == 2 else 0
    return _quant_matmul_forward(x, qweight, scales, zeros, bits, group_size)
