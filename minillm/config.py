"""Model configuration: one typed dataclass, validated on construction, and named presets.

Every architecture minillm builds (BERT-style encoder, GPT-style decoder, the original
encoder-decoder Transformer) is described by a single `ModelConfig`. A variant is a field value,
never a new class: `ModelConfig(norm="rmsnorm", activation="swiglu", pos_encoding="rope")` is a
Llama-flavoured GPT.

Presets are plain functions returning a `ModelConfig`; `preset(name, **overrides)` looks one up.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass

ARCHITECTURES = ("encoder", "decoder", "encoder-decoder", "xlnet")
POS_ENCODINGS = ("learned", "sinusoidal", "rope", "relative")
NORMS = ("layernorm", "rmsnorm")
NORM_PLACEMENTS = ("pre", "post")
ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu", "relu", "gated_gelu_tanh")
ATTENTION_BACKENDS = ("auto", "reference", "sdpa", "triton")
NORM_BACKENDS = ("auto", "torch", "triton")
CLASSIFIER_POOLINGS = ("auto", "cls", "last", "mean")


def check_field_types(config) -> None:
    """Raise TypeError naming the field whose value does not match its annotation.

    Configs arrive from TOML files and command lines, so a wrong type ("4" for an int) must be
    caught at construction, not three layers deep inside a forward pass. Handles the annotation
    forms our configs use: int, float, bool, str, `X | None`, `list[X]`, `tuple[X, ...]`.
    """
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if not _matches(value, hints[field.name]):
            raise TypeError(
                f"{type(config).__name__}.{field.name}: expected {_type_name(hints[field.name])}, "
                f"got {value!r} ({type(value).__name__})"
            )


def _matches(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if origin in (list, tuple):
        (item, *_) = typing.get_args(annotation) or (typing.Any,)
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    if annotation is typing.Any:
        return True
    if annotation is type(None):
        return value is None
    if annotation is float:  # an int is a fine float (TOML writes `lr = 1` happily)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def config_from_dict(cls, values: dict):
    """Build the dataclass `cls` from a plain dict (a TOML table, a saved config.json).

    Unknown keys are a ValueError naming them, so a typo never silently falls back to a default.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields are {sorted(known)}")
    return cls(**values)


def _check_choice(config, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(config, name)
    if value not in allowed:
        raise ValueError(f"{type(config).__name__}.{name}: got {value!r}, expected one of {allowed}")


def _check_range(config, name: str, low: float, high: float, *, high_inclusive: bool = True) -> None:
    value = getattr(config, name)
    ok = low <= value <= high if high_inclusive else low <= value < high
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{type(config).__name__}.{name}: got {value}, expected a value in [{low}, {high}{bracket}")


@dataclass
class ModelConfig:
    """Everything that defines a minillm Transformer. Field names follow common usage."""

    arch: str = "decoder"
    """"encoder" (BERT), "decoder" (GPT), "encoder-decoder" (the original Transformer) or "xlnet"
    (XLNet: relative positions and two-stream attention; see `_check_xlnet` for what it fixes)."""
    vocab_size: int = 8192
    """Number of token ids; must match the tokenizer."""
    d_model: int = 128
    """Model width C: size of every token's hidden vector."""
    n_layers: int = 4
    """Number of blocks (the encoder's, for encoder-decoder)."""
    n_heads: int = 4
    """Number of query heads H; must divide d_model (head dim D = d_model / n_heads)."""
    n_kv_heads: int | None = None
    """Key/value heads. None = n_heads (multi-head); 1 = multi-query; in between = grouped-query."""
    d_ff: int | None = None
    """Feed-forward hidden width. None = 4 * d_model (GPT-2/BERT practice)."""
    max_seq_len: int = 256
    """Longest sequence the model accepts (size of the learned position table)."""
    pos_encoding: str = "learned"
    """"learned" (GPT-2/BERT), "sinusoidal" (Vaswani et al.), "rope" (rotary, Su et al.) or "relative"
    (T5: a learned bias per head and bucketed distance, added to the attention scores)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm: str = "layernorm"
    """"layernorm" or "rmsnorm"."""
    norm_placement: str = "pre"
    """"pre" (GPT-2: norm inside the residual branch, final norm at the end) or "post" (BERT/original:
    norm after each residual add, plus a norm on the embeddings)."""
    norm_eps: float = 1e-5
    """Epsilon inside the norm's square root. BERT uses 1e-12, GPT-2 1e-5."""
    activation: str = "gelu"
    """MLP non-linearity: "gelu" (exact, BERT), "gelu_tanh" (GPT-2), "swiglu" (gated, Llama), "relu"
    (the original Transformer, T5 v1.0), "gated_gelu_tanh" (gated like SwiGLU with a tanh-GELU gate: T5 v1.1)."""
    embed_dropout: float = 0.0
    """Dropout on the summed embeddings."""
    attn_dropout: float = 0.0
    """Dropout on the attention probabilities."""
    resid_dropout: float = 0.0
    """Dropout on each residual branch (attention output, MLP output) and in the heads."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the output projection (Press & Wolf, 2017)."""
    type_vocab_size: int = 0
    """Token-type (segment) vocabulary; 2 for BERT's sentence A/B, 0 for none."""
    bias: bool = True
    """Biases in linear layers and norms (GPT-2/BERT have them; many modern models do not)."""
    attn_backend: str = "auto"
    """How attention runs: "reference" (explicit math), "sdpa" (PyTorch), "triton" (our kernel), "auto"."""
    norm_backend: str = "auto"
    """How norms run: "torch", "triton" (our kernel), "auto" (Triton on CUDA, torch elsewhere)."""
    n_decoder_layers: int | None = None
    """Decoder blocks for encoder-decoder; None = n_layers."""
    num_labels: int = 2
    """Classes for sequence classification (1 = regression with MSE loss)."""
    classifier_pooling: str = "auto"
    """What a sequence classifier reads: "cls" (BERT: the pooled first token), "last" (GPT: the last
    real token), "mean" (the mean over real tokens), or "auto" (cls for encoders, last for decoders)."""
    pad_token_id: int = 0
    """Padding id; labels use -100 for ignored positions, never this id."""
    bos_token_id: int = 5
    """Beginning-of-sequence id; also the decoder start token of encoder-decoder models."""
    eos_token_id: int = 6
    """End-of-sequence id; generation stops on it."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation (GPT-2/BERT)."""

    # T5's pieces (Raffel et al., 2020). Each is one setting; the defaults leave other models unchanged.
    relative_buckets: int = 32
    """pos_encoding="relative": number of distance buckets, one learned bias per bucket and head. The
    encoder splits them between keys before and after the query; the causal decoder uses all for the past."""
    relative_max_distance: int = 128
    """pos_encoding="relative": distances >= this share the last bucket; below it, half the buckets are
    exact distances and half grow logarithmically, so near words are told apart and far ones are not."""
    d_head: int | None = None
    """Head dim D. None = d_model / n_heads; T5 v1.1 sets it apart (d_kv), so H * D may differ from d_model."""
    attn_scale: float | None = None
    """Multiplier of the scores Q K^T. None = 1 / sqrt(D) (Vaswani et al.); T5 uses 1.0, having folded
    1 / sqrt(D) into the initialisation of W_q instead."""
    ff_dropout: float = 0.0
    """Dropout on the MLP's hidden activations, before W_out (T5 applies its dropout_rate there too)."""
    final_dropout: float = 0.0
    """Dropout on each stack's output, after the final norm (T5)."""
    scale_decoder_output: bool = False
    """Encoder-decoder: multiply the decoder's output by d_model^-0.5 before the LM head. T5 v1.0 does,
    because its head is the shared embedding table, whose entries are N(0, 1) rather than N(0, 1/C)."""

    def __post_init__(self) -> None:
        check_field_types(self)
        _check_choice(self, "arch", ARCHITECTURES)
        _check_choice(self, "pos_encoding", POS_ENCODINGS)
        _check_choice(self, "norm", NORMS)
        _check_choice(self, "norm_placement", NORM_PLACEMENTS)
        _check_choice(self, "activation", ACTIVATIONS)
        _check_choice(self, "attn_backend", ATTENTION_BACKENDS)
        _check_choice(self, "norm_backend", NORM_BACKENDS)
        _check_choice(self, "classifier_pooling", CLASSIFIER_POOLINGS)
        wrong_end = {"decoder": "cls", "encoder": "last"}.get(self.arch)
        if self.classifier_pooling == wrong_end:
            raise ValueError(
                f"ModelConfig.classifier_pooling: {wrong_end!r} does not suit arch={self.arch!r} (a decoder's first "
                f"token has seen only itself; an encoder has no privileged last token); use 'auto' or 'mean'"
            )
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "num_labels"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name}: got {getattr(self, name)}, expected an integer >= 1")
        for name in ("n_kv_heads", "d_ff", "n_decoder_layers", "d_head"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name}: got {getattr(self, name)}, expected None or an integer >= 1")
        if self.d_head is None and self.d_model % self.n_heads != 0:
            raise ValueError(
                f"ModelConfig.n_heads: got {self.n_heads}, which does not divide d_model={self.d_model}"
            )
        if self.n_heads % self.kv_heads != 0:
            raise ValueError(
                f"ModelConfig.n_kv_heads: got {self.n_kv_heads}, which does not divide n_heads={self.n_heads}"
            )
        if self.pos_encoding == "rope" and self.head_dim % 2 != 0:
            raise ValueError(f"ModelConfig.pos_encoding: rope needs an even head dim, got {self.head_dim}")
        if self.pos_encoding == "sinusoidal" and self.d_model % 2 != 0:
            raise ValueError(f"ModelConfig.pos_encoding: sinusoidal needs an even d_model, got {self.d_model}")
        for name in ("embed_dropout", "attn_dropout", "resid_dropout", "ff_dropout", "final_dropout"):
            _check_range(self, name, 0.0, 1.0, high_inclusive=False)
        if self.type_vocab_size < 0:
            raise ValueError(f"ModelConfig.type_vocab_size: got {self.type_vocab_size}, expected >= 0")
        if not (self.norm_eps > 0 and math.isfinite(self.norm_eps)):
            raise ValueError(f"ModelConfig.norm_eps: got {self.norm_eps}, expected a small positive number")
        if not self.init_std > 0:
            raise ValueError(f"ModelConfig.init_std: got {self.init_std}, expected > 0")
        self._check_t5_fields()
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(
                    f"ModelConfig.{name}: got {getattr(self, name)}, expected an id in [0, vocab_size={self.vocab_size})"
                )
        if self.arch == "xlnet":
            _check_xlnet(self)

    def _check_t5_fields(self) -> None:
        # The encoder's half of the buckets must hold >= 1 exact and >= 1 logarithmic bucket, and the
        # logarithmic range log(max_distance / exact) must be positive (exact = relative_buckets // 2 at most).
        if self.relative_buckets < 4:
            raise ValueError(f"ModelConfig.relative_buckets: got {self.relative_buckets}, expected an integer >= 4")
        if self.relative_max_distance <= self.relative_buckets // 2:
            raise ValueError(
                f"ModelConfig.relative_max_distance: got {self.relative_max_distance}, expected more than "
                f"relative_buckets // 2 = {self.relative_buckets // 2} (the exact buckets)"
            )
        if self.attn_scale is not None and not (self.attn_scale > 0 and math.isfinite(self.attn_scale)):
            raise ValueError(f"ModelConfig.attn_scale: got {self.attn_scale}, expected None or a positive number")
        if self.scale_decoder_output and self.arch != "encoder-decoder":
            raise ValueError(
                f"ModelConfig.scale_decoder_output: only an encoder-decoder's LM head reads it, got arch={self.arch!r}"
            )

    @property
    def head_dim(self) -> int:
        """D: width of one attention head."""
        return self.d_model // self.n_heads if self.d_head is None else self.d_head

    @property
    def kv_heads(self) -> int:
        """Resolved number of key/value heads."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ff_dim(self) -> int:
        """Resolved feed-forward width."""
        return 4 * self.d_model if self.d_ff is None else self.d_ff

    @property
    def decoder_layers(self) -> int:
        """Resolved number of decoder blocks in an encoder-decoder."""
        return self.n_layers if self.n_decoder_layers is None else self.n_decoder_layers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        """Build from a plain dict (a TOML table, a saved config); unknown keys are an error."""
        return config_from_dict(cls, values)


XLNET_FIXED = {  # field: (the value XLNet's layout needs, why)
    "pos_encoding": ("sinusoidal", "XLNet's positions are sinusoids of the relative distance i - j"),
    "norm": ("layernorm", "XLNet normalises with LayerNorm"),
    "norm_placement": ("post", "XLNet is post-norm, as BERT"),
    "bias": (True, "XLNet's norms and MLP have biases (its attention projections never do)"),
    "type_vocab_size": (2, "XLNet's segment encoding is relative: one vector for 'same segment', one for 'other'"),
}


def _check_xlnet(config: ModelConfig) -> None:
    """XLNet is one layout: refuse the fields that would describe another, naming them."""
    for name, (needed, why) in XLNET_FIXED.items():
        if getattr(config, name) != needed:
            raise ValueError(f"ModelConfig.{name}: arch='xlnet' needs {needed!r} ({why}), got {getattr(config, name)!r}")
    if config.kv_heads != config.n_heads:
        raise ValueError(f"ModelConfig.n_kv_heads: arch='xlnet' needs one key/value head per query head, "
                         f"got {config.n_kv_heads}")
    if config.activation == "swiglu":
        raise ValueError("ModelConfig.activation: arch='xlnet' has a plain MLP; got 'swiglu', expected gelu, "
                         "gelu_tanh or relu")
    if config.classifier_pooling not in ("auto", "last"):
        raise ValueError(f"ModelConfig.classifier_pooling: arch='xlnet' summarises the last token (its [CLS] comes "
                         f"last); got {config.classifier_pooling!r}, expected 'auto' or 'last'")


# ---------------------------------------------------------------------------------------------
# Presets: plain functions. Vocabulary sizes are the original models'; the trainer replaces the
# vocabulary with its tokenizer's.
# ---------------------------------------------------------------------------------------------


def _bert(n_layers: int, d_model: int, n_heads: int) -> ModelConfig:
    return ModelConfig(
        arch="encoder", vocab_size=30522, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
        d_ff=4 * d_model, max_seq_len=512, pos_encoding="learned", norm="layernorm",
        norm_placement="post", norm_eps=1e-12, activation="gelu", embed_dropout=0.1,
        attn_dropout=0.1, resid_dropout=0.1, type_vocab_size=2, pad_token_id=0,
        bos_token_id=101, eos_token_id=102,  # [CLS] and [SEP] in BERT's WordPiece vocabulary
    )


def bert_tiny() -> ModelConfig:
    """BERT-Tiny (Turc et al., 2019): L=2, H=128, 2 heads. 4.4M parameters with its vocabulary."""
    return _bert(n_layers=2, d_model=128, n_heads=2)


def bert_mini() -> ModelConfig:
    """BERT-Mini: L=4, H=256, 4 heads."""
    return _bert(n_layers=4, d_model=256, n_heads=4)


def bert_base() -> ModelConfig:
    """BERT-Base (Devlin et al., 2019): L=12, H=768, 12 heads, 110M parameters."""
    return _bert(n_layers=12, d_model=768, n_heads=12)


def gpt2_124m() -> ModelConfig:
    """GPT-2 small (Radford et al., 2019): 12 layers, 768 wide, 12 heads, 124M parameters."""
    return ModelConfig(
        arch="decoder", vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072,
        max_seq_len=1024, pos_encoding="learned", norm="layernorm", norm_placement="pre",
        norm_eps=1e-5, activation="gelu_tanh", embed_dropout=0.1, attn_dropout=0.1,
        resid_dropout=0.1, tie_embeddings=True, pad_token_id=50256, bos_token_id=50256,
        eos_token_id=50256,
    )


def tiny() -> ModelConfig:
    """A GPT small enough to pretrain on 2 CPU cores in minutes: 4 layers, 128 wide, 4 heads."""
    return ModelConfig(
        arch="decoder", vocab_size=4096, d_model=128, n_layers=4, n_heads=4, max_seq_len=128,
        pos_encoding="learned", norm="layernorm", norm_placement="pre", activation="gelu_tanh",
        embed_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0,
    )


def tiny_bert() -> ModelConfig:
    """A BERT small enough to pretrain (MLM + NSP) on 2 CPU cores in minutes.

    BERT's layout (post-norm, GELU, learned absolute positions, segment embeddings), so that
    `minillm export` hands it to transformers as a BertForPreTraining, with no dropout, since such
    a run sees each token about twice. `pos_encoding="rope"` is one setting away; RoPE gives
    relative positions at once, which MLM uses early, but transformers' BERT cannot load it.
    """
    return ModelConfig(
        arch="encoder", vocab_size=4096, d_model=128, n_layers=4, n_heads=4, max_seq_len=128,
        pos_encoding="learned", norm="layernorm", norm_placement="post", norm_eps=1e-12,
        activation="gelu", type_vocab_size=2,
    )


def tiny_seq2seq() -> ModelConfig:
    """A small encoder-decoder (original Transformer layout, pre-LN for stable training)."""
    return ModelConfig(
        arch="encoder-decoder", vocab_size=4096, d_model=128, n_layers=3, n_heads=4, max_seq_len=128,
        pos_encoding="sinusoidal", norm="layernorm", norm_placement="pre", activation="relu",
        embed_dropout=0.1, attn_dropout=0.0, resid_dropout=0.1,
    )


def _t5(**fields) -> ModelConfig:
    """T5 v1.0's layout (Raffel et al., 2020): pre-norm RMSNorm without bias (eps 1e-6), no biases,
    ReLU MLP, relative position buckets, unscaled attention scores, and a head tied to the shared
    embedding table that reads the decoder's output scaled by d_model^-0.5. Ids as T5's
    SentencePiece vocabulary: pad 0 (also the decoder's start token), eos 1."""
    layout = dict(
        arch="encoder-decoder", pos_encoding="relative", relative_buckets=32, relative_max_distance=128,
        norm="rmsnorm", norm_placement="pre", norm_eps=1e-6, bias=False, activation="relu", attn_scale=1.0,
        tie_embeddings=True, scale_decoder_output=True, pad_token_id=0, bos_token_id=0, eos_token_id=1,
    )
    return ModelConfig(**{**layout, **fields})


def t5_small() -> ModelConfig:
    """T5-Small as transformers' t5-small: 6 + 6 layers, 512 wide, 8 heads of 64, d_ff 2048, dropout 0.1.
    T5 has no position table: max_seq_len 512 is the length it was trained on."""
    return _t5(vocab_size=32128, d_model=512, n_layers=6, n_decoder_layers=6, n_heads=8, d_head=64, d_ff=2048,
               max_seq_len=512, embed_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1, ff_dropout=0.1,
               final_dropout=0.1)


def tiny_t5() -> ModelConfig:
    """A T5 small enough to pretrain (span corruption) on 2 CPU cores in minutes: 3 + 3 layers, 128 wide.

    The tied head reads the decoder output unscaled (as transformers' T5 v1.1 with a tied table):
    minillm initialises embeddings N(0, 0.02^2), not T5's N(0, 1), so the C^-0.5 scaling would start
    every logit near 0.
    """
    return _t5(vocab_size=4096, d_model=128, n_layers=3, n_heads=4, d_ff=512, max_seq_len=128,
               scale_decoder_output=False)


def tiny_xlnet() -> ModelConfig:
    """An XLNet small enough to pretrain (permutation LM) on 2 CPU cores in minutes: the tiny BERT's
    sizes, XLNet's layout (relative sinusoidal positions, post-norm, GELU, relative segments)."""
    return ModelConfig(
        arch="xlnet", vocab_size=4096, d_model=128, n_layers=4, n_heads=4, max_seq_len=128,
        pos_encoding="sinusoidal", norm="layernorm", norm_placement="post", norm_eps=1e-12,
        activation="gelu", type_vocab_size=2,
    )


PRESETS = {
    "tiny": tiny,
    "tiny-bert": tiny_bert,
    "tiny-seq2seq": tiny_seq2seq,
    "tiny-xlnet": tiny_xlnet,
    "bert-tiny": bert_tiny,
    "bert-mini": bert_mini,
    "bert-base": bert_base,
    "gpt2-124m": gpt2_124m,
    "t5-small": t5_small,
    "tiny-t5": tiny_t5,
}


def preset(name: str, **overrides) -> ModelConfig:
    """Return the named preset, with any fields replaced by `overrides` (validated again)."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"preset: unknown name {name!r}; available presets are {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name](), **overrides)
