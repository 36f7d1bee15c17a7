"""The Transformer in plain PyTorch: BERT (encoder), GPT (decoder), the original encoder-decoder, and XLNet.

Read it top to bottom; each section uses only what came before it.

    1. Norms                 LayerNorm, RMSNorm
    2. Positions             learned table, sinusoidal table, rotary (RoPE), T5's relative bias
    3. Embeddings            token + position + segment
    4. Attention             multi-head, grouped-query, self and cross, with a KV cache
    5. MLP                   GELU / ReLU MLP and the gated variants (SwiGLU, T5 v1.1's gated GELU)
    6. Block                 attention + MLP around residual connections, pre- or post-norm
    7. The stack             Encoder (bidirectional) and Decoder (causal, optional cross-attention)
    8. Heads                 LM head, MLM head, NSP head, pooler, classifier
    9. Task models           CausalLM (GPT), MaskedLM (BERT), SequenceClassifier, Seq2SeqLM (T5)
   10. Initialisation
   11. XLNet                relative positions, two-stream attention, XLNetLM, XLNetClassifier

Which model a task trains, and how, is `minillm.tasks`' business: `build_model(config, task)` is there.

Shape legend (the same letters everywhere in minillm)
    B  batch                       T  sequence length (Tq queries, Tk keys)
    C  model width (d_model)       V  vocabulary size
    H  query heads                 Hkv key/value heads (H for multi-head, 1 for multi-query)
    D  head dim = C / H            F  feed-forward width (d_ff)

How attention and norms actually run (reference math, PyTorch SDPA, or our Triton kernels) is
decided in one place, `minillm.dispatch`; this file only says *what* is computed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from minillm import dispatch
from minillm.config import ModelConfig

IGNORE_INDEX = -100  # label value that the losses skip (padding, unmasked MLM positions)


# =============================================================================================
# 1. Norms
# =============================================================================================


class LayerNorm(nn.Module):
    """y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias, over the last dim (Ba et al., 2016)."""

    def __init__(self, dim: int, eps: float, bias: bool = True, backend: str = "auto"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.eps = eps
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.layer_norm(x, self.weight, self.bias, self.eps, self.backend)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich, 2019): no centring, no bias."""

    def __init__(self, dim: int, eps: float, backend: str = "auto"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.rms_norm(x, self.weight, self.eps, self.backend)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps, config.norm_backend)
    return LayerNorm(config.d_model, config.norm_eps, bias=config.bias, backend=config.norm_backend)


# =============================================================================================
# 2. Positions
# =============================================================================================


def sinusoidal_table(max_len: int, dim: int) -> torch.Tensor:
    """PE[pos, 2i] = sin(pos / 10000^(2i/C)),  PE[pos, 2i+1] = cos(pos / 10000^(2i/C)).

    Vaswani et al. (2017): each pair of dimensions is a clock at its own frequency, so a fixed
    offset between positions is a fixed rotation, which attention can learn to read.
    """
    position = torch.arange(max_len, dtype=torch.float32)[:, None]  # (T, 1)
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (C/2,)
    table = torch.zeros(max_len, dim)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table  # (T, C)


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al., 2021): rotate query and key features by an angle proportional to position.

    Pair feature i with feature i + D/2 and rotate the pair by pos * theta^(-2i/D). Then
    q_m . k_n depends on m and n only through m - n: relative position, with no learned table.
    """

    def __init__(self, head_dim: int, max_len: int, theta: float):
        super().__init__()
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (D/2,)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (T, D/2)
        # Derived from the config, so not saved in checkpoints.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # x: (B, H, T, D), position_ids: (B, T)
        cos = self.cos[position_ids][:, None].to(x.dtype)  # (B, 1, T, D/2)
        sin = self.sin[position_ids][:, None].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, D/2) each
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of each key-minus-query distance (Raffel et al., 2020, section 2.1).

    Bidirectional (encoder): half the buckets for keys after the query, half for keys before it.
    Causal (decoder self-attention): a query sees only keys at or before it, so all buckets go to
    the past. Within the n buckets of one direction, with d = |distance| and e = n / 2:
        bucket(d) = d                                                          for d < e
        bucket(d) = min(n - 1, e + floor((n - e) * log(d / e) / log(max_distance / e)))  otherwise
    Near distances are exact; far ones share logarithmically wider buckets, up to max_distance.
    """
    n = num_buckets
    if bidirectional:
        n //= 2
        offset = (relative_position > 0).long() * n  # keys after the query use the upper half
        distance = relative_position.abs()
    else:
        offset = torch.zeros_like(relative_position)
        distance = (-relative_position).clamp(min=0)  # keys after the query are masked anyway
    exact = n // 2
    log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (n - exact)).long()).clamp(max=n - 1)  # .long() truncates, i.e. floors (>= 0)
    return offset + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """T5's relative positions: a learned scalar per (distance bucket, head), added to Q K^T.

    One table per stack, computed once and shared by every block (Raffel et al., 2020): the
    encoder's self-attention uses bidirectional buckets, the decoder's causal ones; cross-attention
    has none. Unlike a position table it fixes no maximum length.
    """

    def __init__(self, config: ModelConfig, bidirectional: bool):
        super().__init__()
        self.table = nn.Embedding(config.relative_buckets, config.n_heads)  # (buckets, H)
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = config.relative_buckets, config.relative_max_distance

    def forward(
        self, allowed: torch.Tensor | None, is_causal: bool, q_len: int, past_len: int, device: torch.device
    ) -> torch.Tensor:  # (B or 1, H, Tq, Tk) float: bias where attention is allowed, -inf elsewhere
        """The bias, with a bool mask from `self_attention_mask` (or its plain `is_causal`) folded in."""
        k_len = past_len + q_len
        q_pos = torch.arange(past_len, k_len, device=device)[:, None]  # (Tq, 1): queries follow the cache
        k_pos = torch.arange(k_len, device=device)[None, :]  # (1, Tk)
        buckets = relative_position_bucket(k_pos - q_pos, self.bidirectional, self.num_buckets, self.max_distance)
        bias = rearrange(self.table(buckets), "q k h -> 1 h q k")  # (1, H, Tq, Tk)
        if is_causal:  # plain top-left causality, which the mask left to is_causal
            allowed = (k_pos <= q_pos)[None, None]  # (1, 1, Tq, Tk)
        return bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))


# =============================================================================================
# 3. Embeddings
# =============================================================================================


class Embeddings(nn.Module):
    """token + position (+ segment) embeddings, then (post-norm models) a norm, then dropout."""

    def __init__(self, config: ModelConfig, token: nn.Embedding | None = None):
        super().__init__()
        # An encoder-decoder passes one shared token table to both of its stacks.
        self.token = token if token is not None else nn.Embedding(config.vocab_size, config.d_model)
        self.position = None
        if config.pos_encoding == "learned":
            self.position = nn.Embedding(config.max_seq_len, config.d_model)
        elif config.pos_encoding == "sinusoidal":
            self.register_buffer("sinusoid", sinusoidal_table(config.max_seq_len, config.d_model), persistent=False)
        # RoPE adds nothing here: it rotates queries and keys inside attention.
        self.token_type = nn.Embedding(config.type_vocab_size, config.d_model) if config.type_vocab_size else None
        # BERT normalises the summed embeddings; pre-norm models normalise inside each block instead.
        self.norm = make_norm(config) if config.norm_placement == "post" else nn.Identity()
        self.dropout = nn.Dropout(config.embed_dropout)
        # Vaswani et al. scale token embeddings by sqrt(C) so they are not drowned by the sinusoids.
        self.token_scale = math.sqrt(config.d_model) if config.pos_encoding == "sinusoidal" else 1.0

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        position_ids: torch.Tensor,  # (B or 1, P + T)
        token_type_ids: torch.Tensor | None,  # (B, T)
        prompt: torch.Tensor | None = None,  # (B, P, C) soft prompt (minillm.prompts), put before the tokens
    ) -> torch.Tensor:  # (B, P + T, C)
        x = self.token(input_ids) * self.token_scale  # (B, T, C)
        if prompt is not None:  # the prompt vectors stand in for token embeddings; positions, segment 0 follow
            x = torch.cat((prompt.to(x.dtype), x), dim=1)  # (B, P + T, C)
            if token_type_ids is not None:
                token_type_ids = F.pad(token_type_ids, (prompt.shape[1], 0))  # (B, P + T): segment 0
        if self.position is not None:
            x = x + self.position(position_ids)
        elif hasattr(self, "sinusoid"):
            x = x + self.sinusoid[position_ids].to(x.dtype)
        if self.token_type is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)  # (B, T): segment 0
            x = x + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))


# =============================================================================================
# 4. Attention
# =============================================================================================


@dataclass
class LayerCache:
    """What one block keeps between decoding steps: keys and values it has already computed."""

    self_kv: tuple[torch.Tensor, torch.Tensor] | None = None  # (B, Hkv, T_past, D) each
    cross_kv: tuple[torch.Tensor, torch.Tensor] | None = None  # encoder keys/values, computed once


class MultiHeadAttention(nn.Module):
    """Attention(Q, K, V) = softmax(Q K^T / sqrt(D) + mask) V, in H heads (Vaswani et al., 2017).

    `config.attn_scale` replaces 1 / sqrt(D) (T5: 1). The mask is bool (True = attend) or additive
    float (T5: the relative position bias, -inf where not allowed).

    Queries come from x. Keys and values come from x (self-attention) or from the encoder's output
    (cross-attention). With Hkv < H key/value heads, each key/value head serves H / Hkv query
    heads (grouped-query attention; Hkv = 1 is multi-query).
    """

    def __init__(self, config: ModelConfig, causal: bool, cross: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.causal, self.cross = causal, cross
        self.q_proj = nn.Linear(config.d_model, self.n_heads * self.head_dim, bias=config.bias)
        self.k_proj = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=config.bias)
        self.v_proj = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=config.bias)
        self.out_proj = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=config.bias)
        self.attn_dropout = config.attn_dropout
        self.resid_dropout = nn.Dropout(config.resid_dropout)
        self.scale = config.attn_scale  # None: 1 / sqrt(D)
        self.backend = config.attn_backend

    def forward(
        self,
        x: torch.Tensor,  # (B, Tq, C)
        attn_mask: torch.Tensor | None,  # bool (B, 1, Tq, Tk), True = attend; or float (B, H, Tq, Tk), added
        is_causal: bool,  # True only when no mask is needed beyond plain top-left causality
        context: torch.Tensor | None = None,  # (B, Tk, C) encoder output, for cross-attention
        rotary: RotaryEmbedding | None = None,
        position_ids: torch.Tensor | None = None,  # (B, Tq)
        past_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        q = rearrange(self.q_proj(x), "b t (h d) -> b h t d", h=self.n_heads)  # (B, H, Tq, D)
        if self.cross and past_kv is not None:
            k, v = past_kv  # the encoder output does not change while decoding
        else:
            source = context if self.cross else x
            k = rearrange(self.k_proj(source), "b t (h d) -> b h t d", h=self.n_kv_heads)  # (B, Hkv, Tk, D)
            v = rearrange(self.v_proj(source), "b t (h d) -> b h t d", h=self.n_kv_heads)  # (B, Hkv, Tk, D)
            if rotary is not None:  # self-attention only: positions of queries and new keys match
                q, k = rotary(q, position_ids), rotary(k, position_ids)
            if past_kv is not None:  # append this step's keys/values to the cached ones (a learnt fp32
                # prefix joins autocast's bf16 keys in their dtype)
                k = torch.cat((past_kv[0].to(k.dtype), k), dim=2)  # (B, Hkv, T_past + Tq, D)
                v = torch.cat((past_kv[1].to(v.dtype), v), dim=2)
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(q.dtype)  # an fp32 bias table under autocast meets bf16 scores
        out = dispatch.attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=is_causal,
            scale=self.scale,
            backend=self.backend,
        )  # (B, H, Tq, D)
        out = rearrange(out, "b h t d -> b t (h d)")  # (B, Tq, C): heads side by side again
        return self.resid_dropout(self.out_proj(out)), (k, v)


def self_attention_mask(
    key_keep: torch.Tensor | None,
    q_len: int,
    past_len: int,
    causal: bool,
    device: torch.device,
    document_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, bool]:
    """Boolean mask (B or 1, 1, Tq, Tk), True = may attend, and whether plain `is_causal` suffices.

    key_keep: (B, Tk) bool, False at padding keys; Tk = past_len + q_len. Query i sits at
    position past_len + i of the whole sequence, so causal means key j <= past_len + i
    (bottom-right alignment once a cache exists).

    document_ids: (B, T) the document of each token of a packed window (no cache, so
    Tq = Tk = T). Query i may then attend to key j only if both belong to the same document:
    allowed = causal AND same document AND key not padding. Without it, packed documents see
    each other.
    """
    if key_keep is None and document_ids is None and (not causal or q_len == 1 or past_len == 0):
        # No padding: nothing to mask, or exactly the top-left causal pattern SDPA builds itself.
        return None, causal and past_len == 0 and q_len > 1
    k_len = past_len + q_len
    q_pos = torch.arange(past_len, k_len, device=device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(k_len, device=device)[None, :]  # (1, Tk)
    allowed = (k_pos <= q_pos) if causal else torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    allowed = allowed[None, None]  # (1, 1, Tq, Tk)
    if key_keep is not None:
        allowed = allowed & key_keep[:, None, None, :]  # (B, 1, Tq, Tk)
    if document_ids is not None:
        same_document = document_ids[:, :, None] == document_ids[:, None, :]  # (B, Tq, Tk)
        allowed = allowed & same_document[:, None]  # (B, 1, Tq, Tk)
    # A padding query may have no key left at all; letting it see itself keeps its softmax finite.
    # Its output is never used (its labels are ignored), so this changes no real position.
    allowed = allowed | (k_pos == q_pos)[None, None]
    return allowed, False


# =============================================================================================
# 5. MLP
# =============================================================================================


class MLP(nn.Module):
    """MLP(x) = W_out act(W_in x + b_in) + b_out, with W_in: C -> F and W_out: F -> C.

    `config.ff_dropout` drops hidden activations before W_out (T5); `resid_dropout` the output."""

    ACTIVATIONS = {
        "gelu": nn.GELU(),  # exact GELU, x * Phi(x): BERT
        "gelu_tanh": nn.GELU(approximate="tanh"),  # tanh approximation: GPT-2
        "relu": nn.ReLU(),  # the original Transformer
    }

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.d_model, config.ff_dim, bias=config.bias)
        self.act = self.ACTIVATIONS[config.activation]
        self.hidden_dropout = nn.Dropout(config.ff_dropout)
        self.fc_out = nn.Linear(config.ff_dim, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.resid_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.hidden_dropout(self.act(self.fc_in(x)))  # (B, T, C) -> (B, T, F)
        return self.dropout(self.fc_out(hidden))  # (B, T, C)


class GatedMLP(nn.Module):
    """W_out (act(W_gate x) * W_in x) (Shazeer, 2020): the gate decides what passes.

    SwiGLU (Llama) gates with silu; T5 v1.1's gated GELU with the tanh GELU.
    """

    GATES = {"swiglu": nn.SiLU(), "gated_gelu_tanh": nn.GELU(approximate="tanh")}

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc_gate = nn.Linear(config.d_model, config.ff_dim, bias=config.bias)
        self.gate_act = self.GATES[config.activation]
        self.fc_in = nn.Linear(config.d_model, config.ff_dim, bias=config.bias)
        self.hidden_dropout = nn.Dropout(config.ff_dropout)
        self.fc_out = nn.Linear(config.ff_dim, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.resid_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.hidden_dropout(self.gate_act(self.fc_gate(x)) * self.fc_in(x))  # (B, T, F)
        return self.dropout(self.fc_out(hidden))  # (B, T, C)


def make_mlp(config: ModelConfig) -> nn.Module:
    return GatedMLP(config) if config.activation in GatedMLP.GATES else MLP(config)


# =============================================================================================
# 6. Block
# =============================================================================================


class Block(nn.Module):
    """Self-attention, then (decoder of an encoder-decoder) cross-attention, then the MLP.

    Each sub-layer f sits on the residual stream in one of two ways:
        pre-norm  (GPT-2):             x = x + f(norm(x))     stable deep training
        post-norm (BERT, Vaswani):     x = norm(x + f(x))     the original layout
    """

    def __init__(self, config: ModelConfig, causal: bool, cross: bool):
        super().__init__()
        self.pre_norm = config.norm_placement == "pre"
        self.attn_norm = make_norm(config)
        self.attn = MultiHeadAttention(config, causal=causal)
        self.cross_norm = make_norm(config) if cross else None
        self.cross_attn = MultiHeadAttention(config, causal=False, cross=True) if cross else None
        self.mlp_norm = make_norm(config)
        self.mlp = make_mlp(config)

    def _sublayer_input(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        return norm(x) if self.pre_norm else x  # pre-norm: the sub-layer sees norm(x)

    def _residual_add(self, x: torch.Tensor, out: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        return x + out if self.pre_norm else norm(x + out)  # post-norm: the sum is normalised

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        self_mask: torch.Tensor | None,
        is_causal: bool,
        rotary: RotaryEmbedding | None,
        position_ids: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> tuple[torch.Tensor, LayerCache]:
        cache = cache or LayerCache()
        h = self._sublayer_input(x, self.attn_norm)
        h, self_kv = self.attn(h, self_mask, is_causal, rotary=rotary, position_ids=position_ids, past_kv=cache.self_kv)
        x = self._residual_add(x, h, self.attn_norm)
        cross_kv = None
        if self.cross_attn is not None:
            h = self._sublayer_input(x, self.cross_norm)
            h, cross_kv = self.cross_attn(h, context_mask, False, context=context, past_kv=cache.cross_kv)
            x = self._residual_add(x, h, self.cross_norm)
        h = self.mlp(self._sublayer_input(x, self.mlp_norm))
        x = self._residual_add(x, h, self.mlp_norm)
        return x, LayerCache(self_kv=self_kv, cross_kv=cross_kv)


# =============================================================================================
# 7. The stack: Encoder and Decoder
# =============================================================================================


def check_model_inputs(
    config: ModelConfig,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    token_type_ids: torch.Tensor | None,
    past_len: int,
    document_ids: torch.Tensor | None = None,
    virtual: int = 0,
) -> None:
    """Reject bad inputs with a message naming the argument, before they reach an index kernel.
    `past_len` counts the caller's cached tokens; `virtual` the soft prompt or prefix in front of them."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids: expected a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids: expected an integer tensor (int64), got {input_ids.dtype}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected shape (B, T) with T >= 1, got {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if virtual and virtual + past_len + T > config.max_seq_len:
        raise ValueError(
            f"input_ids: sequence length {past_len + T} (cached {past_len} + new {T}) plus the {virtual} virtual "
            f"tokens of the prompt/prefix exceeds max_seq_len={config.max_seq_len}"
        )
    if virtual and document_ids is not None:
        raise ValueError("document_ids: packed documents cannot share one soft prompt or prefix; pass document_ids=None")
    if past_len + T > config.max_seq_len:
        raise ValueError(
            f"input_ids: sequence length {past_len + T} (cached {past_len} + new {T}) exceeds "
            f"max_seq_len={config.max_seq_len}"
        )
    if document_ids is not None:
        if past_len > 0:
            raise ValueError(
                f"document_ids: cannot be combined with a KV cache ({past_len} cached positions); "
                f"generation continues one document, so pass document_ids=None"
            )
        if not isinstance(document_ids, torch.Tensor) or document_ids.dtype not in (torch.int64, torch.int32):
            got = document_ids.dtype if isinstance(document_ids, torch.Tensor) else type(document_ids).__name__
            raise TypeError(f"document_ids: expected an integer (B, T) tensor (int64), got {got}")
        if tuple(document_ids.shape) != (B, T):
            raise ValueError(f"document_ids: expected shape (B, T) = {(B, T)}, got {tuple(document_ids.shape)}")
    if torch.compiler.is_compiling():  # data-dependent checks would break the compiled graph
        return
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= config.vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"input_ids: id {bad} is outside the vocabulary [0, vocab_size={config.vocab_size})")
    if attention_mask is not None and tuple(attention_mask.shape) != (B, past_len + T):
        raise ValueError(
            f"attention_mask: expected shape (B, T_past + T) = {(B, past_len + T)} (1 = keep, 0 = pad), "
            f"got {tuple(attention_mask.shape)}"
        )
    if token_type_ids is not None:
        if config.type_vocab_size == 0:
            raise ValueError("token_type_ids: this model has no segment embeddings (type_vocab_size=0)")
        if tuple(token_type_ids.shape) != (B, T):
            raise ValueError(f"token_type_ids: expected shape {(B, T)}, got {tuple(token_type_ids.shape)}")
        if int(token_type_ids.min()) < 0 or int(token_type_ids.max()) >= config.type_vocab_size:
            raise ValueError(f"token_type_ids: values must lie in [0, type_vocab_size={config.type_vocab_size})")


class TransformerStack(nn.Module):
    """Embeddings, n blocks, and (pre-norm) a final norm: the body shared by every model."""

    def __init__(self, config: ModelConfig, n_layers: int, causal: bool, cross: bool, token: nn.Embedding | None = None):
        super().__init__()
        self.config, self.causal = config, causal
        self.embeddings = Embeddings(config, token)
        self.rotary = (
            RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
            if config.pos_encoding == "rope"
            else None
        )
        # T5: one relative bias for the whole stack, bidirectional in the encoder, causal in the decoder.
        self.relative_bias = (
            RelativePositionBias(config, bidirectional=not causal) if config.pos_encoding == "relative" else None
        )
        self.blocks = nn.ModuleList(Block(config, causal=causal, cross=cross) for _ in range(n_layers))
        # Pre-norm leaves the residual stream un-normalised, so one last norm precedes the heads.
        self.final_norm = make_norm(config) if config.norm_placement == "pre" else nn.Identity()
        self.final_dropout = nn.Dropout(config.final_dropout)
        # Trainable virtual tokens (minillm.prompts), absent in a plain model. At most one is set:
        self.prompt = None  # SoftPrompt: P input vectors put before the tokens (prompt tuning)
        self.prefix = None  # KeyValuePrefix: P keys and values per block that every query may attend to

    @property
    def virtual_tokens(self) -> int:
        """P, the length of the soft prompt or key/value prefix in front of every sequence (0: none)."""
        extra = self.prompt if self.prompt is not None else self.prefix
        return 0 if extra is None else extra.length

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T_past + T), 1 = keep, 0 = pad
        token_type_ids: torch.Tensor | None = None,  # (B, T)
        position_ids: torch.Tensor | None = None,  # (B, T)
        context: torch.Tensor | None = None,  # (B, Tk, C) encoder output
        context_mask: torch.Tensor | None = None,  # (B, Tk)
        cache: list[LayerCache] | None = None,
        document_ids: torch.Tensor | None = None,  # (B, T) document of each token of a packed window
    ) -> tuple[torch.Tensor, list[LayerCache]]:
        B, T = input_ids.shape
        virtual = self.virtual_tokens
        past_len = cache[0].self_kv[0].shape[2] if cache else 0
        check_model_inputs(self.config, input_ids, attention_mask, token_type_ids, past_len - virtual if cache else 0,
                           document_ids, virtual)
        prompt = None
        if virtual:
            # The caller's mask covers its own tokens; the P virtual ones come first and are always
            # kept. They enter once: as input vectors (prompt) or as the first cache (prefix), and
            # stay in the returned cache for the next decoding step.
            if position_ids is not None:
                raise ValueError(f"position_ids: not supported with a soft prompt or prefix ({virtual} virtual tokens); "
                                 f"positions are counted from the virtual tokens, pass position_ids=None")
            if attention_mask is not None:
                attention_mask = F.pad(attention_mask, (virtual, 0), value=1)  # (B, P + T_past + T)
            if not cache and self.prefix is not None:
                cache = self.prefix(B)  # a LayerCache per block: (B, Hkv, P, D) keys and values
                past_len = virtual
            elif not cache:
                prompt = self.prompt(B)  # (B, P, C)
        T_in = T + (prompt.shape[1] if prompt is not None else 0)  # positions this call computes
        key_keep = attention_mask.bool() if attention_mask is not None else None
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, past_len, T_in, input_ids.device)
        elif position_ids.shape[-1] != T or (
            not torch.compiler.is_compiling() and not 0 <= int(position_ids.min()) <= int(position_ids.max()) < self.config.max_seq_len
        ):
            raise ValueError(
                f"position_ids: expected shape (B, {T}) with values in [0, max_seq_len={self.config.max_seq_len}), "
                f"got shape {tuple(position_ids.shape)}"
            )
        x = self.embeddings(input_ids, position_ids, token_type_ids, prompt)  # (B, T_in, C)
        self_mask, is_causal = self_attention_mask(key_keep, T_in, past_len, self.causal, input_ids.device, document_ids)
        if self.relative_bias is not None:  # the mask becomes additive: bias where allowed, -inf elsewhere
            self_mask = self.relative_bias(self_mask, is_causal, T_in, past_len, input_ids.device)  # (B or 1, H, T, Tk)
            is_causal = False
        cross_mask = context_mask.bool()[:, None, None, :] if context_mask is not None else None  # (B, 1, 1, Tk)
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, layer_cache = block(
                x, self_mask, is_causal, self.rotary, position_ids,
                context=context, context_mask=cross_mask, cache=cache[i] if cache else None,
            )
            new_cache.append(layer_cache)
        x = x[:, T_in - T:]  # (B, T, C): the caller's tokens only, never the soft prompt's positions
        return self.final_dropout(self.final_norm(x)), new_cache


def default_position_ids(
    attention_mask: torch.Tensor | None, past_len: int, q_len: int, device: torch.device
) -> torch.Tensor:
    """Positions count real tokens only, so a left- or right-padded sequence gets the same
    positions as the sequence alone (padding invariance). Shape (B or 1, Tq)."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + q_len, device=device)[None]
    positions = attention_mask.long().cumsum(dim=-1) - 1  # (B, T_past + T)
    return positions[:, -q_len:].clamp(min=0)


class Encoder(TransformerStack):
    """Every token attends to every other (non-padding) token: BERT's body."""

    def __init__(self, config: ModelConfig, token: nn.Embedding | None = None):
        super().__init__(config, config.n_layers, causal=False, cross=False, token=token)


class Decoder(TransformerStack):
    """Token t attends only to tokens <= t: GPT's body. With `cross=True` each block also attends
    to an encoder's output (the decoder of the original Transformer)."""

    def __init__(self, config: ModelConfig, n_layers: int | None = None, cross: bool = False, token: nn.Embedding | None = None):
        super().__init__(config, n_layers or config.n_layers, causal=True, cross=cross, token=token)


# =============================================================================================
# 8. Heads
# =============================================================================================


class MaskedLMHead(nn.Module):
    """BERT's MLM head: dense -> activation -> norm -> decoder to the vocabulary (+ its own bias)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.act = MLP.ACTIVATIONS.get(config.activation, nn.GELU())  # SwiGLU models use plain GELU here
        self.norm = make_norm(config)
        self.decoder = nn.Linear(config.d_model, config.vocab_size, bias=False)  # tied to the token table
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(hidden)))) + self.bias  # (B, T, V)


class Pooler(nn.Module):
    """BERT's pooler: tanh(W h_[CLS] + b), a summary vector taken from the first token."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))  # (B, T, C) -> (B, C)


def last_token(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Hidden state of the last non-padding token of each row: a decoder's summary of the sequence."""
    if attention_mask is None:
        return hidden[:, -1]  # (B, C)
    # Index of the last 1 in each row, wherever the padding is (left or right).
    T = attention_mask.shape[1]
    last = T - 1 - attention_mask.long().flip(-1).argmax(dim=-1)  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def mean_over_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Average hidden state over the real (non-padding) tokens of each row: sum_t m_t h_t / sum_t m_t."""
    if attention_mask is None:
        return hidden.mean(dim=1)  # (B, C)
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


# =============================================================================================
# 9. Task models
# =============================================================================================


@dataclass
class ModelOutput:
    """What a task model returns. Read it by attribute (`out.logits`); it also answers the way a
    transformers output does: `out["logits"]` by name, `out[0]` by position, where positions count
    the fields that are set in transformers' order (loss first when there is one, then logits)."""

    logits: torch.Tensor  # (B, T, V) for language models ((N, V) masked positions only, on request), (B, num_labels) for classifiers
    loss: torch.Tensor | None = None
    nsp_logits: torch.Tensor | None = None  # (B, 2): BERT pretraining
    cache: list[LayerCache] | None = None  # for the next decoding step
    hidden_states: torch.Tensor | None = None  # (B, T, C) output of the last block (after final norm)

    _ORDER = ("loss", "logits", "nsp_logits", "cache", "hidden_states")  # transformers puts the loss first

    def keys(self) -> list[str]:
        """The names of the fields that are set, in transformers' order."""
        return [name for name in self._ORDER if getattr(self, name) is not None]

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, name) for name in self.keys())

    def __getitem__(self, key: str | int | slice):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(f"ModelOutput: no field {key!r} is set; set fields are {self.keys()}")
            return getattr(self, key)
        return self.to_tuple()[key]


def token_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    """Cross-entropy over positions whose label is not IGNORE_INDEX.

    reduction="mean" averages over those tokens; "sum" lets a trainer divide by the token count of
    the whole accumulated batch, so gradient accumulation equals one large batch exactly.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction: got {reduction!r}, expected 'mean' or 'sum'")
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction=reduction
    )


def _check_labels(name: str, labels: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(labels.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(labels.shape)}")


class Model(nn.Module):
    """What every minillm model shares: its config, parameter counting, optimizer groups, FLOPs."""

    config: ModelConfig

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (tied weights counted once)."""
        params = {id(p): p for p in self.parameters()}
        total = sum(p.numel() for p in params.values())
        if exclude_embeddings:
            total -= sum(m.weight.numel() for m in {id(m): m for m in self.modules() if isinstance(m, nn.Embedding)}.values())
        return total

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay matrices; never decay biases, norm weights or embeddings."""
        no_decay_ids = set()
        for module in self.modules():
            if isinstance(module, (nn.Embedding, LayerNorm, RMSNorm)):
                no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
        decay, no_decay, seen = [], [], set()
        for name, param in self.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            is_bias = name.endswith("bias")
            (no_decay if is_bias or id(param) in no_decay_ids or param.dim() < 2 else decay).append(param)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    # The shape transformers users know. The functions stay the way to read how each is done:
    # minillm.checkpoint.load_model / save_model, minillm.generation.generate. The imports sit inside
    # the methods because those modules build on this one.

    @classmethod
    def from_pretrained(cls, path, **overrides) -> "Model":
        """The model saved at `path` (a minillm checkpoint or run directory, or a Hugging Face GPT-2
        or BERT folder), in eval mode. `overrides`: runtime fields (attn_backend, dropouts...) and,
        on `SequenceClassifier`, head fields (num_labels, classifier_pooling): a classifier built
        from a language model keeps its body and gets a new head, as transformers does."""
        from minillm import checkpoint

        head = {name: overrides.pop(name) for name in checkpoint.HEAD_FIELDS if name in overrides}
        if head and cls is not SequenceClassifier:
            raise ValueError(f"{cls.__name__}.from_pretrained: {sorted(head)} configure a classifier head; "
                             f"{cls.__name__} has none")
        model, configs, _ = checkpoint.load_model(path, **overrides)
        if isinstance(model, cls) and not head:
            return model
        if cls is SequenceClassifier and model.config.arch in ("encoder", "decoder"):
            classifier = SequenceClassifier(dataclasses.replace(model.config, **head))
            checkpoint.init_from(classifier, path)
            return classifier.eval()
        raise TypeError(f"{cls.__name__}.from_pretrained: {path} holds a {type(model).__name__} "
                        f"(task {configs.get('task')!r}); load it with {type(model).__name__}.from_pretrained")

    def save_pretrained(self, path, tokenizer=None, task: str | None = None) -> None:
        """Save to the directory `path` what `from_pretrained` reads back: config.json (task and
        model config), model.safetensors and, when given, the tokenizer. For transformers' own
        format, see `minillm export` (minillm.convert.export)."""
        from minillm.checkpoint import save_model

        save_model(path, self, task=task, tokenizer=tokenizer)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 N (forward + backward through N non-embedding weights) plus
        attention scores 12 L C T (Kaplan et al., 2020; PaLM appendix B)."""
        n_layers = self.config.n_layers + (self.config.decoder_layers if self.config.arch == "encoder-decoder" else 0)
        return 6 * self.num_parameters(exclude_embeddings=True) + 12 * n_layers * self.config.d_model * seq_len


class CausalLM(Model):
    """GPT: a decoder whose output at position t predicts the token at t + 1."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.arch != "decoder":
            raise ValueError(f"config.arch: CausalLM needs 'decoder', got {config.arch!r}")
        self.config = config
        self.decoder = Decoder(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:  # one matrix both reads and writes tokens
            self.lm_head.weight = self.decoder.embeddings.token.weight
        init_weights(self, config)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T_past + T)
        labels: torch.Tensor | None = None,  # (B, T), usually input_ids; shifted here
        position_ids: torch.Tensor | None = None,  # (B, T)
        cache: list[LayerCache] | None = None,
        loss_reduction: str = "mean",
        document_ids: torch.Tensor | None = None,  # (B, T) document of each token of a packed window
    ) -> ModelOutput:
        """Logits (and the shifted next-token loss with `labels`).

        Packed windows hold several documents. With `document_ids` (the `CausalLMCollator`
        key of `DataConfig.document_mask=True`) a token attends only to earlier tokens of its own
        document; pass `position_ids` that restart at each document too (the collator does), and
        each document gets the logits it gets alone. This builds a (B, 1, T, T) mask instead of
        plain causal attention, and cannot be combined with `cache`.
        """
        hidden, new_cache = self.decoder(
            input_ids, attention_mask, position_ids=position_ids, cache=cache, document_ids=document_ids
        )
        logits = self.lm_head(hidden)  # (B, T, V)
        loss = None
        if labels is not None:
            _check_labels("labels", labels, tuple(input_ids.shape))
            # Position t predicts token t + 1: drop the last prediction and the first label.
            loss = token_loss(logits[:, :-1], labels[:, 1:], loss_reduction)
        return ModelOutput(logits=logits, loss=loss, cache=new_cache, hidden_states=hidden)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **options) -> torch.Tensor:
        """Prompt ids followed by new tokens, as `transformers`' `model.generate`: greedy by default,
        stopping at `config.eos_token_id`. Options and the sliding context window: see
        `minillm.generation.generate`."""
        from minillm.generation import generate

        options.setdefault("eos_token_id", self.config.eos_token_id)
        return generate(self, input_ids, attention_mask, **options)


class MaskedLM(Model):
    """BERT: an encoder that predicts masked tokens (MLM) and, with `nsp=True`, whether sentence B
    followed sentence A (next-sentence prediction, from the pooled [CLS] token)."""

    def __init__(self, config: ModelConfig, nsp: bool = False):
        super().__init__()
        if config.arch != "encoder":
            raise ValueError(f"config.arch: MaskedLM needs 'encoder', got {config.arch!r}")
        self.config = config
        self.encoder = Encoder(config)
        self.mlm_head = MaskedLMHead(config)
        if config.tie_embeddings:
            self.mlm_head.decoder.weight = self.encoder.embeddings.token.weight
        self.pooler = Pooler(config) if nsp else None
        self.nsp_head = nn.Linear(config.d_model, 2) if nsp else None
        init_weights(self, config)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T)
        token_type_ids: torch.Tensor | None = None,  # (B, T)
        labels: torch.Tensor | None = None,  # (B, T), IGNORE_INDEX except at masked positions
        next_sentence_label: torch.Tensor | None = None,  # (B,), 0 = B follows A, 1 = random B
        position_ids: torch.Tensor | None = None,  # (B, T); default counts real tokens only
        loss_reduction: str = "mean",
        masked_logits_only: bool = False,
    ) -> ModelOutput:
        """`masked_logits_only=True` (needs `labels`) runs the MLM head on the labelled positions
        only and returns their logits, (N, V) in row-major (B, T) order: the vocabulary
        projection is the costliest matmul of a small BERT, and ~85% of its rows feed no loss."""
        hidden, _ = self.encoder(input_ids, attention_mask, token_type_ids, position_ids=position_ids)
        nsp_logits = self.nsp_head(self.pooler(hidden)) if self.nsp_head is not None else None  # (B, 2)
        loss = None
        if labels is not None:
            _check_labels("labels", labels, tuple(input_ids.shape))
        if masked_logits_only:
            if labels is None:
                raise ValueError("masked_logits_only: needs labels (the positions to predict)")
            predicted = labels != IGNORE_INDEX  # (B, T)
            logits = self.mlm_head(hidden[predicted])  # (N, V)
            loss = token_loss(logits, labels[predicted], loss_reduction)
        else:
            logits = self.mlm_head(hidden)  # (B, T, V)
            if labels is not None:
                loss = token_loss(logits, labels, loss_reduction)
        if next_sentence_label is not None:
            if nsp_logits is None:
                raise ValueError("next_sentence_label: this model has no NSP head (build it with nsp=True)")
            _check_labels("next_sentence_label", next_sentence_label, (input_ids.shape[0],))
            nsp_loss = token_loss(nsp_logits, next_sentence_label, loss_reduction)
            loss = nsp_loss if loss is None else loss + nsp_loss
        return ModelOutput(logits=logits, loss=loss, nsp_logits=nsp_logits, hidden_states=hidden)


class SequenceClassifier(Model):
    """A label for a whole sequence (or sentence pair), from one summary vector of its hidden states
    (`config.classifier_pooling`):

    - "cls", the encoder default (BERT): the pooled [CLS] token, tanh(W h_0 + b);
    - "last", the decoder default (GPT): the last real token, the only one that has seen everything;
    - "mean": the average over real tokens, which needs no pretrained [CLS] summary and learns
      quickly from few labels (as Sentence-BERT does).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.arch == "encoder-decoder":
            raise ValueError("config.arch: SequenceClassifier needs 'encoder' or 'decoder', got 'encoder-decoder'")
        self.config = config
        self.pooling = config.classifier_pooling
        if self.pooling == "auto":
            self.pooling = "cls" if config.arch == "encoder" else "last"
        self.body = Encoder(config) if config.arch == "encoder" else Decoder(config)
        self.pooler = Pooler(config) if self.pooling == "cls" else None
        self.dropout = nn.Dropout(config.resid_dropout)
        self.classifier = nn.Linear(config.d_model, config.num_labels)
        init_weights(self, config)

    def summarise(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T, C) hidden states -> (B, C) summary, by `self.pooling`."""
        if self.pooling == "cls":
            return self.pooler(hidden)
        if self.pooling == "last":
            return last_token(hidden, attention_mask)
        return mean_over_tokens(hidden, attention_mask)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,  # (B,) class ids, or floats when num_labels == 1
        position_ids: torch.Tensor | None = None,  # (B, T); default counts real tokens only
        loss_reduction: str = "mean",
    ) -> ModelOutput:
        hidden, _ = self.body(input_ids, attention_mask, token_type_ids, position_ids=position_ids)
        summary = self.summarise(hidden, attention_mask)  # (B, C)
        logits = self.classifier(self.dropout(summary))  # (B, num_labels)
        loss = None
        if labels is not None:
            _check_labels("labels", labels, (input_ids.shape[0],))
            if self.config.num_labels == 1:  # regression (e.g. STS-B similarity scores)
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float(), reduction=loss_reduction)
            else:
                loss = token_loss(logits, labels, loss_reduction)
        return ModelOutput(logits=logits, loss=loss, hidden_states=hidden)


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: [start, y_0, ..., y_{T-2}], with ignored labels as pad."""
    shifted = torch.full_like(labels, pad_id)
    shifted[:, 0] = start_id
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_id)


class Seq2SeqLM(Model):
    """The original Transformer: an encoder reads the source; a decoder writes the target one
    token at a time, attending to its own past (causal) and to the whole source (cross).

    T5 is this model with T5's settings (config.t5_small): relative position bias, RMSNorm, no
    biases, unscaled attention, and (v1.0) the decoder output scaled by C^-0.5 before the tied head.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.arch != "encoder-decoder":
            raise ValueError(f"config.arch: Seq2SeqLM needs 'encoder-decoder', got {config.arch!r}")
        self.config = config
        shared = nn.Embedding(config.vocab_size, config.d_model)  # one table for source, target, output
        self.encoder = Encoder(config, token=shared)
        self.decoder = Decoder(config, n_layers=config.decoder_layers, cross=True, token=shared)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = shared.weight
        init_weights(self, config)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden, _ = self.encoder(input_ids, attention_mask)
        return hidden  # (B, Ts, C)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # (B, Ts) source
        attention_mask: torch.Tensor | None = None,  # (B, Ts)
        decoder_input_ids: torch.Tensor | None = None,  # (B, Tt); built from labels when omitted
        decoder_attention_mask: torch.Tensor | None = None,  # (B, T_past + Tt)
        labels: torch.Tensor | None = None,  # (B, Tt) target, not shifted
        encoder_hidden: torch.Tensor | None = None,  # (B, Ts, C), reused while decoding
        cache: list[LayerCache] | None = None,
        loss_reduction: str = "mean",
    ) -> ModelOutput:
        if encoder_hidden is None:
            if input_ids is None:
                raise ValueError("input_ids: required unless encoder_hidden is given")
            encoder_hidden = self.encode(input_ids, attention_mask)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("decoder_input_ids: required unless labels are given")
            decoder_input_ids = shift_right(labels, self.config.bos_token_id, self.config.pad_token_id)
        hidden, new_cache = self.decoder(
            decoder_input_ids, decoder_attention_mask, context=encoder_hidden, context_mask=attention_mask, cache=cache
        )
        # T5 v1.0: the tied head is the N(0, 1) embedding table, so its input is scaled by C^-0.5.
        head_input = hidden * self.config.d_model ** -0.5 if self.config.scale_decoder_output else hidden
        logits = self.lm_head(head_input)  # (B, Tt, V)
        loss = None
        if labels is not None:
            _check_labels("labels", labels, tuple(decoder_input_ids.shape))
            loss = token_loss(logits, labels, loss_reduction)
        return ModelOutput(logits=logits, loss=loss, cache=new_cache, hidden_states=hidden)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **options) -> torch.Tensor:
        """Decoder start token followed by the output for each source, as `transformers`'
        `model.generate`: greedy by default (beam search with `num_beams`), stopping at
        `config.eos_token_id`. Options: see `minillm.generation.generate_seq2seq`."""
        from minillm.generation import generate_seq2seq

        options.setdefault("eos_token_id", self.config.eos_token_id)
        return generate_seq2seq(self, input_ids, attention_mask, **options)


# =============================================================================================
# 10. Initialisation
# =============================================================================================


def init_weights(model: nn.Module, config: ModelConfig) -> None:
    """GPT-2/BERT initialisation: weights ~ N(0, 0.02), biases 0, norms 1.

    The projections that write into the residual stream (attention out_proj, MLP fc_out) get
    std 0.02 / sqrt(2 L): the stream sums 2 L of them, so its variance stays O(1) at any depth.
    """
    n_residual = 2 * config.n_layers + (3 * config.decoder_layers if config.arch == "encoder-decoder" else 0)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            is_residual_out = name.endswith(("out_proj", "fc_out"))
            std = config.init_std / math.sqrt(n_residual) if is_residual_out else config.init_std
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=config.init_std)
    # Tied output layers share the embedding table, which was initialised last: nothing to redo.



# =============================================================================================
# 11. XLNet: relative positions, two-stream attention, permutation language modelling
# =============================================================================================
#
# XLNet (Yang et al., 2019) trains a Transformer-XL body (Dai et al., 2019) to predict tokens in a
# random factorisation order z: token z_t is predicted from the tokens z_<t, wherever they sit. Two
# things make that work without changing the input order:
#
#   * masks instead of reordering: `perm_mask[b, i, j] = 1` means position i may not see the
#     content of position j (j comes at or after i in the order); `target_mapping[b, p, t] = 1`
#     says that prediction p is for position t. These are transformers' arguments and meanings.
#   * two streams per layer. The content stream h_i sees its own token (h_i may look at itself),
#     as in any encoder; the query stream g_i knows only the *position* i it must predict, starts
#     from one learned vector (mask_emb), and reads the content stream of the positions before it
#     in the order, never its own token: otherwise predicting it would be copying it (section 2.3).
#
# Positions are relative (Transformer-XL, terms (a)-(d) of section 3.3 of Dai et al.): query i's score
# on key j is
#     (q_i + u)^T k_j            content                (u = r_w_bias)
#   + (q_i + v)^T W_r R_{i-j}    relative position      (v = r_r_bias, R: sinusoids of i - j)
#   + (q_i + b)^T s_ij           segment                (b = r_s_bias, s_ij = seg_embed[i, j in
#                                                         different segments]: XLNet's relative
#                                                         segment encoding, section 2.5)
# all divided by sqrt(D). Only the difference i - j and "same segment or not" enter, so padding
# and segment numbering do not change a real token's output.
#
# Not supported: segment recurrence (mems, Transformer-XL's cache of the previous segment),
# bidirectional data input (bi_data), clamp_len, one-directional attention (attn_type="uni").


def relative_sinusoids(q_len: int, k_len: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """R: sinusoids of the relative distances k_len, k_len - 1, ..., -q_len + 1, shape (k_len + q_len, C).

    Row r holds distance d = k_len - r; query i and key j are d = i - j apart, row k_len - i + j.
    The features are [sin(d w_0), ..., sin(d w_{C/2-1}), cos(d w_0), ...], w_k = 10000^(-2k/C): the
    sines in one half and the cosines in the other (section 2's table interleaves them).
    """
    distances = torch.arange(k_len, -q_len, -1, device=device, dtype=torch.float32)  # (Tk + Tq,)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)  # (C/2,)
    angles = distances[:, None] * inv_freq[None]  # (Tk + Tq, C/2)
    return torch.cat((angles.sin(), angles.cos()), dim=-1)  # (Tk + Tq, C)


def rel_shift(position_scores: torch.Tensor, k_len: int) -> torch.Tensor:
    """Score of query i against relative-position row r (B, H, Tq, Tk + Tq) -> against key j (B, H, Tq, Tk).

    Query i meets key j at distance i - j, which is row r = k_len - i + j of `relative_sinusoids`;
    this picks that row for every (i, j). Transformer-XL does the same with a pad-and-reshape trick
    that shifts row i left by i; an index is slower but says what happens.
    """
    q_len = position_scores.shape[2]
    i = torch.arange(q_len, device=position_scores.device)[:, None]  # (Tq, 1)
    j = torch.arange(k_len, device=position_scores.device)[None, :]  # (1, Tk)
    rows = (k_len - i + j).expand(*position_scores.shape[:2], q_len, k_len)  # (B, H, Tq, Tk)
    return position_scores.gather(3, rows)


class XLNetAttention(nn.Module):
    """Relative multi-head attention of one layer, run for both streams with the same weights.

    Keys and values always come from the content stream h; queries come from h (content stream) or
    from g (query stream). Post-norm: norm(x + W_o attention(x)), as BERT.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        width = config.n_heads * config.head_dim
        # Transformer-XL's projections have no bias; the three biases below take their place.
        self.q_proj = nn.Linear(config.d_model, width, bias=False)
        self.k_proj = nn.Linear(config.d_model, width, bias=False)
        self.v_proj = nn.Linear(config.d_model, width, bias=False)
        self.r_proj = nn.Linear(config.d_model, width, bias=False)  # W_r: sinusoids -> position keys
        self.out_proj = nn.Linear(width, config.d_model, bias=False)
        self.r_w_bias = nn.Parameter(torch.zeros(config.n_heads, config.head_dim))  # u: content bias
        self.r_r_bias = nn.Parameter(torch.zeros(config.n_heads, config.head_dim))  # v: position bias
        self.r_s_bias = nn.Parameter(torch.zeros(config.n_heads, config.head_dim))  # b: segment bias
        self.seg_embed = nn.Parameter(torch.zeros(2, config.n_heads, config.head_dim))  # s: same / different
        self.norm = LayerNorm(config.d_model, config.norm_eps, backend=config.norm_backend)
        self.attn_dropout = nn.Dropout(config.attn_dropout)
        self.resid_dropout = nn.Dropout(config.resid_dropout)

    def attend(
        self,
        q: torch.Tensor,  # (B, Tq, H, D) queries
        k: torch.Tensor,  # (B, Tk, H, D) content keys
        v: torch.Tensor,  # (B, Tk, H, D) values
        r: torch.Tensor,  # (Tk + Tq, H, D) position keys W_r R
        other_segment: torch.Tensor | None,  # (B, Tq, Tk) bool: i and j lie in different segments
        allowed: torch.Tensor | None,  # (B, Tq, Tk) bool: True = i may attend to j
    ) -> torch.Tensor:
        content = torch.einsum("bihd,bjhd->bhij", q + self.r_w_bias, k)  # (B, H, Tq, Tk)
        position = rel_shift(torch.einsum("bihd,rhd->bhir", q + self.r_r_bias, r), k.shape[1])  # (B, H, Tq, Tk)
        scores = content + position
        if other_segment is not None:
            segment = torch.einsum("bihd,shd->bhis", q + self.r_s_bias, self.seg_embed)  # (B, H, Tq, 2)
            scores = scores + torch.where(other_segment[:, None], segment[..., 1:], segment[..., :1])
        scores = scores / math.sqrt(self.head_dim)
        if allowed is not None:
            # -1e30 rather than -inf, as XLNet: a query that may see nothing (the first of an order in
            # the query stream) averages all values uniformly instead of returning NaN.
            scores = scores.masked_fill(~allowed[:, None], -1e30)
        weights = self.attn_dropout(torch.softmax(scores.float(), dim=-1).to(v.dtype))  # (B, H, Tq, Tk)
        return torch.einsum("bhij,bjhd->bihd", weights, v)  # (B, Tq, H, D)

    def forward(
        self,
        h: torch.Tensor,  # (B, T, C) content stream
        g: torch.Tensor | None,  # (B, P, C) query stream, one row per prediction, or None
        r: torch.Tensor,  # (2T, C) relative sinusoids
        other_segment: torch.Tensor | None,  # (B, T, T) bool
        allowed_h: torch.Tensor | None,  # (B, T, T) bool: the content stream also sees itself
        allowed_g: torch.Tensor | None,  # (B, T, T) bool: the query stream sees what came before
        target_mapping: torch.Tensor | None,  # (B, P, T): prediction p is for position t
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        def heads(x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
            return rearrange(proj(x), "... t (h d) -> ... t h d", h=self.n_heads)  # (B, T, H, D)

        k, v, pos = heads(h, self.k_proj), heads(h, self.v_proj), heads(r, self.r_proj)  # pos: (2T, H, D)
        out_h = self.attend(heads(h, self.q_proj), k, v, pos, other_segment, allowed_h)  # (B, T, H, D)
        new_h = self.norm(h + self.resid_dropout(self.out_proj(rearrange(out_h, "b t h d -> b t (h d)"))))
        if g is None:
            return new_h, None
        q_g = heads(g, self.q_proj)  # (B, P, H, D)
        # Put each prediction's query at the position it predicts, attend, and read it back: the
        # masks are per position, so this reuses them unchanged.
        q_at_position = torch.einsum("bphd,bpt->bthd", q_g, target_mapping)  # (B, T, H, D)
        out_g = self.attend(q_at_position, k, v, pos, other_segment, allowed_g)  # (B, T, H, D)
        out_g = torch.einsum("bthd,bpt->bphd", out_g, target_mapping)  # (B, P, H, D)
        new_g = self.norm(g + self.resid_dropout(self.out_proj(rearrange(out_g, "b p h d -> b p (h d)"))))
        return new_h, new_g


class XLNetBlock(nn.Module):
    """Relative attention, then the MLP, each post-norm; the same weights for both streams."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn = XLNetAttention(config)
        self.mlp = MLP(config)
        self.mlp_norm = LayerNorm(config.d_model, config.norm_eps, backend=config.norm_backend)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_norm(x + self.mlp(x))  # (B, T, C)

    def forward(self, h, g, r, other_segment, allowed_h, allowed_g, target_mapping):
        h, g = self.attn(h, g, r, other_segment, allowed_h, allowed_g, target_mapping)
        return self.feed_forward(h), (self.feed_forward(g) if g is not None else None)


def xlnet_masks(
    perm_mask: torch.Tensor | None, attention_mask: torch.Tensor | None, T: int, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(content-stream mask, query-stream mask), each (B, T, T) bool, True = may attend; None = all.

    The query stream of position i may see key j unless j is padding or perm_mask[i, j] = 1 (j
    does not come before i in the order). The content stream sees the same plus itself.
    """
    if perm_mask is None and attention_mask is None:
        return None, None
    blocked = torch.zeros(1, T, T, dtype=torch.bool, device=device)
    if perm_mask is not None:
        blocked = blocked | perm_mask.bool()  # (B, T, T)
    if attention_mask is not None:
        blocked = blocked | ~attention_mask.bool()[:, None, :]  # (B, T, T): padding keys
    allowed_g = ~blocked
    allowed_h = allowed_g | torch.eye(T, dtype=torch.bool, device=device)
    return allowed_h, allowed_g


def check_xlnet_inputs(input_ids, attention_mask, token_type_ids, perm_mask, target_mapping, config) -> None:
    """Shapes and ranges of XLNet's inputs, each error naming its argument."""
    check_model_inputs(config, input_ids, attention_mask, None, 0)  # ids and attention_mask
    B, T = input_ids.shape
    if token_type_ids is not None:
        # Only "same segment or not" is read, so any integer segment ids serve (XLNet's tokenizer
        # gives [CLS] segment 2 and padding 4).
        if tuple(token_type_ids.shape) != (B, T) or token_type_ids.is_floating_point():
            raise ValueError(f"token_type_ids: expected integer ids of shape {(B, T)}, got {tuple(token_type_ids.shape)}")
    if perm_mask is not None and tuple(perm_mask.shape) != (B, T, T):
        raise ValueError(f"perm_mask: expected shape (B, T, T) = {(B, T, T)} (1 = may not attend), "
                         f"got {tuple(perm_mask.shape)}")
    if target_mapping is not None and (target_mapping.dim() != 3 or tuple(target_mapping.shape[::2]) != (B, T)):
        raise ValueError(f"target_mapping: expected shape (B, P, T) with B={B}, T={T} (one-hot rows), "
                         f"got {tuple(target_mapping.shape)}")


class XLNetModel(nn.Module):
    """XLNet's body: token embeddings, relative sinusoids, n two-stream blocks.

    Returns the content stream (B, T, C) and, with a target mapping, the query stream (B, P, C).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.d_model)  # tokens only: positions are relative
        self.mask_emb = nn.Parameter(torch.zeros(config.d_model))  # g's input: "a token goes here"
        self.blocks = nn.ModuleList(XLNetBlock(config) for _ in range(config.n_layers))
        self.dropout = nn.Dropout(config.embed_dropout)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T), 1 = token, 0 = pad
        token_type_ids: torch.Tensor | None = None,  # (B, T) segment ids
        perm_mask: torch.Tensor | None = None,  # (B, T, T), 1 = i may not see j
        target_mapping: torch.Tensor | None = None,  # (B, P, T), one-hot: prediction p is for t
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        check_xlnet_inputs(input_ids, attention_mask, token_type_ids, perm_mask, target_mapping, self.config)
        B, T = input_ids.shape
        allowed_h, allowed_g = xlnet_masks(perm_mask, attention_mask, T, input_ids.device)
        other_segment = None
        if token_type_ids is not None:
            other_segment = token_type_ids[:, :, None] != token_type_ids[:, None, :]  # (B, T, T)
        h = self.dropout(self.embeddings(input_ids))  # (B, T, C)
        g = None
        if target_mapping is not None:
            target_mapping = target_mapping.to(h.dtype)
            g = self.dropout(self.mask_emb.expand(B, target_mapping.shape[1], -1))  # (B, P, C)
        r = self.dropout(relative_sinusoids(T, T, self.config.d_model, input_ids.device).to(h.dtype))  # (2T, C)
        for block in self.blocks:
            h, g = block(h, g, r, other_segment, allowed_h, allowed_g, target_mapping)
        return h, g


def _init_xlnet(model: nn.Module, config: ModelConfig) -> None:
    """GPT-2/BERT initialisation, plus N(0, init_std) for the parameters that are not layers."""
    init_weights(model, config)
    for module in model.modules():
        if isinstance(module, XLNetAttention):
            for param in (module.r_w_bias, module.r_r_bias, module.r_s_bias, module.seg_embed):
                nn.init.normal_(param, mean=0.0, std=config.init_std)
        elif isinstance(module, XLNetModel):
            nn.init.normal_(module.mask_emb, mean=0.0, std=config.init_std)


class XLNetLM(Model):
    """XLNet with its language-model head: logits for the positions a target mapping names.

    With `target_mapping` (B, P, T) the logits (B, P, V) come from the query stream: prediction p
    sees only what `perm_mask` lets it see, not its own token. Without, they come from the content
    stream (B, T, V), which sees every unmasked token, its own included.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.arch != "xlnet":
            raise ValueError(f"config.arch: XLNetLM needs 'xlnet', got {config.arch!r}")
        self.config = config
        self.body = XLNetModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=True)  # bias: its own, as XLNet
        if config.tie_embeddings:
            self.lm_head.weight = self.body.embeddings.weight
        _init_xlnet(self, config)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T)
        token_type_ids: torch.Tensor | None = None,  # (B, T)
        perm_mask: torch.Tensor | None = None,  # (B, T, T)
        target_mapping: torch.Tensor | None = None,  # (B, P, T)
        labels: torch.Tensor | None = None,  # (B, P) with a target mapping, else (B, T)
        loss_reduction: str = "mean",
    ) -> ModelOutput:
        h, g = self.body(input_ids, attention_mask, token_type_ids, perm_mask, target_mapping)
        hidden = g if g is not None else h  # (B, P, C) or (B, T, C)
        logits = self.lm_head(hidden)  # (B, P, V) or (B, T, V)
        loss = None
        if labels is not None:
            _check_labels("labels", labels, tuple(logits.shape[:2]))
            loss = token_loss(logits, labels, loss_reduction)
        return ModelOutput(logits=logits, loss=loss, hidden_states=hidden)


class XLNetClassifier(Model):
    """XLNet for sequence classification: summary = tanh(W h_last + b), then a linear layer.

    h_last is the last real token's content stream (XLNet puts [CLS] last and pads on the left,
    where that is column T - 1, the column transformers' "last" summary reads).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.arch != "xlnet":
            raise ValueError(f"config.arch: XLNetClassifier needs 'xlnet', got {config.arch!r}")
        self.config = config
        self.body = XLNetModel(config)
        self.summary = nn.Linear(config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.resid_dropout)
        self.classifier = nn.Linear(config.d_model, config.num_labels)
        _init_xlnet(self, config)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,  # (B,) class ids, or floats when num_labels == 1
        loss_reduction: str = "mean",
    ) -> ModelOutput:
        h, _ = self.body(input_ids, attention_mask, token_type_ids)  # (B, T, C)
        summary = self.dropout(torch.tanh(self.summary(last_token(h, attention_mask))))  # (B, C)
        logits = self.classifier(summary)  # (B, num_labels)
        loss = None
        if labels is not None:
            _check_labels("labels", labels, (input_ids.shape[0],))
            if self.config.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float(), reduction=loss_reduction)
            else:
                loss = token_loss(logits, labels, loss_reduction)
        return ModelOutput(logits=logits, loss=loss, hidden_states=h)
