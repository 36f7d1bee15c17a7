"""minillm against Hugging Face transformers: same weights, same logits, same greedy tokens.

Every test builds a tiny random transformers model (awkward sizes: vocab 101, width 48, feed-forward
70), fills *every* tensor of its state dict with random values (norm weights and biases and BERT's
separate MLM bias included, so a swapped or forgotten tensor cannot hide behind an init of 0 or 1),
converts it with `minillm.convert`, and compares in fp32. HF attention runs in "eager" mode, the
plain softmax(QK^T)V, as the independent reference; minillm runs both its reference and SDPA paths.

Tolerance: 1e-4 max abs on logits, the issue's bar. Observed differences are ~1e-6 (fp32 rounding
of the same math in a different order).
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from minillm import build_model  # noqa: E402
from minillm.config import ModelConfig  # noqa: E402
from minillm.convert import config_from_hf, from_hf, save_hf, to_hf  # noqa: E402
from minillm.model import CausalLM, Encoder, MaskedLM, Seq2SeqLM, SequenceClassifier  # noqa: E402

TOL = 1e-4
VOCAB = 101


# ---------------------------------------------------------------------------------------------
# Tiny random transformers models
# ---------------------------------------------------------------------------------------------


def gpt2_config(**overrides):
    values = dict(vocab_size=VOCAB, n_positions=40, n_embd=48, n_layer=2, n_head=4, n_inner=70,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="eager")
    return transformers.GPT2Config(**{**values, **overrides})


def bert_config(**overrides):
    values = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=70, max_position_embeddings=40, type_vocab_size=2,
                  attn_implementation="eager")
    return transformers.BertConfig(**{**values, **overrides})


def randomize(hf_model, seed: int = 0):
    """Fill every floating tensor of the state dict: N(0, 0.1^2), norm weights around 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in hf_model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=gen) * 0.1
            is_norm_weight = ("ln_" in name or "LayerNorm" in name) and name.endswith("weight")
            tensor.copy_(1.0 + 2 * noise if is_norm_weight else noise)
    return hf_model.eval()


def make(cls, config, seed: int = 0):
    torch.manual_seed(seed)
    return randomize(cls(config), seed)


def right_padded_batch(batch: int = 3, T: int = 11, seed: int = 1):
    """Random ids and a mask whose rows have lengths T, T-4, 3 (1 = token, 0 = pad)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, T), generator=gen)
    lengths = torch.tensor([T, T - 4, 3][:batch])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def max_diff(ours, theirs, mask=None):
    if mask is not None:  # compare real positions only: padding rows may hold anything
        ours, theirs = ours[mask.bool()], theirs[mask.bool()]
    return (ours - theirs).abs().max().item()


# ---------------------------------------------------------------------------------------------
# GPT-2
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_gpt2_logits_match(backend):
    hf = make(transformers.GPT2LMHeadModel, gpt2_config())
    model = from_hf(hf, attn_backend=backend)
    assert isinstance(model, CausalLM) and model.config.activation == "gelu_tanh"
    ids, mask = right_padded_batch()
    with torch.no_grad():
        assert max_diff(model(ids).logits, hf(ids).logits) < TOL
        ours = model(ids, attention_mask=mask).logits
        theirs = hf(ids, attention_mask=mask).logits
    assert max_diff(ours, theirs, mask) < TOL


def test_gpt2_untied_head_and_bare_body():
    hf = make(transformers.GPT2LMHeadModel, gpt2_config(tie_word_embeddings=False))
    assert hf.lm_head.weight is not hf.transformer.wte.weight
    model = from_hf(hf)
    assert model.lm_head.weight is not model.decoder.embeddings.token.weight
    ids, _ = right_padded_batch()
    with torch.no_grad():
        assert max_diff(model(ids).logits, hf(ids).logits) < TOL

    # GPT2Model has no head: it becomes a CausalLM whose head is the (tied) token table.
    tied = make(transformers.GPT2LMHeadModel, gpt2_config())
    body = from_hf(tied.transformer)
    with torch.no_grad():
        assert max_diff(body(ids).logits, tied(ids).logits) < TOL


# ---------------------------------------------------------------------------------------------
# BERT
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_bert_pretraining_logits_match(backend):
    hf = make(transformers.BertForPreTraining, bert_config())
    model = from_hf(hf, attn_backend=backend)
    assert isinstance(model, MaskedLM) and model.nsp_head is not None
    assert model.config.norm_eps == 1e-12 and model.config.norm_placement == "post"
    ids, mask = right_padded_batch()
    token_types = (torch.arange(ids.shape[1])[None] >= 5).long().expand_as(ids) * mask  # sentence B from 5 on
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, token_type_ids=token_types)
        theirs = hf(ids, attention_mask=mask, token_type_ids=token_types)
    assert max_diff(ours.logits, theirs.prediction_logits, mask) < TOL
    assert max_diff(ours.nsp_logits, theirs.seq_relationship_logits) < TOL


def test_bert_masked_lm_and_bare_encoder():
    ids, mask = right_padded_batch()
    hf = make(transformers.BertForMaskedLM, bert_config(tie_word_embeddings=False))  # decoder has its own matrix
    model = from_hf(hf)
    assert isinstance(model, MaskedLM) and model.nsp_head is None
    assert model.mlm_head.decoder.weight is not model.encoder.embeddings.token.weight
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
        assert max_diff(model(ids, attention_mask=mask).logits, expected, mask) < TOL
        back = to_hf(model).eval()
        assert not back.config.tie_word_embeddings
        assert max_diff(back(ids, attention_mask=mask).logits, expected, mask) < TOL

    # BertModel loads as the bare Encoder; its pooler is dropped on purpose (documented choice).
    base = make(transformers.BertModel, bert_config())
    encoder = from_hf(base)
    assert isinstance(encoder, Encoder)
    with torch.no_grad():
        hidden, _ = encoder(ids, attention_mask=mask)
        assert max_diff(hidden, base(ids, attention_mask=mask).last_hidden_state, mask) < TOL


def test_bert_sequence_classification_logits_match():
    hf = make(transformers.BertForSequenceClassification, bert_config(num_labels=3))
    model = from_hf(hf, attn_backend="reference")
    assert isinstance(model, SequenceClassifier) and model.config.num_labels == 3
    ids, mask = right_padded_batch()
    token_types = (torch.arange(ids.shape[1])[None] >= 2).long().expand_as(ids) * mask
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, token_type_ids=token_types).logits
        theirs = hf(ids, attention_mask=mask, token_type_ids=token_types).logits
    assert ours.shape == (3, 3) and max_diff(ours, theirs) < TOL


# ---------------------------------------------------------------------------------------------
# Round trips: to_hf, directories (safetensors and pytorch_model.bin)
# ---------------------------------------------------------------------------------------------

CASES = {
    "gpt2": (transformers.GPT2LMHeadModel, gpt2_config, transformers.AutoModelForCausalLM, lambda o: o.logits),
    "bert-pretraining": (transformers.BertForPreTraining, bert_config, transformers.AutoModelForPreTraining,
                         lambda o: torch.cat((o.prediction_logits.flatten(), o.seq_relationship_logits.flatten()))),
    "bert-classification": (transformers.BertForSequenceClassification, lambda: bert_config(num_labels=3),
                            transformers.AutoModelForSequenceClassification, lambda o: o.logits),
}


def _hf_logits(hf, extract, ids):
    with torch.no_grad():
        return extract(hf(ids))


def _our_logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    if out.nsp_logits is not None:
        return torch.cat((out.logits.flatten(), out.nsp_logits.flatten()))
    return out.logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip(case, tmp_path):
    cls, config, auto_cls, extract = CASES[case]
    hf = make(cls, config())
    ids, _ = right_padded_batch()
    expected = _hf_logits(hf, extract, ids)

    model = from_hf(hf)
    back = to_hf(model).eval()
    assert type(back) is cls
    assert max_diff(_hf_logits(back, extract, ids), expected) < TOL

    to_hf(model, out_dir=tmp_path / "ours")  # our own config.json + model.safetensors
    reloaded = auto_cls.from_pretrained(tmp_path / "ours").eval()
    assert type(reloaded) is cls
    assert max_diff(_hf_logits(reloaded, extract, ids), expected) < TOL
    assert max_diff(_our_logits(from_hf(tmp_path / "ours"), ids), expected) < TOL

    hf.save_pretrained(tmp_path / "theirs")  # HF's safetensors (tied copies left out)
    assert max_diff(_our_logits(from_hf(tmp_path / "theirs"), ids), expected) < TOL

    bin_dir = tmp_path / "bin"  # the older format: a torch.save'd state dict, tied copies included
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text(json.dumps({**hf.config.to_dict(), "architectures": [cls.__name__]}))
    torch.save(hf.state_dict(), bin_dir / "pytorch_model.bin")
    assert max_diff(_our_logits(from_hf(bin_dir), ids), expected) < TOL


def test_directories_need_no_transformers(tmp_path, monkeypatch):
    """transformers is a test-only dependency: reading and writing directories must not import it."""
    import sys

    hf = make(transformers.BertForPreTraining, bert_config())
    hf.save_pretrained(tmp_path / "theirs")
    ids, _ = right_padded_batch()
    with torch.no_grad():
        expected = hf(ids).prediction_logits
    monkeypatch.setitem(sys.modules, "transformers", None)  # any `import transformers` now fails
    model = from_hf(tmp_path / "theirs")
    save_hf(model, tmp_path / "ours")
    with torch.no_grad():
        assert max_diff(from_hf(tmp_path / "ours")(ids).logits, expected) < TOL
    with pytest.raises(ImportError):
        to_hf(model)


def test_legacy_checkpoint_names_and_buffers(tmp_path):
    """Old GPT-2 exports carry attention-mask buffers and no `transformer.` prefix; old BERT exports
    name LayerNorm parameters gamma/beta. Both load; the buffers are skipped by name."""
    hf = make(transformers.GPT2LMHeadModel, gpt2_config())
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 40, 40))
    state["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({**hf.config.to_dict(), "architectures": ["GPT2Model"]}))
    torch.save(state, tmp_path / "gpt2" / "pytorch_model.bin")
    ids, _ = right_padded_batch()
    with torch.no_grad():
        assert max_diff(from_hf(tmp_path / "gpt2")(ids).logits, hf(ids).logits) < TOL

    bert = make(transformers.BertForMaskedLM, bert_config())
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in bert.state_dict().items()}
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(
        json.dumps({**bert.config.to_dict(), "architectures": ["BertForMaskedLM"]})
    )
    torch.save(state, tmp_path / "bert" / "pytorch_model.bin")
    with torch.no_grad():
        assert max_diff(from_hf(tmp_path / "bert")(ids).logits, bert(ids).logits) < TOL


# ---------------------------------------------------------------------------------------------
# Parameter counts: minillm built from the config alone (no conversion) against transformers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, config, task",
    [
        (transformers.GPT2LMHeadModel, gpt2_config, "causal-lm"),
        (transformers.GPT2LMHeadModel, lambda: gpt2_config(tie_word_embeddings=False), "causal-lm"),
        (transformers.BertForPreTraining, bert_config, "mlm-nsp"),
        (transformers.BertForMaskedLM, bert_config, "mlm"),
        (transformers.BertForSequenceClassification, lambda: bert_config(num_labels=3), "classification"),
    ],
)
def test_parameter_count_matches(cls, config, task):
    hf_config = config()
    ours = build_model(config_from_hf(hf_config.to_dict(), task), task)
    assert ours.num_parameters() == sum(p.numel() for p in cls(hf_config).parameters())


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def _save_dir(path, config: dict, state: dict):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    torch.save(state, path / "pytorch_model.bin")
    return path


class NotATensor:
    """A pickled object of this class must never be rebuilt by from_hf (weights_only loading)."""


def test_bad_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(gpt2_config().to_dict()))
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        from_hf(tmp_path)
    with pytest.raises(ValueError, match="architectures"):  # config.json without architectures, no task
        from_hf(_save_dir(tmp_path / "noarch", gpt2_config().to_dict(), {}))
    unsupported = {**gpt2_config().to_dict(), "architectures": ["GPT2ForSequenceClassification"]}
    with pytest.raises(ValueError, match="GPT2ForSequenceClassification"):
        from_hf(_save_dir(tmp_path / "arch", unsupported, {}))
    with pytest.raises(ValueError, match="model_type"):
        from_hf(_save_dir(tmp_path / "llama", {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, {}))
    pickled = {**gpt2_config().to_dict(), "architectures": ["GPT2LMHeadModel"]}
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        from_hf(_save_dir(tmp_path / "pickle", pickled, {"x": NotATensor()}))


@pytest.mark.parametrize(
    "make_config, field",
    [
        (lambda: bert_config(position_embedding_type="relative_key"), "position_embedding_type"),
        (lambda: bert_config(hidden_act="silu"), "hidden_act"),
        (lambda: bert_config(is_decoder=True), "is_decoder"),
        (lambda: gpt2_config(activation_function="silu"), "activation_function"),
        (lambda: gpt2_config(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    ],
)
def test_unsupported_config_values(make_config, field):
    config = make_config().to_dict()
    config["architectures"] = ["BertForMaskedLM" if config["model_type"] == "bert" else "GPT2LMHeadModel"]
    with pytest.raises(ValueError, match=field):
        config_from_hf(config, "mlm" if config["model_type"] == "bert" else "causal-lm")


def test_missing_extra_and_misshapen_weights(tmp_path):
    hf = make(transformers.BertForPreTraining, bert_config())
    config = {**hf.config.to_dict(), "architectures": ["BertForPreTraining"]}
    state = dict(hf.state_dict())

    missing = {k: v for k, v in state.items() if k != "cls.predictions.bias"}
    with pytest.raises(ValueError, match=r"cls\.predictions\.bias"):
        from_hf(_save_dir(tmp_path / "missing", config, missing))
    extra = {**state, "bert.encoder.layer.0.attention.self.rotary.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"attention\.self\.rotary\.weight"):
        from_hf(_save_dir(tmp_path / "extra", config, extra))
    misshapen = {**state, "bert.pooler.dense.bias": torch.zeros(47)}
    with pytest.raises(ValueError, match=r"pooler\.dense\.bias"):
        from_hf(_save_dir(tmp_path / "shape", config, misshapen))
    untied = {**state, "cls.predictions.decoder.weight": state["cls.predictions.decoder.weight"] + 1}
    with pytest.raises(ValueError, match=r"cls\.predictions\.decoder\.weight.*tied"):
        from_hf(_save_dir(tmp_path / "untied", config, untied))
    # Asking for a head the checkpoint does not have is a missing weight, not a random init.
    with pytest.raises(ValueError, match="classifier.weight"):
        from_hf(hf, task="classification")
    with pytest.raises(ValueError, match="task"):
        from_hf(hf, task="causal-lm")
    with pytest.raises(ValueError, match="d_model"):  # only runtime fields may be overridden
        from_hf(hf, d_model=64)


@pytest.mark.parametrize(
    "model, field",
    [
        (CausalLM(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4, pos_encoding="rope")),
         "pos_encoding"),
        (CausalLM(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4, activation="swiglu")), "activation"),
        (CausalLM(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2)), "n_kv_heads"),
        (CausalLM(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4, norm="rmsnorm")), "norm"),
        (MaskedLM(ModelConfig(arch="encoder", vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4)), "norm_placement"),
        (MaskedLM(ModelConfig(arch="encoder", vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4,
                              norm_placement="post", type_vocab_size=0)), "type_vocab_size"),
    ],
)
def test_to_hf_rejects_what_hf_cannot_express(model, field):
    with pytest.raises(ValueError, match=f"config.{field}"):
        to_hf(model)


def test_to_hf_rejects_other_models():
    # A Seq2SeqLM exports as T5 (tests/test_t5.py); one with another layout is refused by field.
    config = ModelConfig(arch="encoder-decoder", vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4)
    with pytest.raises(ValueError, match="config.pos_encoding"):
        to_hf(Seq2SeqLM(config))


# ---------------------------------------------------------------------------------------------
# Greedy generation: identical tokens to transformers' generate
# ---------------------------------------------------------------------------------------------


def test_greedy_generation_matches_transformers():
    from minillm.generation import generate

    hf = make(transformers.GPT2LMHeadModel, gpt2_config(), seed=4)
    models = [from_hf(hf, attn_backend=backend) for backend in ("reference", "sdpa")]
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (3, 6), generator=gen)
    left_pad_mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    padded = ids.masked_fill(left_pad_mask == 0, 0)

    def check(prompt, mask, eos):
        kwargs = dict(max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
        theirs = hf.generate(prompt, attention_mask=mask, do_sample=False, **kwargs)
        for model in models:
            ours = generate(model, prompt, attention_mask=mask, do_sample=False, **kwargs)
            assert torch.equal(ours, theirs), (model.config.attn_backend, ours, theirs)
        return theirs

    for prompt, mask in ((ids, torch.ones_like(ids)), (padded, left_pad_mask)):
        theirs = check(prompt, mask, eos=2)
        # Now make a token the model really produces the EOS: rows stop at different steps and
        # are padded afterwards, which both libraries must do the same way.
        eos = int(theirs[0, prompt.shape[1] + 3])
        theirs = check(prompt, mask, eos=eos)
        assert (theirs[:, prompt.shape[1]:] == eos).any()
