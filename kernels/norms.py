"""Fused LayerNorm and RMSNorm in Triton, forward and backward, with an optional residual add.

Legend: M rows (every leading dimension flattened), N the normalised size (the product of
`normalized_shape`), G reduction groups (programs of the backward pass).

Public functions (drop-in for `torch.nn.functional.layer_norm` / `rms_norm`):
    layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5)
    rms_norm(input, normalized_shape, weight=None, eps=None)      # eps=None: finfo(dtype).eps
    add_layer_norm(x, residual, weight, bias, eps=1e-5, residual_dtype=None) -> (normed, x + residual)
    add_rms_norm(x, residual, weight, eps=None, residual_dtype=None) -> (normed, x + residual)
and the pure-PyTorch references `layer_norm_reference`, `rms_norm_reference`,
`add_layer_norm_reference`, `add_rms_norm_reference`, which define the semantics.

Supported:
    - inputs in float16, bfloat16 or float32 on a CUDA device (or on CPU under TRITON_INTERPRET=1);
      statistics and every sum are accumulated in float32;
    - weight and bias optional, of any of those dtypes independently of the input (e.g. float32
      weights with bfloat16 activations); outputs take the input's dtype, gradients their tensor's;
    - any normalised size N >= 1: up to `MAX_BLOCK_N` a row is held in registers and read once;
      above it the kernels loop over the row in chunks (tested to 65536 and beyond);
    - any leading shape and row stride (the last dimension must be contiguous or it is copied);
    - the gradients dx, dweight, dbias, and with a residual, d(x) = d(residual) = the gradient
      of the sum, including the gradient that reaches the new residual directly;
    - deterministic dweight/dbias: each backward program sums its rows into its own row of a
      (G, N) float32 buffer, which is then summed over G. No atomics, no locks; any M, also M < G.
Not supported:
    - float64 (use the references), a `normalized_shape` that is not a suffix of the input shape,
      `torch.compile` tracing through add_layer_norm / add_rms_norm (layer_norm and rms_norm run as
      the custom op `torch.ops.minillm.norm_forward` of kernels/ops.py, which it traces without a
      graph break), and CPU tensors outside the interpreter
      (the dispatcher chooses torch there; these functions raise instead of falling back).
    - the add_* variants normalise over the last dimension only.
Algorithm: one program per row in the forward, as in the Triton layer-norm tutorial; the weight
gradient reduced in two deterministic stages (per-program partial sums, then a sum over
programs), as in FlashAttention's and Liger-Kernel's Triton norms; Chan et al.'s pairwise
variance update to merge the chunks of rows longer than one block.

The math, per row x of length N (w = weight or 1, b = bias or 0):

    LayerNorm:  mu = sum(x)/N,  var = sum((x - mu)^2)/N,  rstd = 1/sqrt(var + eps)
                xhat = (x - mu) * rstd,  y = xhat * w + b
    RMSNorm:    rstd = 1/sqrt(sum(x^2)/N + eps),  xhat = x * rstd,  y = xhat * w

Backward. With g = dy * w (the gradient reaching xhat) and the per-row means
    c1 = sum(g * xhat)/N,  c2 = sum(g)/N :
    LayerNorm:  dx = rstd * (g - xhat * c1 - c2)
    RMSNorm:    dx = rstd * (g - xhat * c1)
Derivation (LayerNorm): d(xhat_j)/d(x_i) = rstd * (delta_ij - 1/N - xhat_i * xhat_j / N), since
d(mu)/dx_i = 1/N and d(rstd)/dx_i = -rstd^3 (x_i - mu)/N = -rstd^2 xhat_i / N. Contracting with
g_j gives rstd * (g_i - c2 - xhat_i * c1). RMSNorm has no mean, so the 1/N term and c2 vanish.
Parameters: dw = sum over rows of dy * xhat, db = sum over rows of dy.
Residual: h = x + residual, y = norm(h), new_residual = h. Both x and residual receive
dh = d(norm)/dh + d(new_residual): the residual stream is read once and written once forward.
The forward normalises the float32 sum; the backward reads the stored sum back, so with a
half-precision residual its xhat differs from the forward's by that rounding (within tolerance).

Memory traffic (elements of the activation dtype per row): forward reads x (and residual) and
writes y (and h): 2N, or 4N with a residual; backward reads x and dy (and d(new_residual)) and
writes dx: 3N, or 4N. The weight gradient adds G*N float32 writes and one reduction over them.
Rows longer than MAX_BLOCK_N cost more: the forward reads each row twice (the second time
usually from L2), and the backward reads x and dy twice, in two kernels, because every dx
needs the row sums c1, c2 first: 5N instead of 3N.
"""

from __future__ import annotations

import functools
import numbers

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from minillm.kernels import ops

# --------------------------------------------------------------------------------------------
# References in plain PyTorch. They define the semantics; tests compare against them in float64.
# --------------------------------------------------------------------------------------------


def _as_shape(normalized_shape) -> tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    return tuple(int(d) for d in normalized_shape)


def layer_norm_reference(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """LayerNorm over the trailing `normalized_shape` dims, computed in float32 (float64 stays)."""
    dims = tuple(range(-len(_as_shape(normalized_shape)), 0))
    x = input.to(torch.promote_types(input.dtype, torch.float32))
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).pow(2).mean(dims, keepdim=True)  # biased variance, as torch
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.to(input.dtype)


def rms_norm_reference(input, normalized_shape, weight=None, eps=None):
    """RMSNorm over the trailing dims; eps=None means torch.finfo(input.dtype).eps, as torch."""
    dims = tuple(range(-len(_as_shape(normalized_shape)), 0))
    eps = torch.finfo(input.dtype).eps if eps is None else eps
    x = input.to(torch.promote_types(input.dtype, torch.float32))
    y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(x.dtype)
    return y.to(input.dtype)


def _residual_sum_reference(x, residual, residual_dtype):
    """h = x + residual in float32 (or float64), and h rounded to the new residual's dtype."""
    if residual is None:
        return x, x if residual_dtype is None else x.to(residual_dtype)
    wide = torch.promote_types(torch.promote_types(x.dtype, residual.dtype), torch.float32)
    h = x.to(wide) + residual.to(wide)
    return h, h.to(residual_dtype or residual.dtype)


def add_layer_norm_reference(x, residual, weight, bias, eps=1e-5, residual_dtype=None):
    """(layer_norm(x + residual), x + residual); the norm sees the unrounded sum."""
    h, new_residual = _residual_sum_reference(x, residual, residual_dtype)
    return layer_norm_reference(h, x.shape[-1], weight, bias, eps).to(x.dtype), new_residual


def add_rms_norm_reference(x, residual, weight, eps=None, residual_dtype=None):
    """(rms_norm(x + residual), x + residual); eps=None uses finfo(x.dtype).eps."""
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    h, new_residual = _residual_sum_reference(x, residual, residual_dtype)
    return rms_norm_reference(h, x.shape[-1], weight, eps).to(x.dtype), new_residual


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_row_chunk(X, R, H, cols, mask, HAS_RESIDUAL: tl.constexpr, STORE_H: tl.constexpr):
    """Load x[cols] (+ residual[cols]) as float32; with STORE_H also write the sum to H."""
    x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(R + cols, mask=mask, other=0.0).to(tl.float32)
        if STORE_H:
            tl.store(H + cols, x.to(H.dtype.element_ty), mask=mask)
    return x


@triton.jit
def _norm_fwd_kernel(
    X,  # input rows, (M, N)
    R,  # residual rows, (M, N); read only if HAS_RESIDUAL
    H,  # new residual rows x + residual, (M, N); written only if HAS_RESIDUAL
    W,  # weight, (N,); read only if HAS_WEIGHT
    B,  # bias, (N,); read only if HAS_BIAS
    Y,  # output rows, (M, N)
    Mean,  # per-row mean, (M,) float32; written only for LayerNorm
    Rstd,  # per-row 1/sqrt(var + eps), (M,) float32
    stride_x,  # elements between consecutive rows of X
    stride_r,  # ... of R
    stride_h,  # ... of H
    stride_y,  # ... of Y
    N,  # row length
    eps,  # added to the variance (or mean square) before the square root
    IS_RMS: tl.constexpr,  # RMSNorm (no mean, no bias) instead of LayerNorm
    HAS_RESIDUAL: tl.constexpr,  # add R to X first and store the sum in H
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,  # columns per step: the whole row when N <= BLOCK_N
    SINGLE_BLOCK: tl.constexpr,  # N <= BLOCK_N: keep the row in registers, read it once
):
    row = tl.program_id(0).to(tl.int64)  # one program per row; int64 so row * stride can't overflow
    X += row * stride_x
    R += row * stride_r
    H += row * stride_h
    Y += row * stride_y

    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        x = _load_row_chunk(X, R, H, cols, mask, HAS_RESIDUAL, True)
        if IS_RMS:
            mean = 0.0
            m2 = tl.sum(x * x, axis=0)
        else:
            mean = tl.sum(x, axis=0) / N
            xc = tl.where(mask, x - mean, 0.0)  # padding lanes must not add (0 - mean)^2
            m2 = tl.sum(xc * xc, axis=0)
    else:
        # Pass 1 over the row: merge each chunk's (count, mean, sum of squared deviations) into
        # the running ones (Chan et al.). Summing x and x^2 instead would cancel catastrophically
        # when |mean| >> std.
        mean = tl.zeros([], dtype=tl.float32)
        m2 = tl.zeros([], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = _load_row_chunk(X, R, H, cols, mask, HAS_RESIDUAL, True)
            if IS_RMS:
                m2 += tl.sum(x * x, axis=0)
            else:
                n_a = start * 1.0  # elements merged so far, as float32
                n_b = tl.minimum(N - start, BLOCK_N) * 1.0  # elements in this chunk
                mean_b = tl.sum(x, axis=0) / n_b
                xc = tl.where(mask, x - mean_b, 0.0)
                delta = mean_b - mean
                mean += delta * (n_b / (n_a + n_b))
                m2 += tl.sum(xc * xc, axis=0) + delta * delta * (n_a * n_b / (n_a + n_b))
    rstd = 1.0 / tl.sqrt(m2 / N + eps)
    if not IS_RMS:
        tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)

    # Normalise and store; the loop path reads the row again (x + residual is recomputed
    # exactly as in pass 1, so the statistics match).
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        if not SINGLE_BLOCK:
            x = _load_row_chunk(X, R, H, cols, mask, HAS_RESIDUAL, False)
        y = (x - mean) * rstd
        if HAS_WEIGHT:
            y *= tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_row_sums_kernel(
    X,  # normalised input rows (x, or x + residual), (M, N)
    W,  # weight, (N,); read only if HAS_WEIGHT
    DY,  # output gradient rows, (M, N)
    Mean,  # per-row mean from the forward pass, (M,); read only for LayerNorm
    Rstd,  # per-row 1/std from the forward pass, (M,)
    RowSums,  # written: (M, 2) float32, per row c1 = mean(g * xhat) and c2 = mean(g)
    stride_x,  # elements between consecutive rows of X
    stride_dy,  # ... of DY
    N,  # row length
    IS_RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,  # columns per step of the loop over the row
):
    """For rows longer than one block: the two row means dx needs, before any dx is written."""
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    DY += row * stride_dy
    mean = 0.0 if IS_RMS else tl.load(Mean + row)
    rstd = tl.load(Rstd + row)
    sum_gxhat = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)  # 0 on padding lanes
        if HAS_WEIGHT:
            g *= tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        sum_gxhat += g * ((x - mean) * rstd)
        sum_g += g
    tl.store(RowSums + 2 * row, tl.sum(sum_gxhat, axis=0) / N)
    tl.store(RowSums + 2 * row + 1, tl.sum(sum_g, axis=0) / N)


@triton.jit
def _norm_bwd_kernel(
    X,  # normalised input rows (x, or x + residual), (M, N)
    W,  # weight, (N,); read only if HAS_WEIGHT
    DY,  # output gradient rows, (M, N)
    DH,  # gradient reaching the new residual directly, (M, N); read only if HAS_DH
    DX,  # written: input gradient rows, (M, N)
    DW,  # written: per-group partial dweight, (G, N) float32; only if HAS_WEIGHT
    DB,  # written: per-group partial dbias, (G, N) float32; only if HAS_BIAS
    Mean,  # per-row mean from the forward pass, (M,); read only for LayerNorm
    Rstd,  # per-row 1/std from the forward pass, (M,)
    RowSums,  # (M, 2) float32 from _norm_bwd_row_sums_kernel; read only if not SINGLE_BLOCK
    stride_x,  # elements between consecutive rows of X
    stride_dy,  # ... of DY
    stride_dh,  # ... of DH
    stride_dx,  # ... of DX
    M,  # number of rows
    N,  # row length
    rows_per_program,  # rows summed by each group into its partial dweight/dbias row
    IS_RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DH: tl.constexpr,
    BLOCK_N: tl.constexpr,  # columns handled by this program
    SINGLE_BLOCK: tl.constexpr,  # N <= BLOCK_N: compute the row means here from registers
):
    """Program (group, chunk) handles rows [group * rows_per_program, ...) and one column chunk."""
    group = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    row_start = group * rows_per_program
    n_rows = tl.minimum(rows_per_program, M - row_start)  # the last group may be short
    # Move every pointer to the group's first row (int64: row * stride may exceed 2^31), then
    # step one row per iteration.
    X += row_start.to(tl.int64) * stride_x
    DY += row_start.to(tl.int64) * stride_dy
    DH += row_start.to(tl.int64) * stride_dh
    DX += row_start.to(tl.int64) * stride_dx
    Mean += row_start
    Rstd += row_start
    RowSums += 2 * row_start

    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for _ in range(0, n_rows):
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd)
        if IS_RMS:
            xhat = x * rstd
        else:
            xhat = (x - tl.load(Mean)) * rstd
        g = dy * w if HAS_WEIGHT else dy  # 0 on padding lanes, so the sums below ignore them
        if SINGLE_BLOCK:
            c1 = tl.sum(g * xhat, axis=0) / N
            c2 = tl.sum(g, axis=0) / N
        else:
            c1 = tl.load(RowSums)
            c2 = tl.load(RowSums + 1)
        if IS_RMS:
            dx = (g - xhat * c1) * rstd
        else:
            dx = (g - xhat * c1 - c2) * rstd
        if HAS_DH:
            dx += tl.load(DH + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
        X += stride_x
        DY += stride_dy
        DH += stride_dh
        DX += stride_dx
        Mean += 1
        Rstd += 1
        RowSums += 2
    # Stage one of the deterministic reduction: this group's sums go to its own buffer row.
    if HAS_WEIGHT:
        tl.store(DW + group * N + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB + group * N + cols, db, mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers: check inputs, allocate, choose blocks, launch
# --------------------------------------------------------------------------------------------

# The longest row kept in registers. Compiled without spills for sm_80 and sm_90 (see
# tests/test_layer_norm_compile.py); longer rows loop in chunks of this size.
MAX_BLOCK_N = 8192
# The same limit under TRITON_INTERPRET=1, small so that tests reach the loop path cheaply.
INTERPRETER_MAX_BLOCK_N = 1024
# Backward reduction groups per SM: enough programs to keep every SM busy while the
# (G, N) float32 partial buffer stays a small fraction of the traffic.
GROUPS_PER_SM = 2
# Reduction groups under the interpreter (there is no SM count); small so M < G is tested.
INTERPRETER_GROUPS = 4

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERPRETING = isinstance(_norm_fwd_kernel, InterpretedFunction)


def max_block_n() -> int:
    """The single-block limit in force: MAX_BLOCK_N on a GPU, INTERPRETER_MAX_BLOCK_N otherwise."""
    return INTERPRETER_MAX_BLOCK_N if _INTERPRETING else MAX_BLOCK_N


def block_config(n: int, limit: int | None = None) -> tuple[int, bool]:
    """(BLOCK_N, SINGLE_BLOCK) for rows of length n: the next power of two (at least 16), capped
    at `limit` (default: max_block_n()); rows longer than the cap are processed in chunks."""
    limit = max_block_n() if limit is None else limit
    block = max(16, triton.next_power_of_2(n))
    return min(block, limit), block <= limit


def launch_config(block_n: int) -> dict:
    """num_warps and num_stages for a block: 8 elements of each row per thread (one 16-byte
    load in fp16/bf16), 1 to 32 warps. At BLOCK_N = 8192 the backward kernel keeps about eight
    such vectors live; with 16 warps it spills on sm_80 and sm_90, with 32 it fits in 64
    registers. tests/test_layer_norm_compile.py compiles this whole table for both targets."""
    return {"num_warps": min(max(block_n // 256, 1), 32), "num_stages": 2}


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_groups(x: torch.Tensor, m: int) -> int:
    """Backward programs G (before dropping empty ones): never more than the rows."""
    if _INTERPRETING or x.device.type != "cuda":
        return min(m, INTERPRETER_GROUPS)
    return min(m, GROUPS_PER_SM * _sm_count(x.device.index or 0))


def _check_inputs(name, x, normalized_shape, weight, bias, residual=None):
    """Validate and return (normalized_shape as tuple, N). `name` is the public function."""
    x_arg = "x" if name.startswith("add_") else "input"  # the public argument's name
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: {x_arg} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name}: {x_arg} dtype must be one of float16, bfloat16, float32; "
                        f"got {x.dtype} (float64 and integer inputs: use the reference)")
    shape = _as_shape(normalized_shape)
    if not 0 < len(shape) <= x.dim() or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise ValueError(f"{name}: normalized_shape {list(shape)} must equal the trailing "
                         f"dimensions of {x_arg}, whose shape is {list(x.shape)}")
    n = 1
    for d in shape:
        n *= d
    if n == 0:
        raise ValueError(f"{name}: normalized_shape {list(shape)} has no elements")
    if x.device.type != "cuda" and not _INTERPRETING:
        raise ValueError(f"{name}: {x_arg} must be a CUDA tensor, got device {x.device} "
                         "(on CPU use torch.nn.functional or the *_reference functions)")
    for arg, t in (("weight", weight), ("bias", bias), ("residual", residual)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name}: {arg} dtype must be one of float16, bfloat16, float32; "
                            f"got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: {arg} is on {t.device} but {x_arg} is on {x.device}; "
                             "all tensors must be on the same device")
        expected = tuple(x.shape) if arg == "residual" else shape
        if tuple(t.shape) != expected:
            raise ValueError(f"{name}: {arg} must have shape {list(expected)}, got {list(t.shape)}")
    return shape, n


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """View t as (M, N) rows with a contiguous last dimension (copies only if it must)."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 or n == 1 else t2.contiguous()


def _norm_forward(x, residual, weight, bias, eps, is_rms, residual_dtype):
    """Launch the forward kernel on (M, N) rows. Returns y, h (None without residual), mean, rstd."""
    m, n = x.shape
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    h = None if residual is None else torch.empty((m, n), dtype=residual_dtype, device=x.device)
    # RMSNorm has no mean; its kernel never writes one, so it is zeros (a defined op output).
    mean = (torch.zeros if is_rms else torch.empty)(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return y, h, mean, rstd
    block_n, single = block_config(n)
    _norm_fwd_kernel[(m,)](
        x, x if residual is None else residual, y if h is None else h,
        x if weight is None else weight, x if bias is None else bias, y, mean, rstd,
        x.stride(0), 0 if residual is None else residual.stride(0), n if h is None else h.stride(0),
        y.stride(0), n, eps,
        IS_RMS=is_rms, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, BLOCK_N=block_n, SINGLE_BLOCK=single, **launch_config(block_n))
    return y, h, mean, rstd


def _norm_backward(dy, x, weight, has_bias, mean, rstd, dh, dx_dtype, is_rms):
    """Launch the backward kernels on (M, N) rows. Returns dx, and float32 dweight and dbias
    (None when absent)."""
    m, n = x.shape
    dx = torch.empty((m, n), dtype=dx_dtype, device=x.device)
    groups = max(_num_groups(x, m), 1)
    rows_per_program = triton.cdiv(m, groups)
    groups = triton.cdiv(m, rows_per_program) if m else 0  # no empty groups
    f32 = dict(dtype=torch.float32, device=x.device)
    dw_partial = torch.empty((groups, n), **f32) if weight is not None else None
    db_partial = torch.empty((groups, n), **f32) if has_bias else None
    if m > 0:
        block_n, single = block_config(n)
        config = launch_config(block_n)
        row_sums = rstd  # unused placeholder on the single-block path
        if not single:
            row_sums = torch.empty((m, 2), **f32)
            _norm_bwd_row_sums_kernel[(m,)](
                x, x if weight is None else weight, dy, mean, rstd, row_sums,
                x.stride(0), dy.stride(0), n,
                IS_RMS=is_rms, HAS_WEIGHT=weight is not None, BLOCK_N=block_n, **config)
        _norm_bwd_kernel[(groups, triton.cdiv(n, block_n))](
            x, x if weight is None else weight, dy, dy if dh is None else dh, dx,
            dx if dw_partial is None else dw_partial, dx if db_partial is None else db_partial,
            mean, rstd, row_sums,
            x.stride(0), dy.stride(0), 0 if dh is None else dh.stride(0), dx.stride(0),
            m, n, rows_per_program,
            IS_RMS=is_rms, HAS_WEIGHT=weight is not None, HAS_BIAS=has_bias, HAS_DH=dh is not None,
            BLOCK_N=block_n, SINGLE_BLOCK=single, **config)
    # Stage two: a fixed-order sum over the groups, so the result is bitwise reproducible.
    dw = None if weight is None else dw_partial.sum(0)
    db = None if not has_bias else db_partial.sum(0)
    return dx, dw, db


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------


class _NormFunction(torch.autograd.Function):
    """Saves what the backward needs and delegates to the launchers; inputs are (M, N) rows."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, is_rms, residual_dtype):
        y, h, mean, rstd = _norm_forward(x, residual, weight, bias, eps, is_rms, residual_dtype)
        ctx.save_for_backward(x if h is None else h, weight, mean, rstd)
        ctx.is_rms = is_rms
        ctx.has_bias = bias is not None
        ctx.dtypes = (x.dtype, None if residual is None else residual.dtype,
                      None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        ctx.set_materialize_grads(False)
        return y if h is None else (y, h)

    @staticmethod
    def backward(ctx, dy, dh=None):
        normed_input, weight, mean, rstd = ctx.saved_tensors
        x_dtype, residual_dtype, weight_dtype, bias_dtype = ctx.dtypes
        if dy is None:
            dy = torch.zeros_like(normed_input, dtype=x_dtype)
        dy = _rows(dy, dy.shape[-1])
        dh = None if dh is None else _rows(dh, dh.shape[-1])
        dx_dtype = x_dtype if residual_dtype is None else torch.promote_types(x_dtype, residual_dtype)
        dx, dw, db = _norm_backward(dy, normed_input, weight, ctx.has_bias, mean, rstd, dh,
                                    dx_dtype, ctx.is_rms)
        dw = None if dw is None else dw.to(weight_dtype)
        db = None if db is None else db.to(bias_dtype)
        dres = None if residual_dtype is None else dx.to(residual_dtype)
        return dx.to(x_dtype), dres, dw, db, None, None, None


def _apply(name, x, residual, normalized_shape, weight, bias, eps, is_rms, residual_dtype=None):
    shape, n = _check_inputs(name, x, normalized_shape, weight, bias, residual)
    if residual_dtype is not None and residual_dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name}: residual_dtype must be one of float16, bfloat16, float32 or "
                        f"None, got {residual_dtype}")
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    x2 = _rows(x, n)
    w = None if weight is None else weight.reshape(n).contiguous()
    b = None if bias is None else bias.reshape(n).contiguous()
    if residual is None:  # the custom op, which torch.compile traces (kernels/ops.py)
        y, _, _ = ops.norm_forward(x2, w, b, float(eps), is_rms)
        return y.view(x.shape)
    res_dtype = residual_dtype or residual.dtype
    y, h = _NormFunction.apply(x2, _rows(residual, n), w, b, float(eps), is_rms, res_dtype)
    return y.view(x.shape), h.view(x.shape)


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """torch.nn.functional.layer_norm, fused in Triton (see the module docstring)."""
    return _apply("layer_norm", input, None, normalized_shape, weight, bias, eps, is_rms=False)


def rms_norm(input, normalized_shape, weight=None, eps=None):
    """torch.nn.functional.rms_norm, fused in Triton; eps=None means finfo(input.dtype).eps."""
    return _apply("rms_norm", input, None, normalized_shape, weight, None, eps, is_rms=True)


def add_layer_norm(x, residual, weight, bias, eps=1e-5, residual_dtype=None):
    """Pre-LN block step: h = x + residual; return (layer_norm(h), h) with one pass over memory.

    The norm is over the last dimension. `residual=None` means h = x. `residual_dtype` sets the
    new residual's dtype (default: the residual's, or x's), e.g. float32 to keep the residual
    stream in full precision; the normalised output takes x's dtype. Gradients reach x and residual.
    """
    if residual is None:
        return _plain_with_residual("add_layer_norm", x, weight, bias, eps, False, residual_dtype)
    return _apply("add_layer_norm", x, residual, x.shape[-1:], weight, bias, eps, False,
                  residual_dtype)


def add_rms_norm(x, residual, weight, eps=None, residual_dtype=None):
    """Pre-norm block step with RMSNorm: (rms_norm(x + residual), x + residual); see add_layer_norm."""
    if residual is None:
        return _plain_with_residual("add_rms_norm", x, weight, None, eps, True, residual_dtype)
    return _apply("add_rms_norm", x, residual, x.shape[-1:], weight, None, eps, True,
                  residual_dtype)


def _plain_with_residual(name, x, weight, bias, eps, is_rms, residual_dtype):
    """add_*_norm without a residual: the new residual is x itself (cast to residual_dtype)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    y = _apply(name, x, None, x.shape[-1:], weight, bias, eps, is_rms, residual_dtype)
    return y, x if residual_dtype is None else x.to(residual_dtype)
