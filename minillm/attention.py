"""Attention as explicit math: softmax(Q K^T / sqrt(D) + mask) V, step by step, in plain PyTorch.

Read this after `MultiHeadAttention` in `minillm/model.py`. The model projects x into queries,
keys and values and splits them into heads; this file is what happens to those heads next. It is
the `reference` attention backend (see `minillm.dispatch`), and the oracle that the Triton kernel
in `kernels/attention.py` and PyTorch's SDPA are tested against. It only needs torch.

Shape legend (the letters of `minillm/model.py`)
    B  batch                 H    query heads            Hkv  key/value heads (H % Hkv == 0)
    Tq query length          Tk   key/value length       D    head dim

The equation, one (batch, head) at a time (Vaswani et al., 2017, "Attention Is All You Need")

    S = Q K^T * scale            (Tq, Tk)  score of query i against key j; scale = 1 / sqrt(D),
                                           which keeps the scores' variance near 1 whatever D is
    S = S + mask                 an additive float mask (0 = keep, -inf = drop, or any bias)
    S_ij = -inf where not allowed          a bool mask (True = may attend) or causality (j > i)
    P = softmax(S, dim=-1)       (Tq, Tk)  each query's weights over the keys sum to 1
    P = P * keep / (1 - p)       dropout on the weights (training only), keep ~ Bernoulli(1 - p)
    O = P V                      (Tq, D)   each output row is a weighted average of value rows

Masks. A bool mask is True where query i may look at key j; it broadcasts to (B, H, Tq, Tk), so
a (B, 1, 1, Tk) padding mask hides padding keys from every query of every head. `is_causal`
hides the future: row i sees keys 0..i (top-left aligned, as in torch). A query that may see no
key at all would get softmax(-inf, ..., -inf) = NaN; here it gets P = 0 and O = 0 instead.

Grouped-query heads (Ainslie et al., 2023). With Hkv < H key/value heads, key/value head g
serves the H / Hkv consecutive query heads g * H/Hkv, ..., (g + 1) * H/Hkv - 1. Repeating each
K/V head H / Hkv times turns it back into ordinary multi-head attention; Hkv = 1 is multi-query.

Semantics follow `torch.nn.functional.scaled_dot_product_attention`, except for fully masked
rows (0 here, NaN in torch). Limits of the Triton kernel (head dim <= 256, D_v == D, no float64)
are the kernel's own and are checked there, not here.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor

REFERENCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def attention_reference(
    query: Tensor,  # (B, H, Tq, D)
    key: Tensor,  # (B, Hkv, Tk, D)
    value: Tensor,  # (B, Hkv, Tk, Dv), Dv = D in the model
    attn_mask: Tensor | None = None,  # bool (True = attend) or additive float, broadcastable to (B, H, Tq, Tk)
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    dropout_mask: Tensor | None = None,  # bool, True = keep, broadcastable to (B, H, Tq, Tk)
) -> Tensor:  # (B, H, Tq, Dv)
    """softmax(Q K^T * scale + mask) V, written out step by step, in the inputs' dtype.

    Same arguments as torch's `scaled_dot_product_attention`. `dropout_mask` replaces the random
    dropout draw with a given keep mask, so a kernel's dropout can be checked exactly. For a
    float32/float64 oracle, upcast the inputs.
    """
    check_attention_inputs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    H, Tq, D = query.shape[1:]
    Tk = key.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if key.shape[1] != H:  # grouped-query: each K/V head serves H // Hkv consecutive query heads
        group = H // key.shape[1]
        key = key.repeat_interleave(group, dim=1)  # (B, H, Tk, D)
        value = value.repeat_interleave(group, dim=1)  # (B, H, Tk, Dv)

    scores = (query @ key.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    if is_causal:
        causal = torch.ones(Tq, Tk, dtype=torch.bool, device=query.device).tril()  # (Tq, Tk), True where j <= i
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))  # broadcasts to (B, H, Tq, Tk)
        else:
            scores = scores + attn_mask  # (B, H, Tq, Tk)

    # A row with no key to attend to would be softmax(-inf, ..., -inf) = NaN. Give it zeros
    # instead, and keep its gradient finite by softmaxing a harmless row of zeros in its place.
    empty_row = torch.isneginf(scores).all(dim=-1, keepdim=True)  # (B, H, Tq, 1)
    scores = scores.masked_fill(empty_row, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(empty_row, 0.0)  # (B, H, Tq, Tk)

    if dropout_p > 0.0 or dropout_mask is not None:
        if dropout_mask is None:
            dropout_mask = torch.rand(probs.shape, device=probs.device) >= dropout_p  # True = keep
        elif dropout_mask.dtype != torch.bool:
            raise TypeError(f"dropout_mask must be a bool tensor (True = keep), got {dropout_mask.dtype}")
        probs = probs.masked_fill(~dropout_mask, 0.0) / (1.0 - dropout_p)  # the expected sum stays 1
    return probs @ value  # (B, H, Tq, Dv)


# ---------------------------------------------------------------------------------------------
# Input checks, shared with the Triton kernel (which adds its own limits on top)
# ---------------------------------------------------------------------------------------------


def check_attention_inputs(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    allowed_dtypes: Iterable[torch.dtype] = REFERENCE_DTYPES,
) -> None:
    """Validate SDPA-style inputs; raise a ValueError/TypeError naming the argument at fault."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dims (B, H, T, D), got {t.dim()} dims with shape {tuple(t.shape)}"
            )
    allowed = tuple(allowed_dtypes)
    if query.dtype not in allowed:
        raise TypeError(f"query dtype must be one of {list(allowed)}, got {query.dtype}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise TypeError(f"{name} dtype must match query dtype {query.dtype}, got {t.dtype}")
        if t.device != query.device:
            raise ValueError(f"{name} must be on query's device {query.device}, got {t.device}")
    B, H, Tq, D = query.shape
    if key.shape[0] != B or value.shape[0] != B:
        raise ValueError(
            f"key and value batch size must equal query's {B}, got key {key.shape[0]}, value {value.shape[0]}"
        )
    if key.shape[-1] != D:
        raise ValueError(f"key head dim must equal query head dim {D}, got {key.shape[-1]}")
    if key.shape[1] != value.shape[1]:
        raise ValueError(f"key and value must have the same number of heads, got {key.shape[1]} and {value.shape[1]}")
    if key.shape[2] != value.shape[2]:
        raise ValueError(f"key and value must have the same length, got {key.shape[2]} and {value.shape[2]}")
    Hkv = key.shape[1]
    if enable_gqa:
        if Hkv < 1 or H % Hkv != 0:
            raise ValueError(f"query heads ({H}) must be divisible by key heads ({Hkv}) when enable_gqa=True")
    elif Hkv != H:
        raise ValueError(
            f"key heads must equal query heads {H} (or pass enable_gqa=True for grouped-query), got {Hkv}"
        )
    Tk = key.shape[2]
    if Tq < 1 or Tk < 1:
        raise ValueError(f"query and key lengths must be >= 1, got query {Tq}, key {Tk}")
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
        target = (B, H, Tq, Tk)
        shape = tuple(attn_mask.shape)
        ok = len(shape) <= 4 and all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))
        if not ok:
            raise ValueError(f"attn_mask shape {shape} does not broadcast to (B, H, Tq, Tk) = {target}")
