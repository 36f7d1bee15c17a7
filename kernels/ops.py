"""minillm's kernels as torch custom ops, so `torch.compile(fullgraph=True)` traces through them.

Dynamo cannot look inside a Triton launch or an `autograd.Function` that calls one: it breaks
the graph there. A custom op is opaque by design: the compiler sees its name, its schema, a
"fake" implementation that only computes output shapes, and a backward registered beside it,
so a model that calls these ops compiles into one graph, forward and backward.

Ops (namespace `minillm`, callable as `torch.ops.minillm.<name>`)
    attention_forward(q, k, v, attn_mask, dropout_p, is_causal, bottom_right, scale, seed)
        -> (out, lse)                 q (B, H, Lq, D), k and v (B, H_kv, Lk, D); out like q;
                                      lse (B, H, Lq) fp32, base-2 log-sum-exp of each row
    attention_backward(dout, q, k, v, out, lse, attn_mask, dropout_p, is_causal, bottom_right,
                       scale, seed) -> (dq, dk, dv)
    norm_forward(x, weight, bias, eps, is_rms) -> (y, mean, rstd)        x (M, N) rows
    norm_backward(dy, x, weight, bias, mean, rstd, eps, is_rms) -> (dx, dweight, dbias)
`attention_forward` and `norm_forward` carry their backward (register_autograd); the backward
ops are ops too, so the compiled backward graph has no break either. `bottom_right` aligns the
causal diagonal with the last key (flash-attn); False is torch's top-left. `seed` is None
without dropout, else a 1-element int64 tensor (a tensor, not an int: reading an int out of a
tensor would break the graph). `dweight`/`dbias` are empty when there is no weight/bias.

Which implementation runs
    CUDA tensors   the Triton kernels (kernels/attention.py, kernels/norms.py), imported
                   only when an op first runs on CUDA.
    CPU tensors    the PyTorch reference (minillm/attention.py's attention_reference; the norm
                   math below in float32), with backward by `torch.func.vjp` of that reference.
                   Under TRITON_INTERPRET=1 the Triton kernels run instead, in Triton's
                   interpreter: that variable is the explicit request to run Triton on CPU
                   tensors, and it is how the tests check the kernels inside a model.
Dropout draws its keep mask from `seed`: Philox in the kernels, a seeded torch.Generator in the
reference. Both are reproducible and regenerated in the backward, but they differ from each other.

This module imports torch and minillm.attention only, so registering the ops never needs
Triton. Public callers use the checked functions of kernels/attention.py and kernels/norms.py
(scaled_dot_product_attention, flash_attn_func, layer_norm, rms_norm), which validate inputs and
then call these ops; the ops themselves assume valid inputs.
"""

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from minillm.attention import attention_reference

LOG2E = 1.4426950408889634  # log2(e): the kernels keep the log-sum-exp in base 2


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


def _reference_masks(q: Tensor, k: Tensor, attn_mask: Optional[Tensor], dropout_p: float, is_causal: bool,
                     bottom_right: bool, seed: Optional[Tensor]) -> tuple[Optional[Tensor], bool, Optional[Tensor]]:
    """(attn_mask, is_causal, dropout keep mask) for attention_reference. Bottom-right causality
    becomes an explicit bool mask: row i sees keys 0..i + Lk - Lq."""
    Lq, Lk = q.shape[2], k.shape[2]
    if is_causal and bottom_right:
        attn_mask = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)  # (Lq, Lk)
        is_causal = False
    keep = None
    if dropout_p > 0.0:
        generator = torch.Generator(device=q.device).manual_seed(int(seed.item()))
        B, H = q.shape[:2]
        keep = torch.rand((B, H, Lq, Lk), generator=generator, device=q.device) >= dropout_p  # True = keep
    return attn_mask, is_causal, keep


def _reference_attention(q, k, v, attn_mask, dropout_p, is_causal, bottom_right, scale, seed) -> Tensor:
    mask, causal, keep = _reference_masks(q, k, attn_mask, dropout_p, is_causal, bottom_right, seed)
    return attention_reference(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=scale,
                               enable_gqa=k.shape[1] != q.shape[1], dropout_mask=keep)


def _reference_lse(q, k, attn_mask, is_causal, bottom_right, scale) -> Tensor:
    """(B, H, Lq) fp32: log2 of sum_j exp(s_ij) over the keys row i may see; +inf for a row
    that sees none (the kernels' convention)."""
    mask, causal, _ = _reference_masks(q, k, attn_mask, 0.0, is_causal, bottom_right, None)
    group = q.shape[1] // k.shape[1]
    scores = q.float() @ k.float().repeat_interleave(group, dim=1).transpose(-2, -1) * scale  # (B, H, Lq, Lk)
    if causal:
        scores = scores.masked_fill(~torch.ones_like(scores, dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    lse = torch.logsumexp(scores, dim=-1) * LOG2E  # (B, H, Lq)
    return lse.masked_fill(torch.isneginf(lse), float("inf"))


def _triton_layout(q: Tensor, k: Tensor):
    from minillm.kernels.attention import _Layout

    B, H, Lq, D = q.shape
    return _Layout(B, H, k.shape[1], Lq, k.shape[2], D, None, None)


def _seed_int(seed: Optional[Tensor]) -> int:
    return 0 if seed is None else int(seed.item())


@torch.library.custom_op("minillm::attention_forward", mutates_args=(), device_types="cpu")
def attention_forward(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], dropout_p: float,
                      is_causal: bool, bottom_right: bool, scale: float,
                      seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """CPU: the reference (or the interpreted kernel under TRITON_INTERPRET=1)."""
    if _interpreting():
        return _triton_attention_forward(q, k, v, attn_mask, dropout_p, is_causal, bottom_right, scale, seed)
    out = _reference_attention(q, k, v, attn_mask, dropout_p, is_causal, bottom_right, scale, seed)
    # Laid out like q, as the kernel's output and the fake below are.
    return torch.empty_like(q).copy_(out), _reference_lse(q, k, attn_mask, is_causal, bottom_right, scale)


@attention_forward.register_kernel("cuda")
def _triton_attention_forward(q, k, v, attn_mask, dropout_p, is_causal, bottom_right, scale, seed):
    from minillm.kernels.attention import _attention_forward

    return _attention_forward(q, k, v, attn_mask, _triton_layout(q, k), is_causal, bottom_right, scale,
                              dropout_p, _seed_int(seed))


@attention_forward.register_fake
def _(q, k, v, attn_mask, dropout_p, is_causal, bottom_right, scale, seed):
    B, H, Lq, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("minillm::attention_backward", mutates_args=(), device_types="cpu")
def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       attn_mask: Optional[Tensor], dropout_p: float, is_causal: bool, bottom_right: bool,
                       scale: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """CPU: the vector-Jacobian product of the reference (interpreted kernel under TRITON_INTERPRET=1)."""
    if _interpreting():
        return _triton_attention_backward(dout, q, k, v, out, lse, attn_mask, dropout_p, is_causal,
                                          bottom_right, scale, seed)

    def attend(q_, k_, v_):
        return _reference_attention(q_, k_, v_, attn_mask, dropout_p, is_causal, bottom_right, scale, seed)

    _, vjp = torch.func.vjp(attend, q, k, v)
    return tuple(g.contiguous() for g in vjp(dout))


@attention_backward.register_kernel("cuda")
def _triton_attention_backward(dout, q, k, v, out, lse, attn_mask, dropout_p, is_causal, bottom_right,
                               scale, seed):
    from minillm.kernels.attention import _attention_backward

    return _attention_backward(dout, q, k, v, out, lse, attn_mask, _triton_layout(q, k), is_causal,
                               bottom_right, scale, dropout_p, _seed_int(seed))


@attention_backward.register_fake
def _(dout, q, k, v, out, lse, attn_mask, dropout_p, is_causal, bottom_right, scale, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, attn_mask, dropout_p, is_causal, bottom_right, scale, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, seed)
    ctx.settings = (dropout_p, is_causal, bottom_right, scale)
    ctx.mark_non_differentiable(lse)


def _attention_backward_rule(ctx, dout, _dlse):
    q, k, v, out, lse, attn_mask, seed = ctx.saved_tensors
    dropout_p, is_causal, bottom_right, scale = ctx.settings
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, attn_mask, dropout_p, is_causal, bottom_right,
                                    scale, seed)
    return dq, dk, dv, None, None, None, None, None, None


attention_forward.register_autograd(_attention_backward_rule, setup_context=_attention_setup_context)


# ---------------------------------------------------------------------------------------------
# LayerNorm and RMSNorm over the last dimension of (M, N) rows
# ---------------------------------------------------------------------------------------------


def _reference_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                    is_rms: bool) -> Tensor:
    """F.layer_norm / F.rms_norm computed in float32 (as the kernels do), cast back to x's dtype."""
    n = x.shape[-1]
    wide = torch.promote_types(x.dtype, torch.float32)
    w = None if weight is None else weight.to(wide)
    if is_rms:
        y = F.rms_norm(x.to(wide), (n,), w, eps)
    else:
        y = F.layer_norm(x.to(wide), (n,), w, None if bias is None else bias.to(wide), eps)
    return y.to(x.dtype)


def _reference_stats(x: Tensor, eps: float, is_rms: bool) -> tuple[Tensor, Tensor]:
    """Per-row float32 mean (0 for RMSNorm) and 1 / sqrt(var + eps), or 1 / sqrt(mean(x^2) + eps)."""
    xf = x.float()
    if is_rms:
        return torch.zeros(x.shape[0], device=x.device), torch.rsqrt(xf.pow(2).mean(-1) + eps)
    var, mean = torch.var_mean(xf, dim=-1, correction=0)
    return mean, torch.rsqrt(var + eps)


@torch.library.custom_op("minillm::norm_forward", mutates_args=(), device_types="cpu")
def norm_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                 is_rms: bool) -> tuple[Tensor, Tensor, Tensor]:
    """CPU: the reference (or the interpreted kernel under TRITON_INTERPRET=1)."""
    if _interpreting():
        return _triton_norm_forward(x, weight, bias, eps, is_rms)
    return (_reference_norm(x, weight, bias, eps, is_rms), *_reference_stats(x, eps, is_rms))


@norm_forward.register_kernel("cuda")
def _triton_norm_forward(x, weight, bias, eps, is_rms):
    from minillm.kernels.norms import _norm_forward

    y, _, mean, rstd = _norm_forward(x, None, weight, bias, eps, is_rms, None)
    return y, mean, rstd


@norm_forward.register_fake
def _(x, weight, bias, eps, is_rms):
    m = x.shape[0]
    return x.new_empty(x.shape), x.new_empty((m,), dtype=torch.float32), x.new_empty((m,), dtype=torch.float32)


def _empty_grad(t: Optional[Tensor], like: Tensor) -> Tensor:
    """The op's stand-in for 'no gradient' (an op cannot return None): an empty tensor."""
    return like.new_empty((0,)) if t is None else t


@torch.library.custom_op("minillm::norm_backward", mutates_args=(), device_types="cpu")
def norm_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                  rstd: Tensor, eps: float, is_rms: bool) -> tuple[Tensor, Tensor, Tensor]:
    """CPU: the vector-Jacobian product of the reference (interpreted kernel under TRITON_INTERPRET=1)."""
    if _interpreting():
        return _triton_norm_backward(dy, x, weight, bias, mean, rstd, eps, is_rms)
    params = [t for t in (weight, bias) if t is not None]

    def normalise(x_, *params_):
        given = iter(params_)
        w = next(given) if weight is not None else None
        b = next(given) if bias is not None else None
        return _reference_norm(x_, w, b, eps, is_rms)

    _, vjp = torch.func.vjp(normalise, x, *params)
    grads = iter(vjp(dy.contiguous()))
    dx = next(grads).contiguous()
    dw = next(grads) if weight is not None else None
    db = next(grads) if bias is not None else None
    return dx, _empty_grad(dw, x), _empty_grad(db, x)


@norm_backward.register_kernel("cuda")
def _triton_norm_backward(dy, x, weight, bias, mean, rstd, eps, is_rms):
    from minillm.kernels.norms import _norm_backward, _rows

    dx, dw, db = _norm_backward(_rows(dy, dy.shape[-1]), x, weight, bias is not None, mean, rstd, None,
                                x.dtype, is_rms)
    dw = None if dw is None else dw.to(weight.dtype)
    db = None if db is None else db.to(bias.dtype)
    return dx, _empty_grad(dw, x), _empty_grad(db, x)


@norm_backward.register_fake
def _(dy, x, weight, bias, mean, rstd, eps, is_rms):
    return (x.new_empty(x.shape), _empty_grad(None if weight is None else weight.new_empty(weight.shape), x),
            _empty_grad(None if bias is None else bias.new_empty(bias.shape), x))


def _norm_setup_context(ctx, inputs, output):
    x, weight, bias, eps, is_rms = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.settings = (eps, is_rms)
    ctx.mark_non_differentiable(mean, rstd)


def _norm_backward_rule(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = norm_backward(dy, x, weight, bias, mean, rstd, *ctx.settings)
    return dx, None if weight is None else dw, None if bias is None else db, None, None


norm_forward.register_autograd(_norm_backward_rule, setup_context=_norm_setup_context)


__all__ = ["attention_forward", "attention_backward", "norm_forward", "norm_backward"]
