"""Hugging Face checkpoints in and out: `from_hf` loads GPT-2, BERT, T5 and XLNet, `to_hf` hands a model back.

    model = from_hf(GPT2LMHeadModel(...))        # a transformers model object
    model = from_hf("path/to/bert-checkpoint")   # config.json + model.safetensors or pytorch_model.bin
    hf = to_hf(model, out_dir="exported")        # a transformers object, plus a directory that
                                                 # AutoModel*.from_pretrained can read

What maps to what
    HF architecture                   minillm model                  task name
    GPT2LMHeadModel, GPT2Model        CausalLM (head tied to wte)    "causal-lm"
    BertForPreTraining                MaskedLM(nsp=True)             "mlm-nsp"
    BertForMaskedLM                   MaskedLM(nsp=False)            "mlm"
    BertForSequenceClassification     SequenceClassifier             "classification"
    BertModel                         Encoder (the bare body)        "encoder"
    T5ForConditionalGeneration        Seq2SeqLM                      "seq2seq"
    XLNetLMHeadModel                  XLNetLM                        "permutation-lm"
    XLNetForSequenceClassification    XLNetClassifier                "classification"

    XLNet's names and the rest of its rules: section 7 below (its own functions, xlnet_from_hf /
    xlnet_to_hf, which from_hf and to_hf call for model_type "xlnet").

    GPT-2 (HF body under transformer., ours under decoder.)
        wte, wpe                        embeddings.token, embeddings.position
        h.i.ln_1, h.i.ln_2              blocks.i.attn_norm, blocks.i.mlp_norm
        h.i.attn.c_attn (q|k|v packed)  blocks.i.attn.q_proj, k_proj, v_proj
        h.i.attn.c_proj                 blocks.i.attn.out_proj
        h.i.mlp.c_fc, h.i.mlp.c_proj    blocks.i.mlp.fc_in, blocks.i.mlp.fc_out
        ln_f                            final_norm
        lm_head (tied to wte)           lm_head (outside the body)

    BERT (HF body under bert., ours under encoder. / body. / nothing for a bare Encoder)
        embeddings.word_/position_/token_type_embeddings   embeddings.token / position / token_type
        embeddings.LayerNorm                               embeddings.norm
        encoder.layer.i.attention.self.query/key/value     blocks.i.attn.q_proj / k_proj / v_proj
        encoder.layer.i.attention.output.dense, LayerNorm  blocks.i.attn.out_proj, blocks.i.attn_norm
        encoder.layer.i.intermediate.dense                 blocks.i.mlp.fc_in
        encoder.layer.i.output.dense, LayerNorm            blocks.i.mlp.fc_out, blocks.i.mlp_norm
        pooler.dense                                       pooler.dense (outside the body)
        cls.predictions.transform.dense, LayerNorm         mlm_head.dense, mlm_head.norm
        cls.predictions.bias (the MLM head's own bias)     mlm_head.bias
        cls.predictions.decoder (tied to word embeddings)  mlm_head.decoder
        cls.seq_relationship                               nsp_head
        classifier                                         classifier

    T5 (no prefix; ours under encoder. / decoder.)
        shared (= encoder./decoder.embed_tokens)           encoder.embeddings.token (one table for both)
        {encoder,decoder}.block.0.layer.0.SelfAttention.relative_attention_bias   {encoder,decoder}.relative_bias.table
        *.block.i.layer.0.SelfAttention.q/k/v/o, layer_norm   blocks.i.attn.q/k/v/out_proj, blocks.i.attn_norm
        decoder.block.i.layer.1.EncDecAttention.q/k/v/o, layer_norm   blocks.i.cross_attn.*, blocks.i.cross_norm
        *.block.i.layer.-1.DenseReluDense.wi, wo (ReLU)      blocks.i.mlp.fc_in, fc_out
        *.block.i.layer.-1.DenseReluDense.wi_0, wi_1, wo     blocks.i.mlp.fc_gate, fc_in, fc_out (gated GELU)
        *.block.i.layer.-1.layer_norm, *.final_layer_norm    blocks.i.mlp_norm, final_norm
        lm_head (tied to shared, or its own matrix)          lm_head

The traps
    * GPT-2's linear layers are `Conv1D`: weight stored (in, out), the transpose of nn.Linear's
      (out, in). Every GPT-2 matrix is transposed on the way in and on the way out.
    * `c_attn` packs query, key and value into one (C, 3C) matrix: split it in three (in, out) order.
    * GPT-2 checkpoints may carry `attn.bias` / `attn.masked_bias`: causal-mask buffers, not
      weights. BERT checkpoints may carry `embeddings.position_ids` / `token_type_ids` buffers.
      They are skipped by name; nothing else is.
    * GPT-2 uses the tanh GELU ("gelu_new"); BERT the exact GELU. BERT is post-norm with eps 1e-12.
    * BERT's MLM decoder is tied to the word embeddings but has its own bias,
      `cls.predictions.bias` (also visible as the alias `cls.predictions.decoder.bias`).
    * Tied copies (`lm_head.weight`, `cls.predictions.decoder.*`) are consumed only after checking
      that they equal what they are tied to.
    * An untied BERT MLM head (tie_word_embeddings=False) in transformers 5 unties the bias too: the
      forward adds `cls.predictions.decoder.bias` and never reads `cls.predictions.bias`. The bias
      HF uses is loaded; the unused one is dropped (and written as a copy on export).
    * T5's `tie_word_embeddings` changed meaning: in transformers 4, False meant "own lm_head matrix,
      no d_model^-0.5 scaling" (v1.1); transformers 5 always ties the head to `shared` and keeps the
      scaling as `scale_decoder_outputs`. A config that names scale_decoder_outputs is read the new
      way; one that does not (an older config.json) the old way, its lm_head read from the weights.
    * Old T5 checkpoints carry `decoder.block.0.layer.1.EncDecAttention.relative_attention_bias`, which
      transformers never reads (cross-attention has no position bias); it is skipped by name.

Strictness: every minillm parameter is filled, every HF weight is consumed, every shape is checked.
Anything left over or missing is a ValueError that names the keys, so a silent mismatch cannot
happen. The deliberate exceptions: the unused untied MLM bias above, and task "encoder" (the
default for `BertModel`): asking for the bare body means dropping heads, so weights under
`pooler.`, `cls.` and `classifier.` are discarded there and only there.

Not supported
    * T5: feed_forward_proj other than "relu" / "gated-gelu", other T5 heads (T5EncoderModel,
      T5ForSequenceClassification...), and on export an untied lm_head (transformers 5 cannot hold one).
    * XLNet's segment recurrence (mems), attn_type="uni", bi_data, clamp_len, same_length, and
      sequence summaries other than "last" with a tanh projection; `minillm export` of an XLNet.
    * Other model families (GPT2ForSequenceClassification among them: its `score` layer has no
      bias, ours does), sharded `pytorch_model.bin` checkpoints, BERT as a decoder or with cross
      attention, BERT position_embedding_type other than "absolute", GPT-2's
      scale_attn_by_inverse_layer_idx, scale_attn_weights=False, activations other than
      gelu / gelu_new / gelu_pytorch_tanh / relu. Each is a ValueError naming the HF field.
    * `to_hf` exports only what GPT-2/BERT can express: learned positions, LayerNorm with biases,
      multi-head attention (no GQA), no SwiGLU; GPT-2 pre-norm without token types, BERT post-norm
      with token types and one dropout for embeddings and residuals. Anything else is a ValueError
      naming the minillm config field. A bare Encoder is not exported (HF's BertModel would add a
      randomly initialised pooler).
    * The minillm model is built in the default dtype (fp32); half-precision weights are upcast.

One behaviour differs by design: minillm's default position ids count real tokens only (padding
invariance), while HF's forward numbers columns 0..T-1. Right padding (BERT's convention) gives
identical outputs at real positions; a left-padded forward pass does not. Generation agrees, since
HF's `generate` derives GPT-2's positions from the attention mask just as minillm does.

transformers is not needed to read a directory: config.json is parsed here and the weights are read
with safetensors or `torch.load(weights_only=True)`, which never runs pickled code. It is imported
only by `to_hf`, to build the transformers object.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from minillm.config import ModelConfig
from minillm.model import CausalLM, Encoder, MaskedLM, Seq2SeqLM, SequenceClassifier
from minillm.tasks import build_model

# =============================================================================================
# 1. What we support: architectures, tasks, activations
# =============================================================================================

ARCHITECTURE_TASKS = {
    "GPT2LMHeadModel": "causal-lm",
    "GPT2Model": "causal-lm",
    "BertForPreTraining": "mlm-nsp",
    "BertForMaskedLM": "mlm",
    "BertModel": "encoder",
    "BertForSequenceClassification": "classification",
    "T5ForConditionalGeneration": "seq2seq",
}
FAMILY_TASKS = {"gpt2": ("causal-lm",), "bert": ("mlm-nsp", "mlm", "classification", "encoder")}
FAMILY_TASKS["t5"] = ("seq2seq",)
BASE_PREFIX = {"gpt2": "transformer.", "bert": "bert."}  # where HF puts the body inside a task model
BASE_PREFIX["t5"] = ""  # T5's encoder., decoder. and shared. sit at the top of the state dict
HEAD_PREFIXES = {"gpt2": ("lm_head.",), "bert": ("cls.", "classifier.")}
HEAD_PREFIXES["t5"] = ("lm_head.",)
BODY_NAME = {  # where each minillm task model keeps its body
    "causal-lm": "decoder.", "mlm": "encoder.", "mlm-nsp": "encoder.", "classification": "body.", "encoder": "",
}
BODY_NAME["seq2seq"] = ""  # two bodies, encoder. and decoder.: the T5 rules name them
HEADS = {  # the modules each loading target has beside its body; "encoder", the bare body, has none
    "causal-lm": ("lm_head",), "mlm": ("mlm_head",), "mlm-nsp": ("pooler", "mlm_head", "nsp_head"),
    "classification": ("pooler", "classifier"), "encoder": (),
}
HEADS["seq2seq"] = ("lm_head",)

HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
TO_HF_ACTIVATION = {
    "gpt2": {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"},
    "bert": {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"},
}

# Runtime settings a caller may change while loading: none of them changes a weight's shape or meaning.
RUNTIME_FIELDS = ("attn_backend", "norm_backend", "embed_dropout", "attn_dropout", "resid_dropout", "ff_dropout",
                  "final_dropout")

# HF class defaults, for config.json files that leave fields out (older exports do).
GPT2_DEFAULTS = {
    "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
    "activation_function": "gelu_new", "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1,
    "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False, "tie_word_embeddings": True,
    "bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": None,
}
BERT_DEFAULTS = {
    "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 2,
    "initializer_range": 0.02, "layer_norm_eps": 1e-12, "position_embedding_type": "absolute",
    "is_decoder": False, "add_cross_attention": False, "classifier_dropout": None, "tie_word_embeddings": True,
    "pad_token_id": 0, "bos_token_id": None, "eos_token_id": None,
}
T5_DEFAULTS = {
    "vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6, "num_decoder_layers": None,
    "num_heads": 8, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
    "dropout_rate": 0.1, "layer_norm_epsilon": 1e-6, "initializer_factor": 1.0, "feed_forward_proj": "relu",
    "is_encoder_decoder": True, "is_decoder": False, "tie_word_embeddings": True, "scale_decoder_outputs": None,
    "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
}


# =============================================================================================
# 2. Reading a source: a transformers object or a directory -> (config dict, state dict, architecture)
# =============================================================================================


def _read_source(source) -> tuple[dict, dict[str, torch.Tensor], str | None]:
    if isinstance(source, (str, Path)):
        return _read_directory(Path(source))
    if hasattr(source, "config") and hasattr(source, "state_dict"):  # duck-typed transformers model
        return source.config.to_dict(), dict(source.state_dict()), type(source).__name__
    raise TypeError(f"source: expected a transformers model or a directory path, got {type(source).__name__}")


def _read_directory(directory: Path) -> tuple[dict, dict[str, torch.Tensor], str | None]:
    if not directory.is_dir():
        raise FileNotFoundError(f"source: {directory} is not a directory")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"source: {config_path} not found; a Hugging Face checkpoint directory needs config.json"
        )
    hf_config = json.loads(config_path.read_text())
    architectures = hf_config.get("architectures") or [None]
    if len(architectures) != 1:
        raise ValueError(f"{config_path}: 'architectures' lists {architectures}; expected exactly one")
    return hf_config, _read_weights(directory), architectures[0]


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (directory / "model.safetensors").is_file():
        return load_file(directory / "model.safetensors")
    index = directory / "model.safetensors.index.json"
    if index.is_file():  # sharded: the index maps each weight name to its shard file
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(directory / shard).items()}
    if (directory / "pytorch_model.bin").is_file():
        # weights_only=True unpickles tensors and plain containers only: no code from the file runs.
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"source: no weights in {directory}; expected model.safetensors, model.safetensors.index.json "
        f"or pytorch_model.bin"
    )


def _family(hf_config: dict, architecture: str | None) -> str:
    model_type = hf_config.get("model_type")
    if model_type in FAMILY_TASKS:
        if architecture is not None and architecture not in ARCHITECTURE_TASKS:
            raise ValueError(
                f"architectures: {architecture!r} is not supported; supported are {sorted(ARCHITECTURE_TASKS)}"
            )
        return model_type
    raise ValueError(f"model_type: got {model_type!r}, supported are {sorted(FAMILY_TASKS)} (GPT-2, BERT and T5)")


def _choose_task(family: str, architecture: str | None, task: str | None) -> str:
    if task is None:
        if architecture is None:
            raise ValueError(
                "architectures: config.json names no architecture; pass task= one of " f"{FAMILY_TASKS[family]}"
            )
        task = ARCHITECTURE_TASKS[architecture]
    if task not in FAMILY_TASKS[family]:
        raise ValueError(f"task: got {task!r}; a {family} checkpoint loads as one of {FAMILY_TASKS[family]}")
    return task


# =============================================================================================
# 3. Configs: HF config dict <-> ModelConfig
# =============================================================================================


def _activation(hf: dict, field: str) -> str:
    name = hf[field]
    if name not in HF_ACTIVATIONS:
        raise ValueError(f"{field}: got {name!r}, supported are {sorted(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


def _require(hf: dict, field: str, expected) -> None:
    if hf[field] != expected:
        raise ValueError(f"{field}: got {hf[field]!r}; minillm supports only {expected!r}")


def _special_ids(hf: dict) -> dict[str, int]:
    """minillm needs every special id to be an int; HF leaves some None (GPT-2 has no pad, BERT no
    bos/eos). A missing pad falls back to eos (GPT-2 practice), a missing bos/eos to the pad id."""
    pad = hf["pad_token_id"] if hf["pad_token_id"] is not None else hf["eos_token_id"]
    pad = 0 if pad is None else pad
    bos = hf["bos_token_id"] if hf["bos_token_id"] is not None else pad
    eos = hf["eos_token_id"] if hf["eos_token_id"] is not None else pad
    return {"pad_token_id": pad, "bos_token_id": bos, "eos_token_id": eos}


def _gpt2_config(hf: dict, task: str) -> ModelConfig:
    _require(hf, "add_cross_attention", False)
    _require(hf, "scale_attn_weights", True)
    _require(hf, "scale_attn_by_inverse_layer_idx", False)
    # reorder_and_upcast_attn only changes the precision of fp16 attention, not the math: accepted.
    return ModelConfig(
        arch="decoder", vocab_size=hf["vocab_size"], d_model=hf["n_embd"], n_layers=hf["n_layer"],
        n_heads=hf["n_head"], d_ff=hf["n_inner"] or 4 * hf["n_embd"], max_seq_len=hf["n_positions"],
        pos_encoding="learned", norm="layernorm", norm_placement="pre", norm_eps=hf["layer_norm_epsilon"],
        activation=_activation(hf, "activation_function"), embed_dropout=hf["embd_pdrop"],
        attn_dropout=hf["attn_pdrop"], resid_dropout=hf["resid_pdrop"],
        tie_embeddings=hf["tie_word_embeddings"], type_vocab_size=0, bias=True,
        init_std=hf["initializer_range"], **_special_ids(hf),
    )


def _bert_config(hf: dict, task: str) -> ModelConfig:
    _require(hf, "position_embedding_type", "absolute")
    _require(hf, "is_decoder", False)
    _require(hf, "add_cross_attention", False)
    if "classifier" in HEADS[task] and hf["classifier_dropout"] not in (None, hf["hidden_dropout_prob"]):
        raise ValueError(
            f"classifier_dropout: got {hf['classifier_dropout']}; minillm's classifier uses the residual "
            f"dropout, hidden_dropout_prob={hf['hidden_dropout_prob']}"
        )
    # HF keeps the class count in id2label; num_labels is derived from it and often absent from config.json.
    num_labels = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)
    return ModelConfig(
        arch="encoder", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], d_ff=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
        pos_encoding="learned", norm="layernorm", norm_placement="post", norm_eps=hf["layer_norm_eps"],
        activation=_activation(hf, "hidden_act"), embed_dropout=hf["hidden_dropout_prob"],
        attn_dropout=hf["attention_probs_dropout_prob"], resid_dropout=hf["hidden_dropout_prob"],
        tie_embeddings=hf["tie_word_embeddings"], type_vocab_size=hf["type_vocab_size"], bias=True,
        init_std=hf["initializer_range"], num_labels=num_labels, **_special_ids(hf),
    )


# T5 (Raffel et al., 2020) ------------------------------------------------------------------

T5_FEED_FORWARD = {"relu": "relu", "gated-gelu": "gated_gelu_tanh"}  # HF's gated-gelu is gelu_new, the tanh GELU
T5_MAX_SEQ_LEN = 512  # T5 has no position table; minillm's length check needs a bound: T5's training length


def _t5_config(hf: dict, task: str) -> ModelConfig:
    if hf["feed_forward_proj"] not in T5_FEED_FORWARD:
        raise ValueError(f"feed_forward_proj: got {hf['feed_forward_proj']!r}, supported are {sorted(T5_FEED_FORWARD)}")
    _require(hf, "is_encoder_decoder", True)
    _require(hf, "is_decoder", False)
    eos = hf["eos_token_id"]
    if not isinstance(eos, int):
        raise ValueError(f"eos_token_id: got {eos!r}; minillm stops generation on one id")
    tied = hf["tie_word_embeddings"]
    # transformers 5 names the scaling; in an older config, tie_word_embeddings=False meant "no scaling" (v1.1).
    scaled = tied if hf["scale_decoder_outputs"] is None else hf["scale_decoder_outputs"]
    dropout = hf["dropout_rate"]
    return ModelConfig(
        arch="encoder-decoder", vocab_size=hf["vocab_size"], d_model=hf["d_model"], n_layers=hf["num_layers"],
        n_decoder_layers=hf["num_decoder_layers"] or hf["num_layers"], n_heads=hf["num_heads"], d_head=hf["d_kv"],
        d_ff=hf["d_ff"], max_seq_len=T5_MAX_SEQ_LEN, pos_encoding="relative",
        relative_buckets=hf["relative_attention_num_buckets"],
        relative_max_distance=hf["relative_attention_max_distance"], norm="rmsnorm", norm_placement="pre",
        norm_eps=hf["layer_norm_epsilon"], activation=T5_FEED_FORWARD[hf["feed_forward_proj"]], bias=False,
        attn_scale=1.0, embed_dropout=dropout, attn_dropout=dropout, resid_dropout=dropout, ff_dropout=dropout,
        final_dropout=dropout, tie_embeddings=tied, scale_decoder_output=scaled,
        pad_token_id=hf["pad_token_id"],  # initializer_factor: T5's own init scheme, not needed to load weights
        bos_token_id=hf["decoder_start_token_id"], eos_token_id=eos,  # minillm's decoder starts with bos
    )


def _t5_config_to_hf(config: ModelConfig, architecture: str) -> dict:
    """T5's config.json for an exportable minillm Seq2SeqLM (see _check_t5_exportable)."""
    _check_t5_exportable(config)
    return {
        "model_type": "t5", "architectures": [architecture], "vocab_size": config.vocab_size,
        "d_model": config.d_model, "d_kv": config.head_dim, "d_ff": config.ff_dim, "num_layers": config.n_layers,
        "num_decoder_layers": config.decoder_layers, "num_heads": config.n_heads,
        "relative_attention_num_buckets": config.relative_buckets,
        "relative_attention_max_distance": config.relative_max_distance, "dropout_rate": config.resid_dropout,
        "layer_norm_epsilon": config.norm_eps,
        "feed_forward_proj": {v: k for k, v in T5_FEED_FORWARD.items()}[config.activation],
        "is_encoder_decoder": True, "tie_word_embeddings": True, "scale_decoder_outputs": config.scale_decoder_output,
        "pad_token_id": config.pad_token_id, "eos_token_id": config.eos_token_id,
        "decoder_start_token_id": config.bos_token_id,
    }


def _check_t5_exportable(config: ModelConfig) -> None:
    """Raise ValueError naming the first config field that transformers' T5 cannot express."""
    dropout = config.resid_dropout
    requirements = [  # (field, exportable, what T5 needs)
        ("arch", config.arch == "encoder-decoder", "'encoder-decoder'"),
        ("pos_encoding", config.pos_encoding == "relative", "'relative' (T5's only positions)"),
        ("norm", config.norm == "rmsnorm", "'rmsnorm' (T5's norm has no mean and no bias)"),
        ("norm_placement", config.norm_placement == "pre", "'pre'"),
        ("bias", not config.bias, "False (no T5 layer has a bias)"),
        ("activation", config.activation in T5_FEED_FORWARD.values(), f"one of {sorted(T5_FEED_FORWARD.values())}"),
        ("attn_scale", config.attn_scale == 1.0, "1.0 (T5 does not scale Q K^T)"),
        ("n_kv_heads", config.kv_heads == config.n_heads, f"None or n_heads={config.n_heads} (no GQA)"),
        ("type_vocab_size", config.type_vocab_size == 0, "0 (T5 has no segment embeddings)"),
        ("tie_embeddings", config.tie_embeddings,
         "True (transformers 5 ties T5's lm_head to the shared table whatever tie_word_embeddings says)"),
    ]
    requirements += [(name, getattr(config, name) == dropout, f"resid_dropout={dropout} (T5 has one dropout_rate)")
                     for name in ("embed_dropout", "attn_dropout", "ff_dropout", "final_dropout")]
    for field, ok, allowed in requirements:
        if not ok:
            raise ValueError(f"config.{field}: got {getattr(config, field)!r}; a T5 checkpoint needs {allowed}")


def _t5_rules(config: ModelConfig) -> tuple[list[Rule], dict[str, str]]:
    """Rules and tied aliases (alias -> key it must equal) of T5ForConditionalGeneration."""
    rules = [Rule(("encoder.embeddings.token.weight",), "shared.weight")]  # the decoder's is the same module
    aliases = {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}
    gated = config.activation == "gated_gelu_tanh"
    for stack, n_layers in (("encoder", config.n_layers), ("decoder", config.decoder_layers)):
        rules.append(Rule((f"{stack}.relative_bias.table.weight",),
                          f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"))
        for i in range(n_layers):
            ours, theirs = f"{stack}.blocks.{i}.", f"{stack}.block.{i}.layer."
            sublayers = [("attn", "attn_norm", "0.SelfAttention")]
            if stack == "decoder":
                sublayers.append(("cross_attn", "cross_norm", "1.EncDecAttention"))
            for attn, norm, hf_attn in sublayers:
                rules += [Rule((f"{ours}{attn}.{p}_proj.weight",), f"{theirs}{hf_attn}.{p}.weight") for p in "qkv"]
                rules.append(Rule((f"{ours}{attn}.out_proj.weight",), f"{theirs}{hf_attn}.o.weight"))
                rules.append(Rule((f"{ours}{norm}.weight",), f"{theirs}{hf_attn.split('.')[0]}.layer_norm.weight"))
            ff = f"{theirs}{len(sublayers)}."  # the feed-forward layer comes after the attention layers
            mlp = (("fc_gate", "wi_0"), ("fc_in", "wi_1"), ("fc_out", "wo")) if gated else (("fc_in", "wi"), ("fc_out", "wo"))
            rules += [Rule((f"{ours}mlp.{name}.weight",), f"{ff}DenseReluDense.{hf}.weight") for name, hf in mlp]
            rules.append(Rule((f"{ours}mlp_norm.weight",), f"{ff}layer_norm.weight"))
        rules.append(Rule((f"{stack}.final_norm.weight",), f"{stack}.final_layer_norm.weight"))
    if config.tie_embeddings:
        aliases["lm_head.weight"] = "shared.weight"
    else:
        rules.append(Rule(("lm_head.weight",), "lm_head.weight"))
    return rules, aliases


# ---------------------------------------------------------------------------------------------


def config_from_hf(hf_config: dict, task: str, **overrides) -> ModelConfig:
    """The ModelConfig equivalent to a Hugging Face config dict (as in config.json)."""
    family = hf_config.get("model_type")
    defaults = {"gpt2": GPT2_DEFAULTS, "bert": BERT_DEFAULTS, "t5": T5_DEFAULTS}[family]
    hf = {**defaults, **{k: v for k, v in hf_config.items() if k in defaults or k in ("id2label", "num_labels")}}
    config = {"gpt2": _gpt2_config, "bert": _bert_config, "t5": _t5_config}[family](hf, task)
    unknown = sorted(set(overrides) - set(RUNTIME_FIELDS))
    if unknown:
        raise ValueError(f"from_hf: cannot override {unknown}; only runtime fields {RUNTIME_FIELDS} may be changed")
    return dataclasses.replace(config, **overrides)


HF_NAMES = {"gpt2": "GPT-2", "bert": "BERT"}
EXPORT_HINTS = {  # why transformers cannot take a model with that setting
    "pos_encoding": "transformers' GPT-2 and BERT add a learned absolute position table to the embeddings "
                    "and have no rotary or sinusoidal positions",
    "norm": "GPT-2 and BERT use LayerNorm with a bias",
    "bias": "every GPT-2/BERT linear layer and norm has a bias",
    "n_kv_heads": "GPT-2 and BERT have one key/value head per query head",
    "activation": "GPT-2 and BERT have a plain MLP (no gated SwiGLU)",
}


def _check_exportable(config: ModelConfig, family: str) -> None:
    """Raise ValueError naming the first config field that GPT-2/BERT cannot express, why, and the
    setting that can be exported."""
    placement = "pre" if family == "gpt2" else "post"
    activation = "gelu_tanh" if family == "gpt2" else "gelu"
    requirements = [  # (field, exportable, what the checkpoint needs, the setting to train with)
        ("pos_encoding", config.pos_encoding == "learned", "'learned'", "learned"),
        ("norm", config.norm == "layernorm", "'layernorm'", "layernorm"),
        ("norm_placement", config.norm_placement == placement, repr(placement), placement),
        ("activation", config.activation in TO_HF_ACTIVATION[family], str(sorted(TO_HF_ACTIVATION[family])), activation),
        ("bias", config.bias, "True", "true"),
        ("n_kv_heads", config.kv_heads == config.n_heads, f"None or n_heads={config.n_heads} (no GQA)", "none"),
        ("classifier_pooling", config.classifier_pooling == "auto",
         "'auto' (transformers pools [CLS] for BERT and the last token for GPT-2)", "auto"),
        # T5's settings, which GPT-2 and BERT have no field for.
        ("attn_scale", config.attn_scale is None, "None (GPT-2 and BERT scale Q K^T by 1/sqrt(D))", "none"),
        ("d_head", config.d_head in (None, config.d_model // config.n_heads),
         f"None or d_model / n_heads = {config.d_model // config.n_heads}", "none"),
        ("ff_dropout", config.ff_dropout == 0.0, "0.0 (no dropout inside the MLP)", "0"),
        ("final_dropout", config.final_dropout == 0.0, "0.0 (no dropout after the final norm)", "0"),
    ]
    if family == "gpt2":
        requirements.append(("type_vocab_size", config.type_vocab_size == 0, "0 (GPT-2 has no segment embeddings)", "0"))
    else:
        requirements.append(("type_vocab_size", config.type_vocab_size >= 1, ">= 1 (BERT always has segments)", "2"))
        requirements.append(
            ("embed_dropout", config.embed_dropout == config.resid_dropout,
             f"resid_dropout={config.resid_dropout} (BERT's hidden_dropout_prob covers both)", str(config.resid_dropout))
        )
    for field, ok, allowed, setting in requirements:
        if not ok:
            why = EXPORT_HINTS.get(field, f"transformers' {HF_NAMES[family]} has no other")
            raise ValueError(
                f"config.{field}: got {getattr(config, field)!r}; a {family} checkpoint needs {allowed} "
                f"({why}). Train with --model.{field}={setting} to export"
            )


def config_to_hf(config: ModelConfig, family: str, architecture: str) -> dict:
    """The Hugging Face config dict (config.json contents) for an exportable ModelConfig."""
    if family == "t5":
        return _t5_config_to_hf(config, architecture)
    _check_exportable(config, family)
    ids = {name: getattr(config, name) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}
    common = {"model_type": family, "architectures": [architecture], "vocab_size": config.vocab_size,
              "initializer_range": config.init_std, "tie_word_embeddings": config.tie_embeddings, **ids}
    if family == "gpt2":
        return {
            **common, "n_positions": config.max_seq_len, "n_embd": config.d_model, "n_layer": config.n_layers,
            "n_head": config.n_heads, "n_inner": config.ff_dim,
            "activation_function": TO_HF_ACTIVATION["gpt2"][config.activation],
            "resid_pdrop": config.resid_dropout, "embd_pdrop": config.embed_dropout, "attn_pdrop": config.attn_dropout,
            "layer_norm_epsilon": config.norm_eps,
        }
    hf = {
        **common, "hidden_size": config.d_model, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "intermediate_size": config.ff_dim,
        "hidden_act": TO_HF_ACTIVATION["bert"][config.activation], "hidden_dropout_prob": config.resid_dropout,
        "attention_probs_dropout_prob": config.attn_dropout, "max_position_embeddings": config.max_seq_len,
        "type_vocab_size": config.type_vocab_size, "layer_norm_eps": config.norm_eps,
    }
    if architecture == "BertForSequenceClassification":
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
    return hf


# =============================================================================================
# 4. Weight names: one rule per HF tensor
# =============================================================================================


@dataclass(frozen=True)
class Rule:
    """One HF tensor and the minillm parameter(s) it becomes."""

    ours: tuple[str, ...]  # minillm names; several = the HF tensor is their concatenation (packed qkv)
    theirs: str  # HF state-dict key
    conv1d: bool = False  # GPT-2 Conv1D weight, stored (in, out): transpose to nn.Linear's (out, in)


def _linear(ours: str, theirs: str, conv1d: bool = False) -> list[Rule]:
    return [Rule((f"{ours}.weight",), f"{theirs}.weight", conv1d), Rule((f"{ours}.bias",), f"{theirs}.bias")]


def _gpt2_rules(config: ModelConfig, body: str) -> tuple[list[Rule], dict[str, str]]:
    """Rules, and tied HF aliases (alias key -> key it must equal)."""
    t = "transformer."
    rules = [Rule((f"{body}embeddings.token.weight",), f"{t}wte.weight"),
             Rule((f"{body}embeddings.position.weight",), f"{t}wpe.weight")]
    for i in range(config.n_layers):
        ours, theirs = f"{body}blocks.{i}.", f"{t}h.{i}."
        qkv = tuple(f"{ours}attn.{p}_proj" for p in "qkv")
        rules += _linear(f"{ours}attn_norm", f"{theirs}ln_1")
        rules += [Rule(tuple(f"{n}.weight" for n in qkv), f"{theirs}attn.c_attn.weight", conv1d=True),
                  Rule(tuple(f"{n}.bias" for n in qkv), f"{theirs}attn.c_attn.bias")]
        rules += _linear(f"{ours}attn.out_proj", f"{theirs}attn.c_proj", conv1d=True)
        rules += _linear(f"{ours}mlp_norm", f"{theirs}ln_2")
        rules += _linear(f"{ours}mlp.fc_in", f"{theirs}mlp.c_fc", conv1d=True)
        rules += _linear(f"{ours}mlp.fc_out", f"{theirs}mlp.c_proj", conv1d=True)
    rules += _linear(f"{body}final_norm", f"{t}ln_f")
    if config.tie_embeddings:
        return rules, {"lm_head.weight": f"{t}wte.weight"}
    return rules + [Rule(("lm_head.weight",), "lm_head.weight")], {}


def _bert_rules(config: ModelConfig, body: str, task: str) -> tuple[list[Rule], dict[str, str], dict[str, str]]:
    b = "bert."
    rules = [Rule((f"{body}embeddings.token.weight",), f"{b}embeddings.word_embeddings.weight"),
             Rule((f"{body}embeddings.position.weight",), f"{b}embeddings.position_embeddings.weight"),
             Rule((f"{body}embeddings.token_type.weight",), f"{b}embeddings.token_type_embeddings.weight")]
    rules += _linear(f"{body}embeddings.norm", f"{b}embeddings.LayerNorm")
    for i in range(config.n_layers):
        ours, theirs = f"{body}blocks.{i}.", f"{b}encoder.layer.{i}."
        for p, name in zip("qkv", ("query", "key", "value")):
            rules += _linear(f"{ours}attn.{p}_proj", f"{theirs}attention.self.{name}")
        rules += _linear(f"{ours}attn.out_proj", f"{theirs}attention.output.dense")
        rules += _linear(f"{ours}attn_norm", f"{theirs}attention.output.LayerNorm")  # post-norm: after the add
        rules += _linear(f"{ours}mlp.fc_in", f"{theirs}intermediate.dense")
        rules += _linear(f"{ours}mlp.fc_out", f"{theirs}output.dense")
        rules += _linear(f"{ours}mlp_norm", f"{theirs}output.LayerNorm")
    aliases, unused, heads = {}, {}, HEADS[task]
    if "pooler" in heads:
        rules += _linear("pooler.dense", f"{b}pooler.dense")
    if "mlm_head" in heads:
        rules += _linear("mlm_head.dense", "cls.predictions.transform.dense")
        rules += _linear("mlm_head.norm", "cls.predictions.transform.LayerNorm")
        if config.tie_embeddings:
            rules.append(Rule(("mlm_head.bias",), "cls.predictions.bias"))
            aliases["cls.predictions.decoder.bias"] = "cls.predictions.bias"  # HF ties the decoder's bias to it
            aliases["cls.predictions.decoder.weight"] = f"{b}embeddings.word_embeddings.weight"
        else:
            # With tie_word_embeddings=False, transformers 5 unties the bias as well: its forward adds
            # cls.predictions.decoder.bias and never reads cls.predictions.bias.
            rules.append(Rule(("mlm_head.bias",), "cls.predictions.decoder.bias"))
            rules.append(Rule(("mlm_head.decoder.weight",), "cls.predictions.decoder.weight"))
            unused["cls.predictions.bias"] = "cls.predictions.decoder.bias"
    if "nsp_head" in heads:
        rules += _linear("nsp_head", "cls.seq_relationship")
    if "classifier" in heads:
        rules += _linear("classifier", "classifier")
    return rules, aliases, unused


def _rules(family: str, config: ModelConfig, task: str) -> tuple[list[Rule], dict[str, str], dict[str, str]]:
    """Rules; tied aliases (HF key -> the key it must equal); and HF parameters that HF's own forward
    never reads (HF key -> the key whose value they get on export)."""
    if family == "gpt2":
        return (*_gpt2_rules(config, BODY_NAME[task]), {})
    if family == "t5":
        return (*_t5_rules(config), {})
    return _bert_rules(config, BODY_NAME[task], task)


def _is_buffer(key: str) -> bool:
    """Non-weight tensors some checkpoints carry: GPT-2's causal-mask buffers, BERT's id buffers, and
    old T5 checkpoints' cross-attention bias table, which transformers never reads."""
    return key.endswith((".attn.bias", ".attn.masked_bias", "embeddings.position_ids", "embeddings.token_type_ids",
                         ".EncDecAttention.relative_attention_bias.weight"))


def _canonical_keys(state: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Put every key in the form a task model uses: body under `transformer.`/`bert.` (a bare
    GPT2Model/BertModel has no prefix), LayerNorm `gamma`/`beta` (old TF exports) as weight/bias."""
    prefix, out = BASE_PREFIX[family], {}
    for key, value in state.items():
        if _is_buffer(key):
            continue
        if not key.startswith(prefix) and not key.startswith(HEAD_PREFIXES[family]):
            key = prefix + key
        if ".LayerNorm." in key:
            key = key.replace(".LayerNorm.gamma", ".LayerNorm.weight").replace(".LayerNorm.beta", ".LayerNorm.bias")
        out[key] = value
    return out


# =============================================================================================
# 5. from_hf
# =============================================================================================


def _build(config: ModelConfig, task: str) -> nn.Module:
    return build_model(config, task) if HEADS[task] else Encoder(config)  # no head: the bare body


def _is_xlnet_source(source) -> bool:
    """Whether `source` (a transformers object or a directory) holds an XLNet: see section 7."""
    if isinstance(source, (str, Path)):
        config_path = Path(source) / "config.json"
        return config_path.is_file() and json.loads(config_path.read_text()).get("model_type") == "xlnet"
    return getattr(getattr(source, "config", None), "model_type", None) == "xlnet"


def from_hf(source, task: str | None = None, **overrides) -> nn.Module:
    """The minillm model equivalent to a Hugging Face GPT-2, BERT or T5 model.

    source: a transformers model object, or a directory with config.json and model.safetensors
        (or model.safetensors.index.json + shards, or pytorch_model.bin).
    task: None = from the architecture (see the module docstring); or one of "causal-lm",
        "mlm", "mlm-nsp", "classification", "encoder" to load the checkpoint as that model ("seq2seq" for T5).
    overrides: runtime fields only (attn_backend, norm_backend, dropouts), e.g. attn_backend="reference".

    Returns a CausalLM, MaskedLM, SequenceClassifier, Seq2SeqLM or (task "encoder") the bare Encoder, in eval mode.
    """
    if _is_xlnet_source(source):
        return xlnet_from_hf(source, task, **overrides)
    hf_config, state, architecture = _read_source(source)
    family = _family(hf_config, architecture)
    task = _choose_task(family, architecture, task)
    config = config_from_hf(hf_config, task, **overrides)
    state = _canonical_keys(state, family)
    rules, aliases, unused = _rules(family, config, task)
    for key, used in unused.items():
        if used not in state and key in state:  # transformers 4 kept one shared tensor under either name
            state[used] = state.pop(key)
        state.pop(key, None)

    ours: dict[str, torch.Tensor] = {}
    missing = [rule.theirs for rule in rules if rule.theirs not in state]
    if missing:
        raise ValueError(f"from_hf: the checkpoint lacks {len(missing)} weight(s) a {task} model needs: {missing}")
    for rule in rules:
        tensor = state.pop(rule.theirs)
        if rule.conv1d:
            tensor = tensor.t()  # (in, out) -> (out, in)
        for name, part in zip(rule.ours, tensor.chunk(len(rule.ours), dim=0)):  # packed q|k|v split in order
            ours[name] = part
    for alias, target in aliases.items():
        if alias in state:
            tensor = state.pop(alias)
            source_tensor = next(ours[r.ours[0]] for r in rules if r.theirs == target)
            if tensor.shape != source_tensor.shape or not torch.equal(tensor, source_tensor):
                raise ValueError(f"from_hf: {alias} should be tied to {target} but holds different values")
    if not HEADS[task]:  # the bare body was asked for: heads are dropped on purpose
        for key in [k for k in state if k.startswith(HEAD_PREFIXES[family] + (BASE_PREFIX[family] + "pooler.",))]:
            del state[key]
    if state:
        raise ValueError(
            f"from_hf: {len(state)} checkpoint weight(s) have no place in a minillm {task} model: {sorted(state)}"
        )

    model = _build(config, task)
    load_parameters(model, ours, context="from_hf")
    return model.eval()


def load_parameters(model: nn.Module, tensors: dict[str, torch.Tensor], context: str) -> None:
    """Copy `tensors` into the model's parameters; every parameter must be given, with its shape."""
    params = dict(model.named_parameters())  # tied parameters appear once, under their first name
    unfilled = sorted(set(params) - set(tensors))
    extra = sorted(set(tensors) - set(params))
    if unfilled or extra:
        raise ValueError(f"{context}: parameters not filled: {unfilled}; names the model does not have: {extra}")
    with torch.no_grad():
        for name, param in params.items():
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise ValueError(
                    f"{context}: {name} expects shape {tuple(param.shape)}, "
                    f"the checkpoint gives {tuple(tensors[name].shape)}"
                )
            param.copy_(tensors[name])


# =============================================================================================
# 6. to_hf: the same rules, run backwards
# =============================================================================================


def _export_target(model: nn.Module) -> tuple[str, str, str]:
    """(family, HF architecture, task) for a minillm model."""
    if isinstance(model, CausalLM):
        return "gpt2", "GPT2LMHeadModel", "causal-lm"
    if isinstance(model, MaskedLM):
        if model.nsp_head is not None:
            return "bert", "BertForPreTraining", "mlm-nsp"
        return "bert", "BertForMaskedLM", "mlm"
    if isinstance(model, SequenceClassifier):
        if model.config.arch != "encoder":
            raise ValueError(
                f"config.arch: to_hf exports an 'encoder' SequenceClassifier (BERT), got {model.config.arch!r}"
            )
        return "bert", "BertForSequenceClassification", "classification"
    if isinstance(model, Seq2SeqLM):
        return "t5", "T5ForConditionalGeneration", "seq2seq"
    raise TypeError(
        "model: to_hf exports CausalLM (GPT-2), MaskedLM and encoder SequenceClassifier (BERT), Seq2SeqLM (T5); "
        f"got {type(model).__name__}"
    )


def hf_config_of(model: nn.Module) -> dict:
    """The HF config dict (config.json) of a minillm model, without touching its weights; the
    ValueError/TypeError naming what transformers cannot express otherwise."""
    family, architecture, _ = _export_target(model)
    return config_to_hf(model.config, family, architecture)


def hf_state_dict(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """(HF config dict, HF state dict without tied copies, tied aliases) for a minillm model."""
    family, _, task = _export_target(model)
    hf_config = hf_config_of(model)
    rules, aliases, unused = _rules(family, model.config, task)
    params = dict(model.named_parameters())
    state = {}
    for rule in rules:
        tensor = torch.cat([params[name].detach() for name in rule.ours], dim=0)  # q|k|v packed back
        state[rule.theirs] = (tensor.t() if rule.conv1d else tensor).contiguous()
    for key, used in unused.items():  # HF expects them; giving them the used value keeps both readings right
        state[key] = state[used].clone()
    return hf_config, state, aliases


def save_hf(model: nn.Module, out_dir: str | Path) -> Path:
    """Write config.json and model.safetensors that `transformers.AutoModel*.from_pretrained` reads.
    Needs no transformers. Tied copies are left out, as `save_pretrained` does."""
    from safetensors.torch import save_file

    hf_config, state, _ = hf_state_dict(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    save_file({k: v.to("cpu").clone() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return out


def to_hf(model: nn.Module, out_dir: str | Path | None = None):
    """The transformers model equivalent to a minillm model (GPT2LMHeadModel, BertForPreTraining,
    BertForMaskedLM, BertForSequenceClassification or T5ForConditionalGeneration), in the same train/eval mode. With out_dir,
    also write a checkpoint directory (see `save_hf`)."""
    import transformers

    if getattr(getattr(model, "config", None), "arch", None) == "xlnet":
        return xlnet_to_hf(model, out_dir)
    hf_config, state, aliases = hf_state_dict(model)
    config_cls = {"gpt2": transformers.GPT2Config, "bert": transformers.BertConfig,
                  "t5": transformers.T5Config}[hf_config["model_type"]]
    fields = {k: v for k, v in hf_config.items() if k not in ("model_type", "architectures")}
    hf_model = getattr(transformers, hf_config["architectures"][0])(config_cls(**fields))
    full = {**state, **{alias: state[target] for alias, target in aliases.items()}}
    hf_model.load_state_dict(full, strict=True)  # strict: every HF weight is given, nothing extra
    if out_dir is not None:
        save_hf(model, out_dir)
    return hf_model.train(model.training)


# =============================================================================================
# 7. XLNet: XLNetLMHeadModel and XLNetForSequenceClassification
# =============================================================================================
#
#   HF (body under transformer.)             minillm (body under body.)
#   word_embedding, mask_emb (1, 1, C)        embeddings, mask_emb (C,)
#   layer.i.rel_attn.q / k / v / r (C, H, D)  blocks.i.attn.q_proj / k_proj / v_proj / r_proj, (H D, C)
#   layer.i.rel_attn.o (C, H, D)              blocks.i.attn.out_proj, (C, H D)
#   layer.i.rel_attn.r_w_bias / r_r_bias / r_s_bias / seg_embed, layer_norm   the same names; norm
#   layer.i.ff.layer_1 / layer_2 / layer_norm blocks.i.mlp.fc_in / fc_out, blocks.i.mlp_norm
#   lm_loss (weight tied to word_embedding)   lm_head (its bias is its own)
#   sequence_summary.summary, logits_proj     summary, classifier
#
# Read but without effect on one forward pass, so accepted: mem_len, reuse_len, use_mems_eval /
# use_mems_train (the memory handed to a *next* call, which minillm does not offer). XLNet has no
# position table, hence no length limit; the model gets max_seq_len=512 (its pretraining length),
# which `max_seq_len=` changes.

XLNET_ARCHITECTURES = {"XLNetLMHeadModel": "permutation-lm", "XLNetForSequenceClassification": "classification"}
XLNET_DEFAULTS = {
    "vocab_size": 32000, "d_model": 1024, "n_layer": 24, "n_head": 16, "d_inner": 4096, "d_head": 64,
    "ff_activation": "gelu", "attn_type": "bi", "initializer_range": 0.02, "layer_norm_eps": 1e-12, "dropout": 0.1,
    "bi_data": False, "clamp_len": -1, "same_length": False, "summary_type": "last", "summary_use_proj": True,
    "summary_activation": "tanh", "summary_last_dropout": 0.1, "summary_first_dropout": 0.0,
    "summary_proj_to_labels": False, "tie_word_embeddings": True, "pad_token_id": 5, "bos_token_id": 1,
    "eos_token_id": 2,
}
XLNET_MAX_SEQ_LEN = 512


def _xlnet_config(hf_config: dict, task: str, **overrides) -> ModelConfig:
    hf = {**XLNET_DEFAULTS, **{k: v for k, v in hf_config.items() if k in XLNET_DEFAULTS or k in ("id2label", "num_labels")}}
    _require(hf, "attn_type", "bi")
    _require(hf, "bi_data", False)
    _require(hf, "same_length", False)
    if hf["clamp_len"] > 0:
        raise ValueError(f"clamp_len: got {hf['clamp_len']}; minillm supports only -1 (no clamping of distances)")
    if hf["d_head"] * hf["n_head"] != hf["d_model"]:
        raise ValueError(f"d_head: got {hf['d_head']}; minillm needs d_model / n_head = {hf['d_model'] // hf['n_head']}")
    if task == "classification":
        _require(hf, "summary_type", "last")
        _require(hf, "summary_use_proj", True)
        _require(hf, "summary_activation", "tanh")
        _require(hf, "summary_proj_to_labels", False)
        _require(hf, "summary_first_dropout", 0.0)
        if hf["summary_last_dropout"] != hf["dropout"]:
            raise ValueError(f"summary_last_dropout: got {hf['summary_last_dropout']}; minillm's summary uses the "
                             f"residual dropout, dropout={hf['dropout']}")
    num_labels = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)
    unknown = sorted(set(overrides) - set(RUNTIME_FIELDS) - {"max_seq_len"})
    if unknown:
        raise ValueError(f"from_hf: cannot override {unknown}; only runtime fields {RUNTIME_FIELDS} and "
                         f"max_seq_len may be changed")
    config = ModelConfig(
        arch="xlnet", vocab_size=hf["vocab_size"], d_model=hf["d_model"], n_layers=hf["n_layer"], n_heads=hf["n_head"],
        d_ff=hf["d_inner"], max_seq_len=XLNET_MAX_SEQ_LEN, pos_encoding="sinusoidal", norm="layernorm",
        norm_placement="post", norm_eps=hf["layer_norm_eps"], activation=_activation(hf, "ff_activation"),
        embed_dropout=hf["dropout"], attn_dropout=hf["dropout"], resid_dropout=hf["dropout"],
        tie_embeddings=hf["tie_word_embeddings"], type_vocab_size=2, bias=True, init_std=hf["initializer_range"],
        num_labels=num_labels, **_special_ids(hf),
    )
    return dataclasses.replace(config, **overrides)


def _xlnet_rules(config: ModelConfig, task: str) -> list[tuple[str, str, str]]:
    """(minillm name, HF key, how the tensor changes): "same", "proj" (HF (C, H, D) -> (H D, C)),
    "out" (HF (C, H, D) -> (C, H D)) or "row" (HF (1, 1, C) -> (C,))."""
    t = "transformer."
    rules = [("body.embeddings.weight", f"{t}word_embedding.weight", "same"), ("body.mask_emb", f"{t}mask_emb", "row")]
    for i in range(config.n_layers):
        ours, theirs = f"body.blocks.{i}.", f"{t}layer.{i}."
        rules += [(f"{ours}attn.{p}_proj.weight", f"{theirs}rel_attn.{p}", "proj") for p in "qkvr"]
        rules.append((f"{ours}attn.out_proj.weight", f"{theirs}rel_attn.o", "out"))
        rules += [(f"{ours}attn.{name}", f"{theirs}rel_attn.{name}", "same")
                  for name in ("r_w_bias", "r_r_bias", "r_s_bias", "seg_embed")]
        for ours_name, theirs_name in (("attn.norm", "rel_attn.layer_norm"), ("mlp.fc_in", "ff.layer_1"),
                                       ("mlp.fc_out", "ff.layer_2"), ("mlp_norm", "ff.layer_norm")):
            rules += [(f"{ours}{ours_name}.{p}", f"{theirs}{theirs_name}.{p}", "same") for p in ("weight", "bias")]
    if task == "permutation-lm":
        rules.append(("lm_head.bias", "lm_loss.bias", "same"))
        if not config.tie_embeddings:
            rules.append(("lm_head.weight", "lm_loss.weight", "same"))
    else:
        rules += [(f"{ours}.{p}", f"{theirs}.{p}", "same") for ours, theirs in
                  (("summary", "sequence_summary.summary"), ("classifier", "logits_proj")) for p in ("weight", "bias")]
    return rules


def _xlnet_to_ours(tensor: torch.Tensor, how: str) -> torch.Tensor:
    if how == "proj":  # x W: (C, H, D) as (C, H D), transposed to nn.Linear's (out, in)
        return tensor.reshape(tensor.shape[0], -1).t()
    if how == "out":  # attn_vec (H D) -> C: already (out, in) once flattened
        return tensor.reshape(tensor.shape[0], -1)
    return tensor.reshape(-1) if how == "row" else tensor


def _xlnet_to_theirs(tensor: torch.Tensor, how: str, config: ModelConfig) -> torch.Tensor:
    H, D = config.n_heads, config.head_dim
    if how == "proj":
        return tensor.t().reshape(-1, H, D)
    if how == "out":
        return tensor.reshape(-1, H, D)
    return tensor.reshape(1, 1, -1) if how == "row" else tensor


def xlnet_from_hf(source, task: str | None = None, **overrides) -> nn.Module:
    """The minillm XLNetLM (task "permutation-lm") or XLNetClassifier ("classification") equal to a
    transformers XLNetLMHeadModel or XLNetForSequenceClassification (object or directory), in eval
    mode. overrides: runtime fields and max_seq_len. `from_hf` calls this for model_type "xlnet"."""
    from minillm.model import XLNetClassifier, XLNetLM

    hf_config, state, architecture = _read_source(source)
    if hf_config.get("model_type") != "xlnet":
        raise ValueError(f"model_type: got {hf_config.get('model_type')!r}, expected 'xlnet'")
    if task is None:
        if architecture not in XLNET_ARCHITECTURES:
            raise ValueError(f"architectures: got {architecture!r}; supported XLNet architectures are "
                             f"{sorted(XLNET_ARCHITECTURES)} (or pass task= 'permutation-lm' / 'classification')")
        task = XLNET_ARCHITECTURES[architecture]
    if task not in XLNET_ARCHITECTURES.values():
        raise ValueError(f"task: got {task!r}; an xlnet checkpoint loads as one of {tuple(XLNET_ARCHITECTURES.values())}")
    config = _xlnet_config(hf_config, task, **overrides)
    rules = _xlnet_rules(config, task)
    missing = [theirs for _, theirs, _ in rules if theirs not in state]
    if missing:
        raise ValueError(f"from_hf: the checkpoint lacks {len(missing)} weight(s) an XLNet {task} model needs: {missing}")
    ours = {name: _xlnet_to_ours(state.pop(theirs), how) for name, theirs, how in rules}
    if task == "permutation-lm" and config.tie_embeddings and "lm_loss.weight" in state:
        tied = state.pop("lm_loss.weight")
        if not torch.equal(tied, ours["body.embeddings.weight"]):
            raise ValueError("from_hf: lm_loss.weight should be tied to transformer.word_embedding.weight but holds "
                             "different values")
    if state:
        raise ValueError(f"from_hf: {len(state)} checkpoint weight(s) have no place in a minillm XLNet {task} model: "
                         f"{sorted(state)}")
    model = (XLNetLM if task == "permutation-lm" else XLNetClassifier)(config)
    load_parameters(model, ours, context="from_hf")
    return model.eval()


def xlnet_config_to_hf(config: ModelConfig, architecture: str) -> dict:
    """The XLNetConfig fields (config.json) for an XLNet ModelConfig; ValueError naming a field
    transformers' XLNet cannot express."""
    if config.activation not in TO_HF_ACTIVATION["bert"]:
        raise ValueError(f"config.activation: got {config.activation!r}; XLNet needs one of "
                         f"{sorted(TO_HF_ACTIVATION['bert'])}")
    for name in ("embed_dropout", "attn_dropout"):
        if getattr(config, name) != config.resid_dropout:
            raise ValueError(f"config.{name}: got {getattr(config, name)}; transformers' XLNet has one dropout for "
                             f"all, so it must equal resid_dropout={config.resid_dropout}")
    hf = {
        "model_type": "xlnet", "architectures": [architecture], "vocab_size": config.vocab_size,
        "d_model": config.d_model, "n_layer": config.n_layers, "n_head": config.n_heads, "d_head": config.head_dim,
        "d_inner": config.ff_dim, "ff_activation": TO_HF_ACTIVATION["bert"][config.activation],
        "layer_norm_eps": config.norm_eps, "dropout": config.resid_dropout, "summary_last_dropout": config.resid_dropout,
        "initializer_range": config.init_std, "tie_word_embeddings": config.tie_embeddings, "mem_len": None,
        "attn_type": "bi", "bi_data": False, "clamp_len": -1, "same_length": False, "summary_type": "last",
        "summary_use_proj": True, "summary_activation": "tanh",
        **{name: getattr(config, name) for name in ("pad_token_id", "bos_token_id", "eos_token_id")},
    }
    if architecture == "XLNetForSequenceClassification":
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
    return hf


def xlnet_hf_state_dict(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """(HF config dict, HF state dict with the tied lm_loss.weight included) for an XLNet model."""
    from minillm.model import XLNetLM

    task = "permutation-lm" if isinstance(model, XLNetLM) else "classification"
    architecture = {v: k for k, v in XLNET_ARCHITECTURES.items()}[task]
    hf_config = xlnet_config_to_hf(model.config, architecture)
    params = dict(model.named_parameters())
    state = {theirs: _xlnet_to_theirs(params[ours].detach(), how, model.config).contiguous()
             for ours, theirs, how in _xlnet_rules(model.config, task)}
    if task == "permutation-lm" and model.config.tie_embeddings:
        state["lm_loss.weight"] = state["transformer.word_embedding.weight"]
    return hf_config, state


def xlnet_to_hf(model: nn.Module, out_dir: str | Path | None = None):
    """The transformers XLNetLMHeadModel or XLNetForSequenceClassification equal to a minillm
    XLNetLM or XLNetClassifier, in the same train/eval mode; with out_dir, also written there
    (config.json and model.safetensors, without the tied copy). `to_hf` calls this for XLNet models."""
    import transformers

    hf_config, state = xlnet_hf_state_dict(model)
    fields = {k: v for k, v in hf_config.items() if k not in ("model_type", "architectures")}
    hf_model = getattr(transformers, hf_config["architectures"][0])(transformers.XLNetConfig(**fields))
    hf_model.load_state_dict(state, strict=True)
    if out_dir is not None:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        untied = {k: v.to("cpu").clone() for k, v in state.items()
                  if not (k == "lm_loss.weight" and model.config.tie_embeddings)}
        save_file(untied, out / "model.safetensors", metadata={"format": "pt"})
    return hf_model.train(model.training)
