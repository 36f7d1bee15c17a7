"""Scaled dot-product attention: a readable PyTorch reference and a fused FlashAttention-2 kernel.

Shape legend
------------
B  batch                 H  query heads            H_kv  key/value heads (H % H_kv == 0)
Lq query length          Lk key/value length       D     head dim
T  total packed tokens (varlen)

Algorithm: FlashAttention-2 (Dao, 2023). Q, K and V are tiled; the forward runs an online
softmax (running max and sum) over key blocks and never materialises the L x L matrix; it
saves the row log-sum-exp; the backward recomputes P from it and computes dQ, dK and dV in
two kernels without atomics, so results are deterministic.

Public API
----------
- ``scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
  is_causal=False, scale=None, enable_gqa=False)``: drop-in for torch's SDPA on (B, H, L, D).
- ``flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, *, window_size=(-1, -1),
  softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False)``: the flash-attn
  package's function, (B, L, H, D), its argument order and its bottom-right causal alignment.
- ``flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
  dropout_p=0.0, softmax_scale=None, causal=False, *, ..., block_table=None)``: flash-attn's
  packed (T, H, D) function, bottom-right causal per sequence.
- ``flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
  dropout_p=0.0, causal=False, scale=None)``: packed (T, H, D) sequences, no work on padding,
  top-left causal like SDPA; options keyword-only, so a flash-attn positional call is an error.
- ``attention_reference(...)``: the explicit PyTorch math, SDPA semantics, plus ``dropout_mask``;
  defined in ``minillm/attention.py`` (the model's ``reference`` backend) and re-exported here.
- ``draw_dropout_seed()`` / ``dropout_keep_mask(...)``: recover the exact dropout mask a call used.

Supported
---------
- fp16, bf16 and fp32 (fp32 ``tl.dot`` runs with ``input_precision="ieee"``: exact fp32 FMA,
  no TF32 and no tensor cores; use bf16/fp16 for speed). Accumulation is always fp32.
- Any Lq, Lk >= 1 (Lq != Lk included), head dims 1..256 (tiles padded to the next power of
  two >= 16 and masked, so 24, 40, 80, 96, 160 work), GQA/MQA.
- Two causal alignments, chosen by the function, never guessed: top-left as in torch (row i
  sees keys 0..i) in scaled_dot_product_attention and flash_attn_varlen; bottom-right as in the
  flash-attn package (row i sees keys 0..i + Lk - Lq, per sequence when packed; rows that see no
  key output 0) in flash_attn_func and flash_attn_varlen_func. The kernels take the alignment as
  the runtime flag ``bottom_right`` and offset the causal diagonal by Lk - Lq.
- flash-attn's ``deterministic`` (always true here); its window_size, softcap, alibi_slopes,
  return_attn_probs and block_table only at their defaults (anything else is a ValueError).
- torch.compile: scaled_dot_product_attention and flash_attn_func run as the custom op
  ``torch.ops.minillm.attention_forward`` (kernels/ops.py), traced without a graph break.
- Boolean (True = attend) and additive float masks broadcastable to (B, H, Lq, Lk), read in
  place with stride 0 on broadcast dims. Fully masked rows output 0 (torch gives NaN) and
  get finite (zero) gradients.
- Dropout on the attention weights from Philox (``tl.rand``): key = seed + b * H + h,
  counter = i * Lk + j, so the backward regenerates the same mask; the seed is drawn from
  torch's default generator, so ``torch.manual_seed`` reproduces a call.
- Any strides for Q, K, V and grad_output (a tensor whose last dim is not unit-stride is
  copied once; a grad_output laid out unlike O is copied once).
- Triton >= 3.2 (plain pointer arithmetic, no block pointers; checked here with 3.9).

Not supported
-------------
- Gradients with respect to ``attn_mask`` (a mask that requires grad is refused).
- D_v != D_qk; masks in ``flash_attn_varlen``; Lq * Lk >= 2**31 with dropout (Philox counter).
- Block-sparse/sliding-window shortcuts: a mask is applied element-wise, never used to skip tiles.
- torch.compile through the varlen functions: their checks read cu_seqlens on the host (a graph break).

Tuning: per-architecture config tables (sm_80, sm_90) by head-dim bucket, autotuned on GPU
(key: lengths, head dim, features); calls with a mask or dropout use shrunken tiles
(``_fit_for_features``). Under ``TRITON_INTERPRET=1`` one small config is used and nothing is
autotuned, and dot operands are upcast to fp32 (the interpreter's bf16 ``tl.dot`` is wrong).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from minillm.attention import attention_reference  # noqa: F401  (re-exported: see section 1)
from minillm.attention import check_attention_inputs
from minillm.kernels import ops

# ---------------------------------------------------------------------------------------------
# 1. The math, and a pure-PyTorch reference
# ---------------------------------------------------------------------------------------------
#
# The reference lives beside the model, in minillm/attention.py, where it is also the model's
# `reference` backend; it is imported above and re-exported here, so the kernel is tested against
# the model's own math and there is one implementation of it. What the kernel computes, in this
# file's letters (Lq, Lk where minillm/attention.py writes Tq, Tk):
#
#   S = Q K^T * scale                      (B, H, Lq, Lk), scale = 1 / sqrt(D) by default
#   S = S + mask  (additive float mask)   or   S = -inf where a bool mask is False
#   S = -inf where j > i + diag            (causal; diag = 0 top-left, Lk - Lq bottom-right)
#   P = softmax(S, dim=-1)                 rows that are -inf everywhere give P = 0, not NaN
#   P = P * keep / (1 - p)                 dropout, keep ~ Bernoulli(1 - p)
#   O = P V                                (B, H, Lq, D)
#
# The kernel's float64 oracle is that reference on inputs upcast to float64, with the kernel's
# dropout mask passed in as `dropout_mask` (see dropout_keep_mask). The kernel accepts less than
# the reference: the checks below add its own limits to the shared ones.

MAX_HEAD_DIM = 256
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_kernel_inputs(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> None:
    """The reference's checks (SDPA semantics), then the kernel's limits: fp16/bf16/fp32, one
    head dim for Q, K and V, and D <= MAX_HEAD_DIM. Errors name the argument at fault."""
    check_attention_inputs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                           allowed_dtypes=_KERNEL_DTYPES)
    D = query.shape[-1]
    if value.shape[-1] != D:
        # The kernel keeps one head dim for Q, K and V; torch allows D_v != D_qk, we do not.
        raise ValueError(f"value head dim must equal query head dim {D}, got {value.shape[-1]}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"query head dim must be in [1, {MAX_HEAD_DIM}], got {D}")


# ---------------------------------------------------------------------------------------------
# 2. Triton kernels
# ---------------------------------------------------------------------------------------------
#
# Forward (one program = BLOCK_M query rows of one (batch, head)). Walk the keys in blocks of
# BLOCK_N and keep, per row, the running max m, the running sum l = sum_j exp(s_j - m), and the
# running output acc = sum_j exp(s_j - m) v_j. When a new block raises the max to m', rescale
# the old sum and output by alpha = exp(m - m') (the online softmax):
#     l <- alpha l + rowsum(exp(S_blk - m')),   acc <- alpha acc + exp(S_blk - m') V_blk
# At the end O = acc / l and LSE = m + log(l) is saved. Scores are kept in base 2
# (s = q.k * scale * log2(e)) so every exponential is one exp2. Only (BLOCK_M, BLOCK_N) tiles
# of S ever exist: memory is O(L), not O(L^2).
#
# Backward. With P = exp(S - LSE) recomputed from the saved LSE (no stored P), dropout keep
# mask Z (scaled by 1/(1-p)) and dO the incoming gradient:
#     dV = (P o Z)^T dO
#     dP = (dO V^T) o Z
#     dS = P o (dP - delta),   delta_i = sum_j P_ij dP_ij = sum_d dO_id O_id   (preprocess kernel)
#     dQ = scale dS K,   dK = scale dS^T Q
# dK/dV are produced by one kernel that owns a block of keys and loops over all query blocks
# (and, for grouped-query attention, over every query head sharing that K/V head); dQ by a
# second kernel that owns a block of queries and loops over the keys. Each output element is
# written by exactly one program, so there are no atomics and the result is deterministic.
#
# Masking. Out-of-range rows/columns, the causal triangle, and a bool mask all set s = -inf;
# an additive mask is added (times log2(e)). A row whose scores are all -inf keeps m = -inf:
# it is rescaled from a base of 0 (not -inf, which would give NaN), ends with l = 0 and is
# written as O = 0 with LSE = +inf, so the backward recomputes P = exp2(-inf) = 0 for it.

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e))
_MASK_NONE, _MASK_BOOL, _MASK_ADD = 0, 1, 2


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST is set only under TRITON_INTERPRET=1, whose numpy
    `tl.dot` multiplies bf16 bit patterns as integers; fp16/bf16 -> fp32 is exact, so the
    interpreted product equals a tensor core's fp32-accumulated one."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _dropout_keep(seed, bh, rows, cols, LK_RNG, dropout_p):
    """Bool keep mask for a tile, True = keep. `rows`/`cols` are broadcastable 2-D index tiles
    ([:, None]/[None, :], or swapped for a transposed tile). Philox is keyed by seed + (b * H + h)
    with counter row * LK_RNG + col: an element always draws the same number, forward and backward."""
    return tl.rand(seed + bh, rows * LK_RNG + cols) >= dropout_p


@triton.jit
def _mask_scores(s, rows, cols, row_ok, col_ok, diag, mask_base, stride_mm, stride_mn,
                 IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr):
    """Apply bounds, causal and user masks to a tile of base-2 scores. `rows`, `cols` and their
    `_ok` flags are broadcastable 2-D tiles, so the same code serves S and its transpose.
    `diag` is the causal diagonal's offset (see _causal_diagonal)."""
    valid = row_ok & col_ok
    if IS_CAUSAL:  # row i sees keys 0..i + diag
        valid = valid & (cols <= rows + diag)
    if MASK_KIND != 0:
        m = tl.load(mask_base + rows * stride_mm + cols * stride_mn, mask=valid, other=0)
        if MASK_KIND == 1:  # bool mask stored as uint8, nonzero = attend
            valid = valid & (m != 0)
        else:  # additive mask, in the scores' natural-log units
            s = s + m.to(tl.float32) * 1.4426950408889634
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _seq_bounds(CU_SEQ, b, DENSE_LEN, VARLEN: tl.constexpr):
    """(start, length) of sequence b: packed via cumulative lengths, or the dense length."""
    if VARLEN:
        start = tl.load(CU_SEQ + b)
        length = tl.load(CU_SEQ + b + 1) - start
    else:
        start = 0
        length = DENSE_LEN
    return start, length


@triton.jit
def _causal_diagonal(q_len, k_len, bottom_right):
    """Offset of the causal diagonal: row i sees keys 0..i + diag. Top-left (torch's SDPA)
    has diag = 0; bottom-right (flash-attn) has diag = Lk - Lq, so the last query sees the last
    key. With Lq > Lk the first Lq - Lk rows then see no key at all and output 0."""
    return (k_len - q_len) * bottom_right


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O,  # (B, H, Lq, D) / (B, H_kv, Lk, D) / ... / output like Q; or packed (T, H, D)
    LSE,  # (B, H, Lq) fp32: base-2 log-sum-exp of each row's scaled scores, for the backward
    MASK,  # attn_mask expanded to (B, H, Lq, Lk) (stride 0 on broadcast dims); unused if MASK_KIND=0
    CU_SEQ_Q, CU_SEQ_K,  # (B + 1,) int32 cumulative lengths when VARLEN, else unused
    stride_qb, stride_qh, stride_qm,  # Q strides (batch stride 0 when VARLEN); the D stride is 1
    stride_kb, stride_kh, stride_kn,  # K strides
    stride_vb, stride_vh, stride_vn,  # V strides
    stride_ob, stride_oh, stride_om,  # O strides
    stride_mb, stride_mh, stride_mm, stride_mn,  # MASK strides
    H,  # query heads
    GROUP,  # query heads per K/V head (H // H_kv)
    Lq, Lk,  # dense lengths, or max_seqlen_q / max_seqlen_k when VARLEN
    scale_log2,  # softmax scale * log2(e)
    dropout_p,  # probability of dropping an attention weight
    seed,  # Philox seed for dropout
    bottom_right,  # 1: causal diagonal aligned bottom-right (diag = Lk - Lq per sequence), 0: top-left
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D rounded up to a power of two >= 16; extra lanes are masked
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per inner step
    IS_CAUSAL: tl.constexpr,  # causal mask, aligned as `bottom_right` says
    MASK_KIND: tl.constexpr,  # 0 none, 1 bool, 2 additive
    HAS_DROPOUT: tl.constexpr,  # dropout_p > 0
    VARLEN: tl.constexpr,  # packed sequences described by CU_SEQ_Q / CU_SEQ_K
    UPCAST: tl.constexpr,  # interpreter only: upcast dot operands to fp32
    PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee" for fp32 inputs
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_start, q_len = _seq_bounds(CU_SEQ_Q, b, Lq, VARLEN)
    k_start, k_len = _seq_bounds(CU_SEQ_K, b, Lk, VARLEN)
    diag = _causal_diagonal(q_len, k_len, bottom_right)
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:  # past the end of a short packed sequence: nothing to do
        return

    b64 = b.to(tl.int64)
    q_base = Q + b64 * stride_qb + h * stride_qh + q_start.to(tl.int64) * stride_qm
    k_base = K + b64 * stride_kb + (h // GROUP) * stride_kh + k_start.to(tl.int64) * stride_kn
    v_base = V + b64 * stride_vb + (h // GROUP) * stride_vh + k_start.to(tl.int64) * stride_vn
    o_base = O + b64 * stride_ob + h * stride_oh + q_start.to(tl.int64) * stride_om
    mask_base = MASK + b64 * stride_mb + h * stride_mh

    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < q_len
    d_ok = offs_d < HEAD_DIM

    q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (base 2)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # running unnormalised output

    n_end = k_len
    if IS_CAUSAL:  # keys past the block's last row's diagonal are masked for every row: skip them
        n_end = tl.minimum(k_len, start_m + BLOCK_M + diag)
    for start_n in range(0, n_end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < k_len
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), UPCAST, PRECISION) * scale_log2  # (BLOCK_M, BLOCK_N)
        s = _mask_scores(s, rows[:, None], cols[None, :], row_ok[:, None], col_ok[None, :], diag,
                         mask_base, stride_mm, stride_mn, IS_CAUSAL, MASK_KIND)

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-masked so far: avoid -inf - -inf
        p = tl.math.exp2(s - m_base[:, None])  # (BLOCK_M, BLOCK_N), 0 where masked
        alpha = tl.math.exp2(m_i - m_base)  # rescales the old sum and output
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax denominator uses P before dropout
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, pid_bh, rows[:, None], cols[None, :], Lk, dropout_p)
            p = tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, PRECISION)
        m_i = m_new

    empty = l_i == 0.0  # fully masked row
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    tl.store(o_base + rows[:, None] * stride_om + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + pid_bh.to(tl.int64) * Lq + rows, lse, mask=row_ok)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO,  # output and its gradient, same strides
    DELTA,  # (B, H, Lq) fp32 output: rowsum(dO * O)
    CU_SEQ_Q,  # (B + 1,) int32 cumulative lengths when VARLEN
    stride_ob, stride_oh, stride_om,  # O / dO strides; the D stride is 1
    H, Lq,  # query heads; dense length or max_seqlen_q
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, VARLEN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_start, q_len = _seq_bounds(CU_SEQ_Q, b, Lq, VARLEN)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < q_len
    base = b.to(tl.int64) * stride_ob + h * stride_oh + q_start.to(tl.int64) * stride_om
    ptrs = base + rows[:, None] * stride_om + offs_d[None, :]
    io_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + ptrs, mask=io_mask, other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=io_mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * Lq + rows, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO,  # inputs and dO (dO has O's strides)
    DK, DV,  # outputs, shaped like K and V
    LSE, DELTA,  # (B, H, Lq) fp32 from the forward and the preprocess kernel
    MASK,  # as in the forward
    CU_SEQ_Q, CU_SEQ_K,  # (B + 1,) int32 cumulative lengths when VARLEN
    stride_qb, stride_qh, stride_qm,  # Q strides; the D stride is 1 everywhere
    stride_kb, stride_kh, stride_kn,  # K strides
    stride_vb, stride_vh, stride_vn,  # V strides
    stride_ob, stride_oh, stride_om,  # dO strides
    stride_dkb, stride_dkh, stride_dkn,  # dK and dV strides (both allocated alike)
    stride_mb, stride_mh, stride_mm, stride_mn,  # MASK strides
    H, H_KV, GROUP,  # query heads, K/V heads, H // H_kv
    Lq, Lk,  # dense lengths, or max lengths when VARLEN
    scale, scale_log2,  # softmax scale, and scale * log2(e)
    dropout_p, seed,  # dropout probability and Philox seed (as in the forward)
    bottom_right,  # causal alignment, as in the forward
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per inner step
    BLOCK_N: tl.constexpr,  # keys owned by this program
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bkv = tl.program_id(1)
    b = pid_bkv // H_KV
    h_kv = pid_bkv % H_KV
    q_start, q_len = _seq_bounds(CU_SEQ_Q, b, Lq, VARLEN)
    k_start, k_len = _seq_bounds(CU_SEQ_K, b, Lk, VARLEN)
    diag = _causal_diagonal(q_len, k_len, bottom_right)
    start_n = pid_n * BLOCK_N
    if start_n >= k_len:
        return

    b64 = b.to(tl.int64)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < k_len
    d_ok = offs_d < HEAD_DIM
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k_off = b64 * stride_kb + h_kv * stride_kh + (k_start + cols[:, None]).to(tl.int64) * stride_kn
    v_off = b64 * stride_vb + h_kv * stride_vh + (k_start + cols[:, None]).to(tl.int64) * stride_vn
    k = tl.load(K + k_off + offs_d[None, :], mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + v_off + offs_d[None, :], mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    m_begin = 0
    if IS_CAUSAL:  # rows i < start_n - diag see none of this key block
        m_begin = (tl.maximum(start_n - diag, 0) // BLOCK_M) * BLOCK_M
    for g in range(0, GROUP):  # every query head that shares this K/V head
        h = h_kv * GROUP + g
        bh = b * H + h
        q_base = Q + b64 * stride_qb + h * stride_qh + q_start.to(tl.int64) * stride_qm
        do_base = DO + b64 * stride_ob + h * stride_oh + q_start.to(tl.int64) * stride_om
        mask_base = MASK + b64 * stride_mb + h * stride_mh
        for start_m in range(m_begin, q_len, BLOCK_M):
            # Work on transposed tiles (keys x queries) so dK and dV accumulate without
            # transposing P or dS: S^T = K Q^T, dV += P^T dO, dK += dS^T Q.
            rows = start_m + offs_m
            row_ok = rows < q_len
            q_t = tl.load(q_base + rows[None, :] * stride_qm + offs_d[:, None],
                          mask=row_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_M)
            do = tl.load(do_base + rows[:, None] * stride_om + offs_d[None, :],
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
            lse = tl.load(LSE + bh.to(tl.int64) * Lq + rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + bh.to(tl.int64) * Lq + rows, mask=row_ok, other=0.0)

            s_t = _dot(k, q_t, UPCAST, PRECISION) * scale_log2  # (BLOCK_N, BLOCK_M)
            s_t = _mask_scores(s_t, rows[None, :], cols[:, None], row_ok[None, :], col_ok[:, None], diag,
                               mask_base, stride_mm, stride_mn, IS_CAUSAL, MASK_KIND)
            p_t = tl.math.exp2(s_t - lse[None, :])  # recomputed softmax, transposed
            dp_t = _dot(v, tl.trans(do), UPCAST, PRECISION)  # (dO V^T)^T, (BLOCK_N, BLOCK_M)
            if HAS_DROPOUT:
                keep = _dropout_keep(seed, bh, rows[None, :], cols[:, None], Lk, dropout_p)
                p_drop = tl.where(keep, p_t * (1.0 / (1.0 - dropout_p)), 0.0)
                dp_t = tl.where(keep, dp_t * (1.0 / (1.0 - dropout_p)), 0.0)
            else:
                p_drop = p_t
            dv += _dot(p_drop.to(do.dtype), do, UPCAST, PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])  # dL/dS, transposed
            dk += _dot(ds_t.to(q_t.dtype), tl.trans(q_t), UPCAST, PRECISION)

    out_off = b64 * stride_dkb + h_kv * stride_dkh + (k_start + cols[:, None]).to(tl.int64) * stride_dkn
    tl.store(DK + out_off + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO,  # inputs and dO (dO has O's strides)
    DQ,  # output, shaped like Q
    LSE, DELTA,  # (B, H, Lq) fp32
    MASK,  # as in the forward
    CU_SEQ_Q, CU_SEQ_K,  # (B + 1,) int32 cumulative lengths when VARLEN
    stride_qb, stride_qh, stride_qm,  # Q strides; the D stride is 1 everywhere
    stride_kb, stride_kh, stride_kn,  # K strides
    stride_vb, stride_vh, stride_vn,  # V strides
    stride_ob, stride_oh, stride_om,  # dO strides
    stride_dqb, stride_dqh, stride_dqm,  # dQ strides
    stride_mb, stride_mh, stride_mm, stride_mn,  # MASK strides
    H, GROUP,  # query heads, H // H_kv
    Lq, Lk,  # dense lengths, or max lengths when VARLEN
    scale, scale_log2, dropout_p, seed,
    bottom_right,  # causal alignment, as in the forward
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows owned by this program
    BLOCK_N: tl.constexpr,  # keys per inner step
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_start, q_len = _seq_bounds(CU_SEQ_Q, b, Lq, VARLEN)
    k_start, k_len = _seq_bounds(CU_SEQ_K, b, Lk, VARLEN)
    diag = _causal_diagonal(q_len, k_len, bottom_right)
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return

    b64 = b.to(tl.int64)
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < q_len
    d_ok = offs_d < HEAD_DIM
    qo_mask = row_ok[:, None] & d_ok[None, :]
    q_rows = (q_start + rows[:, None]).to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + h * stride_qh + q_rows * stride_qm + offs_d[None, :],
                mask=qo_mask, other=0.0)
    do = tl.load(DO + b64 * stride_ob + h * stride_oh + q_rows * stride_om + offs_d[None, :],
                 mask=qo_mask, other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * Lq + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * Lq + rows, mask=row_ok, other=0.0)
    k_base = K + b64 * stride_kb + (h // GROUP) * stride_kh + k_start.to(tl.int64) * stride_kn
    v_base = V + b64 * stride_vb + (h // GROUP) * stride_vh + k_start.to(tl.int64) * stride_vn
    mask_base = MASK + b64 * stride_mb + h * stride_mh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    n_end = k_len
    if IS_CAUSAL:
        n_end = tl.minimum(k_len, start_m + BLOCK_M + diag)
    for start_n in range(0, n_end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < k_len
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), UPCAST, PRECISION) * scale_log2  # (BLOCK_M, BLOCK_N)
        s = _mask_scores(s, rows[:, None], cols[None, :], row_ok[:, None], col_ok[None, :], diag,
                         mask_base, stride_mm, stride_mn, IS_CAUSAL, MASK_KIND)
        p = tl.math.exp2(s - lse[:, None])
        dp = _dot(do, tl.trans(v), UPCAST, PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, pid_bh, rows[:, None], cols[None, :], Lk, dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, UPCAST, PRECISION)

    tl.store(DQ + b64 * stride_dqb + h * stride_dqh + q_rows * stride_dqm + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=qo_mask)


@triton.jit
def _dropout_mask_kernel(
    KEEP,  # (B, H, Lq, Lk) uint8 output: 1 = kept
    H, Lq, Lk, dropout_p, seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Write out the keep mask the attention kernels draw, for tests and debugging."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, pid_bh, rows[:, None], cols[None, :], Lk, dropout_p)
    ptrs = KEEP + pid_bh.to(tl.int64) * Lq * Lk + rows[:, None] * Lk + cols[None, :]
    tl.store(ptrs, keep.to(tl.uint8), mask=(rows < Lq)[:, None] & (cols < Lk)[None, :])


# ---------------------------------------------------------------------------------------------
# 3. Launchers: check, allocate, choose blocks, launch
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockConfig:
    """One launch configuration: tile sizes and how the compiler schedules them."""

    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int  # software-pipelining depth of the inner loop's loads


# Configurations shipped per GPU architecture, kernel and head-dim bucket (BLOCK_D, the head
# dim rounded up to a power of two >= 16). The autotuner picks among a bucket's entries on the
# first call for each (length, head dim, feature) key. Every entry is compiled for its target by
# tests/test_attention_compile.py, which checks tensor-core use, no register spills and shared
# memory. fp16/bf16 only; fp32 uses _FP32_CONFIGS (see the module docstring).
_C = BlockConfig
_CONFIGS: dict[int, dict[str, dict[int, list[BlockConfig]]]] = {
    80: {  # A100: 163 KiB shared memory per block, mma.sync tensor cores
        "fwd": {16: [_C(128, 64, 4, 3)], 32: [_C(128, 64, 4, 3)],
                64: [_C(128, 64, 8, 3), _C(128, 128, 8, 3)],
                128: [_C(128, 64, 8, 3), _C(128, 32, 8, 3)],
                256: [_C(64, 32, 8, 2)]},
        "dkdv": {16: [_C(32, 128, 4, 3)], 32: [_C(32, 128, 4, 3)], 64: [_C(32, 128, 8, 3)],
                 128: [_C(32, 64, 8, 2)], 256: [_C(16, 64, 8, 2)]},
        "dq": {16: [_C(128, 32, 4, 3)], 32: [_C(128, 32, 4, 3)], 64: [_C(128, 32, 8, 3)],
               128: [_C(64, 32, 8, 2)], 256: [_C(64, 16, 8, 2)]},
    },
    90: {  # H100: 227 KiB shared memory per block, warpgroup MMA (wgmma) for M >= 64 tiles
        "fwd": {16: [_C(128, 64, 4, 3)], 32: [_C(128, 64, 4, 3)],
                64: [_C(128, 64, 8, 3), _C(128, 128, 8, 3)],
                128: [_C(128, 64, 8, 3), _C(128, 128, 8, 2)],
                256: [_C(64, 64, 8, 2)]},
        # dK/dV keeps two fp32 (BLOCK_N, D) accumulators: 64-row query tiles (wgmma) spill here,
        # so it runs 32/16-row tiles on mma.sync.
        "dkdv": {16: [_C(32, 128, 8, 3)], 32: [_C(32, 128, 8, 3)], 64: [_C(32, 128, 8, 3)],
                 128: [_C(32, 64, 8, 2)], 256: [_C(16, 32, 8, 2)]},
        "dq": {16: [_C(128, 64, 8, 3)], 32: [_C(128, 64, 8, 3)], 64: [_C(128, 64, 8, 3)],
               128: [_C(128, 32, 8, 2)], 256: [_C(64, 32, 8, 2)]},
    },
}
# fp32 inputs run tl.dot in IEEE fp32 (no tensor cores), so tiles are kept small.
_FP32_CONFIGS: dict[str, dict[int, list[BlockConfig]]] = {
    "fwd": {16: [_C(32, 32, 4, 2)], 32: [_C(32, 32, 4, 2)], 64: [_C(32, 32, 4, 2)],
            128: [_C(16, 16, 4, 1)], 256: [_C(16, 16, 4, 1)]},
    "dkdv": {16: [_C(16, 32, 4, 2)], 32: [_C(32, 32, 4, 2)], 64: [_C(16, 32, 4, 2)],
             128: [_C(16, 16, 4, 1)], 256: [_C(16, 16, 4, 1)]},
    "dq": {16: [_C(32, 32, 4, 2)], 32: [_C(32, 32, 4, 2)], 64: [_C(32, 16, 4, 2)],
           128: [_C(16, 16, 4, 1)], 256: [_C(16, 16, 4, 1)]},
}
del _C
# The interpreter runs programs one by one through numpy: one small config, never autotuned.
# 16 is also the smallest tile a GPU's tl.dot accepts.
_INTERPRETER_CONFIG = BlockConfig(16, 16, 1, 1)
_PREPROCESS_BLOCK_M = 64
_KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def head_dim_bucket(head_dim: int) -> int:
    """BLOCK_D for a head dim: the next power of two, at least 16 (a tl.dot minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def _fit_for_features(c: BlockConfig, kernel: str, block_d: int) -> BlockConfig:
    """Shrink a tile for calls with dropout or a mask. Each score element then costs a Philox
    draw or an (unvectorised) mask load in registers, and the compiler spills above ~16 such
    elements per thread (8 at D >= 128). The dK/dV kernel, which also holds two fp32
    (BLOCK_N, D) accumulators, halves the keys it owns and steps through 16 queries at a time;
    at D = 256 the other kernels halve the queries they own, then halve the key step until
    the tile fits."""
    bm, bn = c.block_m, c.block_n
    if kernel == "dkdv":
        return BlockConfig(16, max(16, bn // 2), c.num_warps, c.num_stages)
    if block_d >= 256:
        bm = max(16, bm // 2)
    limit = 8 if block_d >= 128 else 16
    while bm * bn > limit * 32 * c.num_warps and bn > 16:
        bn //= 2
    return BlockConfig(bm, bn, c.num_warps, c.num_stages)


def shipped_configs(arch: int, kernel: str, head_dim: int, dtype: torch.dtype,
                    masked_or_dropout: bool = False) -> list[BlockConfig]:
    """The configurations the autotuner chooses among for this arch (80 or 90), kernel
    ("fwd", "dkdv" or "dq"), head dim, dtype, and whether the call has a mask or dropout."""
    table = _FP32_CONFIGS if dtype == torch.float32 else _CONFIGS[arch]
    configs = table[kernel][head_dim_bucket(head_dim)]
    if masked_or_dropout:
        configs = list(dict.fromkeys(_fit_for_features(c, kernel, head_dim_bucket(head_dim)) for c in configs))
    return configs


def _arch_of(device: torch.device) -> int:
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80  # 8.x uses the sm_80 table; newer parts the sm_90 one


@functools.cache
def _autotuned(kernel: str, arch: int, head_dim: int, dtype: torch.dtype, masked_or_dropout: bool):
    """An autotuner over the shipped configs for one kernel, head-dim bucket and feature set (GPU only)."""
    configs = [
        triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, num_warps=c.num_warps,
                      num_stages=c.num_stages)
        for c in shipped_configs(arch, kernel, head_dim, dtype, masked_or_dropout)
    ]
    key = ["Lq", "Lk", "HEAD_DIM", "IS_CAUSAL", "MASK_KIND", "HAS_DROPOUT", "VARLEN"]
    return triton.autotune(configs=configs, key=key)(_KERNELS[kernel])


def _launch(kernel: str, grid_dim, bh: int, args: tuple, constexprs: dict, dtype: torch.dtype, device):
    """Launch `kernel` over grid (cdiv(grid_dim, BLOCK), bh): fixed config when interpreting,
    autotuned otherwise. BLOCK is BLOCK_N for the dK/dV kernel (it owns keys), else BLOCK_M."""
    block_key = "BLOCK_N" if kernel == "dkdv" else "BLOCK_M"
    if _interpreting():
        c = _INTERPRETER_CONFIG
        grid = (triton.cdiv(grid_dim, getattr(c, block_key.lower())), bh)
        _KERNELS[kernel][grid](*args, **constexprs, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
                               UPCAST=True, num_warps=c.num_warps, num_stages=c.num_stages)
    else:
        heavy = constexprs["MASK_KIND"] != _MASK_NONE or constexprs["HAS_DROPOUT"]
        tuned = _autotuned(kernel, _arch_of(device), constexprs["BLOCK_D"], dtype, heavy)
        tuned[lambda meta: (triton.cdiv(grid_dim, meta[block_key]), bh)](*args, **constexprs, UPCAST=False)


@dataclass(frozen=True)
class _Layout:
    """How a call's Q/K/V are laid out: dense (B, H, L, D) or packed varlen (T, H, D)."""

    batch: int
    heads: int
    kv_heads: int
    len_q: int  # Lq, or max_seqlen_q
    len_k: int  # Lk, or max_seqlen_k
    head_dim: int
    cu_seqlens_q: Tensor | None  # int32 (B + 1,) when packed
    cu_seqlens_k: Tensor | None

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    def strides(self, t: Tensor) -> tuple[int, int, int]:
        """(batch, head, position) strides of a Q/K/V-shaped tensor; batch is 0 when packed."""
        if self.varlen:
            return (0, t.stride(1), t.stride(0))
        return (t.stride(0), t.stride(1), t.stride(2))


def _mask_args(mask: Tensor | None, layout: _Layout, dummy: Tensor) -> tuple[Tensor, tuple, int]:
    """Kernel view of attn_mask: expanded to (B, H, Lq, Lk) without copying (stride 0 where it
    broadcasts), bools reinterpreted as uint8; plus its strides and MASK_KIND."""
    if mask is None:
        return dummy, (0, 0, 0, 0), _MASK_NONE
    full = mask.expand(layout.batch, layout.heads, layout.len_q, layout.len_k)
    if mask.dtype == torch.bool:
        return full.view(torch.uint8), full.stride(), _MASK_BOOL
    return full, full.stride(), _MASK_ADD


def _feature_constexprs(layout: _Layout, mask_kind: int, causal: bool, dropout_p: float,
                        dtype: torch.dtype) -> dict:
    return dict(
        HEAD_DIM=layout.head_dim, BLOCK_D=head_dim_bucket(layout.head_dim), IS_CAUSAL=causal,
        MASK_KIND=mask_kind, HAS_DROPOUT=dropout_p > 0.0, VARLEN=layout.varlen,
        PRECISION="ieee" if dtype == torch.float32 else "tf32",  # "tf32" is unused by 16-bit dots
    )


def _attention_forward(q, k, v, mask, layout: _Layout, causal: bool, bottom_right: bool, scale: float,
                       dropout_p: float, seed: int) -> tuple[Tensor, Tensor]:
    """Run the forward kernel; return the output (shaped and strided like q, so a (B, L, H, D)
    caller viewed as (B, H, L, D) gets a contiguous (B, L, H, D) back) and the (B, H, Lq) fp32 LSE."""
    L = layout
    out = torch.empty_like(q)
    lse = torch.empty((L.batch, L.heads, L.len_q), dtype=torch.float32, device=q.device)
    mask_t, mask_strides, mask_kind = _mask_args(mask, L, q)
    cu_q = L.cu_seqlens_q if L.varlen else lse
    cu_k = L.cu_seqlens_k if L.varlen else lse
    args = (q, k, v, out, lse, mask_t, cu_q, cu_k,
            *L.strides(q), *L.strides(k), *L.strides(v), *L.strides(out), *mask_strides,
            L.heads, L.heads // L.kv_heads, L.len_q, L.len_k, scale * LOG2E, dropout_p, seed, int(bottom_right))
    _launch("fwd", L.len_q, L.batch * L.heads, args,
            _feature_constexprs(L, mask_kind, causal, dropout_p, q.dtype), q.dtype, q.device)
    return out, lse


def _attention_backward(dout, q, k, v, out, lse, mask, layout: _Layout, causal: bool, bottom_right: bool,
                        scale: float, dropout_p: float, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """dQ, dK, dV: preprocess delta = rowsum(dO * O), then the dK/dV and dQ kernels."""
    L = layout
    if dout.stride() != out.stride():  # dO shares O's strides inside the kernels
        dout = torch.empty_like(out).copy_(dout)
    delta = torch.empty_like(lse)
    cu_q = L.cu_seqlens_q if L.varlen else lse
    cu_k = L.cu_seqlens_k if L.varlen else lse
    block_d = head_dim_bucket(L.head_dim)
    pre_block = _INTERPRETER_CONFIG.block_m if _interpreting() else _PREPROCESS_BLOCK_M
    _attn_bwd_preprocess_kernel[(triton.cdiv(L.len_q, pre_block), L.batch * L.heads)](
        out, dout, delta, cu_q, *L.strides(out), L.heads, L.len_q,
        HEAD_DIM=L.head_dim, BLOCK_D=block_d, BLOCK_M=pre_block, VARLEN=L.varlen)

    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    mask_t, mask_strides, mask_kind = _mask_args(mask, L, q)
    constexprs = _feature_constexprs(L, mask_kind, causal, dropout_p, q.dtype)
    group = L.heads // L.kv_heads
    inputs = (*L.strides(q), *L.strides(k), *L.strides(v), *L.strides(dout))
    _launch("dkdv", L.len_k, L.batch * L.kv_heads,
            (q, k, v, dout, dk, dv, lse, delta, mask_t, cu_q, cu_k, *inputs, *L.strides(dk),
             *mask_strides, L.heads, L.kv_heads, group, L.len_q, L.len_k, scale, scale * LOG2E,
             dropout_p, seed, int(bottom_right)),
            constexprs, q.dtype, q.device)
    _launch("dq", L.len_q, L.batch * L.heads,
            (q, k, v, dout, dq, lse, delta, mask_t, cu_q, cu_k, *inputs, *L.strides(dq),
             *mask_strides, L.heads, group, L.len_q, L.len_k, scale, scale * LOG2E, dropout_p, seed,
             int(bottom_right)),
            constexprs, q.dtype, q.device)
    return dq, dk, dv


def draw_dropout_seed() -> int:
    """The Philox seed for one attention call, drawn from torch's default (CPU) generator, so
    `torch.manual_seed(s)` before a call makes its dropout reproducible. A test recovers the seed
    a call used by reseeding and calling this, then rebuilds the mask with dropout_keep_mask."""
    return int(torch.randint(0, 2**30, (1,)).item())  # < 2**30 leaves room for seed + b * H + h


def dropout_keep_mask(seed: int, batch: int, heads: int, len_q: int, len_k: int,
                      dropout_p: float, device: torch.device | str = "cpu") -> Tensor:
    """The (B, H, Lq, Lk) bool keep mask (True = kept) the kernels draw for `seed`, with the same
    Philox keys and counters. For varlen calls pass max_seqlen_q/max_seqlen_k as lengths and read
    sequence b's mask at [b, :, :len_q_b, :len_k_b]."""
    keep = torch.empty((batch, heads, len_q, len_k), dtype=torch.uint8, device=device)
    block = 16 if _interpreting() else 64
    grid = (triton.cdiv(len_q, block), triton.cdiv(len_k, block), batch * heads)
    _dropout_mask_kernel[grid](keep, heads, len_q, len_k, dropout_p, seed, BLOCK_M=block, BLOCK_N=block)
    return keep.bool()


# ---------------------------------------------------------------------------------------------
# 4. autograd
# ---------------------------------------------------------------------------------------------
#
# Dense calls (scaled_dot_product_attention, flash_attn_func) go through the custom ops of
# kernels/ops.py, whose registered backward calls _attention_backward: torch.compile traces them
# without a graph break. Packed varlen calls use the autograd.Function below: their input
# checks read cu_seqlens on the host, which breaks a compiled graph anyway.


class _FlashAttention(torch.autograd.Function):
    """Saves what the backward needs (inputs, output, LSE; never P) and delegates to launchers."""

    @staticmethod
    def forward(ctx, q, k, v, mask, layout, causal, bottom_right, scale, dropout_p, seed):
        out, lse = _attention_forward(q, k, v, mask, layout, causal, bottom_right, scale, dropout_p, seed)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.settings = (layout, causal, bottom_right, scale, dropout_p, seed)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, mask = ctx.saved_tensors
        dq, dk, dv = _attention_backward(dout, q, k, v, out, lse, mask, *ctx.settings)
        return dq, dk, dv, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# 5. Public functions
# ---------------------------------------------------------------------------------------------

def _check_kernel_device(t: Tensor, name: str) -> None:
    if t.device.type != "cuda" and not _interpreting():
        raise ValueError(f"{name} must be a CUDA tensor for the Triton kernel (or set TRITON_INTERPRET=1 "
                         f"to run it on CPU), got device {t.device}")


def _check_dropout_range(dropout_p: float, len_q: int, len_k: int) -> None:
    if dropout_p > 0.0 and len_q * len_k >= 2**31:
        raise ValueError(f"dropout needs Lq * Lk < 2**31 (its Philox counter is i * Lk + j), got "
                         f"Lq={len_q}, Lk={len_k}; use dropout_p=0.0 or shorter sequences")


def _last_dim_contiguous(t: Tensor) -> Tensor:
    """The kernels assume unit stride along D (coalesced, vectorised loads); other strides are free."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _dropout_seed_tensor(dropout_p: float) -> Tensor | None:
    """The Philox seed as a 1-element int64 tensor (None without dropout): the same draw as
    draw_dropout_seed, kept in a tensor so torch.compile traces it without a graph break."""
    return torch.randint(0, 2**30, (1,)) if dropout_p > 0.0 else None


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Drop-in replacement for `torch.nn.functional.scaled_dot_product_attention` on (B, H, L, D).

    Same semantics (see attention_reference), causal top-left aligned as in torch; fully masked
    rows give 0 rather than NaN. Dropout draws its Philox seed from torch's default generator
    (see draw_dropout_seed). Runs as the custom op `torch.ops.minillm.attention_forward`.
    """
    _check_kernel_inputs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    _check_kernel_device(query, "query")
    if attn_mask is not None and attn_mask.requires_grad:
        raise ValueError("attn_mask.requires_grad=True is not supported by the Triton kernel "
                         "(no gradient flows to the mask); pass attn_mask.detach()")
    D = query.shape[-1]
    _check_dropout_range(dropout_p, query.shape[2], key.shape[2])
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q, k, v = (_last_dim_contiguous(t) for t in (query, key, value))
    out, _ = ops.attention_forward(q, k, v, attn_mask, float(dropout_p), bool(is_causal), False, scale,
                                   _dropout_seed_tensor(dropout_p))
    return out


# flash-attn options minillm's kernel cannot honour: each is accepted at its default value only.
# (`deterministic` is honoured whatever its value: the backward never uses atomics.)
_FLASH_ATTN_DEFAULTS = {"window_size": (-1, -1), "softcap": 0.0, "alibi_slopes": None,
                        "return_attn_probs": False}


def _is_default(name: str, value) -> bool:
    default = _FLASH_ATTN_DEFAULTS[name]
    if name == "window_size":
        return isinstance(value, (tuple, list)) and tuple(value) == default
    return value is None if default is None else value == default


def _refuse_flash_attn_options(fn: str, causal, deterministic, **options) -> None:
    """Raise for any flash-attn option set to a value the kernel cannot honour (never ignore it)."""
    for name, flag in (("causal", causal), ("deterministic", deterministic)):
        if not isinstance(flag, bool):
            raise TypeError(f"{fn}: {name} must be a bool, got {flag!r}")
    for name, value in options.items():
        if not _is_default(name, value):
            raise ValueError(f"{fn}: {name}={value!r} is not supported by minillm's kernel; only the "
                             f"default {name}={_FLASH_ATTN_DEFAULTS[name]!r} is allowed")


def _check_packed_or_padded(fn: str, q: Tensor, k: Tensor, v: Tensor, layout: str) -> None:
    """flash-attn-style inputs: q, k, v of rank len(layout) with D last and heads before it, one
    dtype (fp16/bf16/fp32) and device, a shared head dim <= MAX_HEAD_DIM, H % H_kv == 0."""
    rank = len(layout.split(","))
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{fn}: {name} must have {rank} dims ({layout}), got shape {tuple(t.shape)}")
    if q.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{fn}: q dtype must be one of {list(_KERNEL_DTYPES)}, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{fn}: {name} dtype must match q dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{fn}: {name} must be on q's device {q.device}, got {t.device}")
    _check_kernel_device(q, "q")
    D = q.shape[-1]
    if k.shape[-1] != D or v.shape[-1] != D:
        raise ValueError(f"{fn}: k and v head dim must equal q head dim {D}, got k {k.shape[-1]}, v {v.shape[-1]}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"{fn}: q head dim must be in [1, {MAX_HEAD_DIM}], got {D}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"{fn}: k and v must have the same shape but the head dim, got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    H, H_kv = q.shape[-2], k.shape[-2]
    if H % H_kv != 0:
        raise ValueError(f"{fn}: q heads ({H}) must be divisible by k heads ({H_kv})")


def _check_dropout_and_scale(fn: str, dropout_p, scale, scale_name: str) -> None:
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"{fn}: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"{fn}: {scale_name} must be a finite float or None, got {scale!r}")


def flash_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    *,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Tensor:
    """The flash-attn package's `flash_attn_func`: q (B, Lq, H, D), k and v (B, Lk, H_kv, D).

    The first six arguments have flash-attn's names, order and defaults, so a positional
    flash-attn call means the same here. GQA/MQA by passing fewer k/v heads (H % H_kv == 0).
    `causal` is flash-attn's bottom-right alignment: query i sees keys 0..i + Lk - Lq, so the
    last query sees the last key; with Lq > Lk the first Lq - Lk queries see no key and output
    0. (scaled_dot_product_attention keeps torch's top-left alignment.) The other options are
    keyword-only: `deterministic` is always honoured (the backward uses no atomics); window_size,
    softcap, alibi_slopes and return_attn_probs are refused unless left at their defaults.
    Returns (B, Lq, H, D), laid out like q (contiguous when q is). Runs as
    `torch.ops.minillm.attention_forward`.
    """
    fn = "flash_attn_func"
    _refuse_flash_attn_options(fn, causal, deterministic, window_size=window_size, softcap=softcap,
                               alibi_slopes=alibi_slopes, return_attn_probs=return_attn_probs)
    _check_packed_or_padded(fn, q, k, v, "batch, seqlen, nheads, headdim")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"{fn}: k and v batch size must equal q's {q.shape[0]}, got {k.shape[0]}")
    _check_dropout_and_scale(fn, dropout_p, softmax_scale, "softmax_scale")
    _check_dropout_range(dropout_p, q.shape[1], k.shape[1])
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    # (B, L, H, D) -> (B, H, L, D) views; the kernel takes any strides, and its output is laid
    # out like the query view, so transposing it back gives q's layout.
    query, key, value = (_last_dim_contiguous(t).transpose(1, 2) for t in (q, k, v))
    out, _ = ops.attention_forward(query, key, value, None, float(dropout_p), bool(causal), True, scale,
                                   _dropout_seed_tensor(dropout_p))
    return out.transpose(1, 2)  # (B, Lq, H, D)


def _check_cu_seqlens(cu: Tensor, name: str, total: int, max_seqlen: int, max_name: str, device) -> list[int]:
    if not isinstance(cu, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D with batch + 1 >= 2 entries, got shape {tuple(cu.shape)}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be torch.int32, got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"{name} must be on the inputs' device {device}, got {cu.device}")
    values = cu.tolist()  # one device sync: the checks below are worth it
    if values[0] != 0 or values[-1] != total:
        raise ValueError(f"{name} must start at 0 and end at the total token count {total}, "
                         f"got {values[0]} ... {values[-1]}")
    lengths = [b - a for a, b in zip(values[:-1], values[1:])]
    if min(lengths) < 0:
        raise ValueError(f"{name} must be non-decreasing (sequence lengths >= 0), got {values}")
    if max(lengths) > max_seqlen:
        raise ValueError(f"{max_name} must be >= the longest sequence in {name} ({max(lengths)}), got {max_seqlen}")
    return lengths


def _varlen(fn: str, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, causal,
            bottom_right: bool, scale, scale_name: str) -> Tensor:
    """Check and run one packed call; `bottom_right` picks the causal alignment."""
    _check_packed_or_padded(fn, q, k, v, "total_tokens, H, D")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(m, int) or m < 1:
            raise ValueError(f"{fn}: {name} must be an int >= 1, got {m!r}")
    lens_q = _check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, "max_seqlen_q", q.device)
    lens_k = _check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, "max_seqlen_k", q.device)
    if len(lens_q) != len(lens_k):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same batch, got "
                         f"{len(lens_q)} and {len(lens_k)} sequences")
    _check_dropout_and_scale(fn, dropout_p, scale, scale_name)
    if not isinstance(causal, bool):
        raise TypeError(f"{fn}: causal must be a bool, got {causal!r}")
    _, H, D = q.shape
    layout = _Layout(len(lens_q), H, k.shape[1], max_seqlen_q, max_seqlen_k, D, cu_seqlens_q, cu_seqlens_k)
    _check_dropout_range(dropout_p, max_seqlen_q, max_seqlen_k)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    seed = draw_dropout_seed() if dropout_p > 0.0 else 0
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return _FlashAttention.apply(q, k, v, None, layout, causal, bottom_right, scale, float(dropout_p), seed)


def flash_attn_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    dropout_p: float = 0.0,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Attention over packed sequences: q (T_q, H, D), k and v (T_k, H_kv, D), H % H_kv == 0.

    Sequence b is q[cu_seqlens_q[b]:cu_seqlens_q[b+1]] attending to
    k/v[cu_seqlens_k[b]:cu_seqlens_k[b+1]]; no work is spent on padding. Lengths may be 0 (a
    query row with no keys outputs 0). `causal` is top-left aligned in every sequence, as in
    scaled_dot_product_attention: query i sees keys 0..i, whatever the two lengths.

    The options are keyword-only: flash-attn's `flash_attn_varlen_func` takes (dropout_p,
    softmax_scale, causal) positionally in another order, so a positional call written for it
    is an error here rather than silently different attention. Use flash_attn_varlen_func for
    flash-attn's names, order and bottom-right causal alignment.
    """
    return _varlen("flash_attn_varlen", q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                   dropout_p, causal, False, scale, "scale")


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    *,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Tensor | None = None,
) -> Tensor:
    """The flash-attn package's `flash_attn_varlen_func`: packed q (T_q, H, D), k and v (T_k, H_kv, D).

    Names, order and defaults of the first ten arguments are flash-attn's. `causal` is aligned
    bottom-right in every sequence: query i of a sequence with lengths (Lq, Lk) sees keys
    0..i + Lk - Lq; queries that see no key (Lq > Lk, or Lk = 0) output 0. Options as in
    flash_attn_func; `block_table` (paged KV cache) is refused unless None.
    """
    fn = "flash_attn_varlen_func"
    if block_table is not None:
        raise ValueError(f"{fn}: block_table is not supported by minillm's kernel (no paged KV cache); "
                         "only block_table=None is allowed")
    _refuse_flash_attn_options(fn, causal, deterministic, window_size=window_size, softcap=softcap,
                               alibi_slopes=alibi_slopes, return_attn_probs=return_attn_probs)
    return _varlen(fn, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, causal,
                   True, softmax_scale, "softmax_scale")
