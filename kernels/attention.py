"""Scaled dot-product attention: a readable PyTorch reference and a fused Triton kernel.

Shape legend
------------
B  batch                 H  query heads            H_kv  key/value heads (H % H_kv == 0)
Lq query length          Lk key/value length       D     head dim
T  total packed tokens (varlen)

Section 1 of this file is the pure-PyTorch reference. Section 2 (the fused FlashAttention-2
kernel) follows it.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# 1. The math, and a pure-PyTorch reference
# ---------------------------------------------------------------------------------------------
#
#   S = Q K^T * scale                      (B, H, Lq, Lk), scale = 1 / sqrt(D) by default
#   S = S + mask  (additive float mask)   or   S = -inf where a bool mask is False
#   S = -inf where j > i                   (is_causal: row i sees keys 0..i, top-left aligned)
#   P = softmax(S, dim=-1)                 rows that are -inf everywhere give P = 0, not NaN
#   P = P * keep / (1 - p)                 dropout, keep ~ Bernoulli(1 - p)
#   O = P V                                (B, H, Lq, D)

MAX_HEAD_DIM = 256


def _check_attention_inputs(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    allowed_dtypes: Iterable[torch.dtype],
) -> None:
    """Validate SDPA-style inputs; raise a ValueError/TypeError naming the argument at fault."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dims (B, H, L, D), got {t.dim()} dims with shape {tuple(t.shape)}"
            )
    allowed = tuple(allowed_dtypes)
    if query.dtype not in allowed:
        raise TypeError(f"query dtype must be one of {list(allowed)}, got {query.dtype}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise TypeError(f"{name} dtype must match query dtype {query.dtype}, got {t.dtype}")
        if t.device != query.device:
            raise ValueError(f"{name} must be on query's device {query.device}, got {t.device}")
    B, H, Lq, D = query.shape
    if key.shape[0] != B or value.shape[0] != B:
        raise ValueError(
            f"key and value batch size must equal query's {B}, got key {key.shape[0]}, value {value.shape[0]}"
        )
    if key.shape[-1] != D:
        raise ValueError(f"key head dim must equal query head dim {D}, got {key.shape[-1]}")
    if value.shape[-1] != D:
        # The kernel keeps one head dim for Q, K and V; torch allows D_v != D_qk, we do not.
        raise ValueError(f"value head dim must equal query head dim {D}, got {value.shape[-1]}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"query head dim must be in [1, {MAX_HEAD_DIM}], got {D}")
    if key.shape[1] != value.shape[1]:
        raise ValueError(f"key and value must have the same number of heads, got {key.shape[1]} and {value.shape[1]}")
    if key.shape[2] != value.shape[2]:
        raise ValueError(f"key and value must have the same length, got {key.shape[2]} and {value.shape[2]}")
    H_kv = key.shape[1]
    if enable_gqa:
        if H_kv < 1 or H % H_kv != 0:
            raise ValueError(f"query heads ({H}) must be divisible by key heads ({H_kv}) when enable_gqa=True")
    elif H_kv != H:
        raise ValueError(
            f"key heads must equal query heads {H} (or pass enable_gqa=True for grouped-query), got {H_kv}"
        )
    Lk = key.shape[2]
    if Lq < 1 or Lk < 1:
        raise ValueError(f"query and key lengths must be >= 1, got query {Lq}, key {Lk}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    if attn_mask is not None:
        if is_causal:
            raise ValueError("attn_mask must be None when is_causal=True (as in torch); fold causality into the mask")
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            raise TypeError(f"attn_mask dtype must be torch.bool or query's dtype {query.dtype}, got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask must be on query's device {query.device}, got {attn_mask.device}")
        target = (B, H, Lq, Lk)
        shape = tuple(attn_mask.shape)
        ok = len(shape) <= 4 and all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))
        if not ok:
            raise ValueError(f"attn_mask shape {shape} does not broadcast to (B, H, Lq, Lk) = {target}")


def attention_reference(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    dropout_mask: Tensor | None = None,
) -> Tensor:
    """softmax(Q K^T * scale + mask) V, written out step by step, in the inputs' dtype.

    Follows `torch.nn.functional.scaled_dot_product_attention` (top-left causal alignment, bool
    mask True = attend, float mask added, mask broadcast to (B, H, Lq, Lk), grouped-query heads
    repeated with `repeat_interleave`), except that fully masked rows give 0 instead of NaN.
    `dropout_mask` (bool, True = keep, broadcastable to (B, H, Lq, Lk)) replaces the random draw
    so a kernel's dropout can be checked exactly. For an fp32/fp64 oracle, upcast the inputs.
    """
    _check_attention_inputs(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
        allowed_dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    )
    B, H, Lq, D = query.shape
    Lk = key.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if key.shape[1] != H:  # grouped-query: each K/V head serves H // H_kv consecutive query heads
        group = H // key.shape[1]
        key = key.repeat_interleave(group, dim=1)  # (B, H, Lk, D)
        value = value.repeat_interleave(group, dim=1)  # (B, H, Lk, D)

    scores = (query @ key.transpose(-2, -1)) * scale  # (B, H, Lq, Lk)
    if is_causal:
        causal = torch.ones(Lq, Lk, dtype=torch.bool, device=query.device).tril()  # (Lq, Lk)
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))  # broadcasts to (B, H, Lq, Lk)
        else:
            scores = scores + attn_mask  # (B, H, Lq, Lk)

    # A row with no key to attend to would be softmax(-inf, ..., -inf) = NaN. Give it zeros
    # instead, and keep its gradient finite by softmaxing a harmless row of zeros in its place.
    empty_row = torch.isneginf(scores).all(dim=-1, keepdim=True)  # (B, H, Lq, 1)
    scores = scores.masked_fill(empty_row, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(empty_row, 0.0)  # (B, H, Lq, Lk)

    if dropout_p > 0.0 or dropout_mask is not None:
        if dropout_mask is None:
            dropout_mask = torch.rand(probs.shape, device=probs.device) >= dropout_p  # True = keep
        elif dropout_mask.dtype != torch.bool:
            raise TypeError(f"dropout_mask must be a bool tensor (True = keep), got {dropout_mask.dtype}")
        probs = probs.masked_fill(~dropout_mask, 0.0) / (1.0 - dropout_p)
    return probs @ value  # (B, H, Lq, D)
