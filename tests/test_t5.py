"""T5 in minillm against Hugging Face transformers: same weights, same logits, same greedy tokens.

T5 is minillm's Seq2SeqLM with T5's settings (relative position bias, RMSNorm, no biases, unscaled
attention, ReLU or gated-GELU MLP, scaled decoder output). As in test_hf_equivalence.py, each test
builds a tiny random transformers T5 with awkward sizes (vocab 101, width 48, 4 heads of 10, so
H * D != C, feed-forward 70, 8 buckets up to distance 20 so that the logarithmic buckets are used),
fills every tensor with random values, converts it and compares in fp32 against HF's "eager"
attention. Tolerance: 1e-4 max abs on logits.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from minillm import recipes  # noqa: E402
from minillm.config import ModelConfig, preset  # noqa: E402
from minillm.convert import from_hf, hf_state_dict, save_hf, to_hf  # noqa: E402
from minillm.model import CausalLM, Seq2SeqLM, relative_position_bucket  # noqa: E402

TOL = 1e-4
VOCAB = 101
T5_ATTENTION = transformers.models.t5.modeling_t5.T5Attention


def t5_config(**overrides):
    values = dict(vocab_size=VOCAB, d_model=48, d_kv=10, d_ff=70, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, relative_attention_max_distance=20, decoder_start_token_id=0,
                  attn_implementation="eager")
    return transformers.T5Config(**{**values, **overrides})


V10 = dict(feed_forward_proj="relu")  # T5 v1.0: ReLU, head tied to `shared`, output scaled by d_model^-0.5
V11 = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)  # v1.1: gated GELU, no scaling


def randomize(hf_model, seed: int = 0):
    """Fill every tensor of the state dict: N(0, 0.1^2), norm weights around 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in hf_model.state_dict().items():
            noise = torch.randn(tensor.shape, generator=gen) * 0.1
            tensor.copy_(1.0 + 2 * noise if "layer_norm" in name else noise)
    return hf_model.eval()


def make(config, seed: int = 0):
    torch.manual_seed(seed)
    return randomize(transformers.T5ForConditionalGeneration(config), seed)


def padded_batch(T_src: int = 25, T_tgt: int = 9, seed: int = 1):
    """Sources of lengths 25, 18, 5 and targets of lengths 9, 9, 4, right-padded (1 = token, 0 = pad).
    25 tokens reach distances past relative_max_distance=20: the last bucket is used."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(2, VOCAB, (3, T_src), generator=gen)
    src_mask = (torch.arange(T_src)[None] < torch.tensor([T_src, 18, 5])[:, None]).long()
    tgt = torch.randint(2, VOCAB, (3, T_tgt), generator=gen)
    tgt_mask = (torch.arange(T_tgt)[None] < torch.tensor([T_tgt, T_tgt, 4])[:, None]).long()
    return src * src_mask, src_mask, tgt * tgt_mask, tgt_mask


def logits_of(model, src, src_mask, tgt, tgt_mask):
    with torch.no_grad():
        if isinstance(model, Seq2SeqLM):
            return model(src, attention_mask=src_mask, decoder_input_ids=tgt, decoder_attention_mask=tgt_mask).logits
        return model(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt,
                     decoder_attention_mask=tgt_mask).logits


def max_diff(ours, theirs, mask):
    return (ours - theirs)[mask.bool()].abs().max().item()  # real target positions only


# ---------------------------------------------------------------------------------------------
# The pieces
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 20), (6, 7)])
def test_relative_position_bucket_matches_transformers(bidirectional, num_buckets, max_distance):
    relative = torch.arange(-300, 301)[None, :]  # key - query, both signs, far past max_distance
    ours = relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    theirs = T5_ATTENTION._relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    assert torch.equal(ours, theirs)
    assert int(ours.max()) == num_buckets - 1  # every direction reaches its last (farthest) bucket


def test_relative_bias_trains_and_dropouts_take_effect():
    config = preset("tiny-t5", vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2, d_ff=40)
    torch.manual_seed(0)
    model = Seq2SeqLM(config)
    src, src_mask, tgt, _ = padded_batch()
    model(src, attention_mask=src_mask, labels=tgt).loss.backward()
    for stack in (model.encoder, model.decoder):  # the bias reaches the scores, so it learns
        assert stack.relative_bias.table.weight.grad.abs().sum() > 0
    for field in ("ff_dropout", "final_dropout", "embed_dropout", "attn_dropout", "resid_dropout"):
        torch.manual_seed(0)
        noisy = Seq2SeqLM(preset("tiny-t5", vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2, **{field: 0.5}))
        eval_logits = noisy.eval()(src, attention_mask=src_mask, labels=tgt).logits
        train_logits = noisy.train()(src, attention_mask=src_mask, labels=tgt).logits
        assert not torch.allclose(eval_logits, train_logits), field


def test_t5_small_preset_is_transformers_t5_small():
    """Same parameter names (through the converter's rules) and shapes as transformers' t5-small."""
    torch.manual_seed(0)
    ours = Seq2SeqLM(preset("t5-small"))
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config())  # T5Config's defaults are t5-small
    assert ours.num_parameters() == hf.num_parameters() == 60_506_624
    hf_config, state, aliases = hf_state_dict(ours)
    theirs = hf.state_dict()
    assert set(state) | set(aliases) == set(theirs)
    assert all(state[k].shape == theirs[k].shape for k in state)
    assert hf_config["feed_forward_proj"] == "relu" and hf_config["scale_decoder_outputs"] is True


def test_config_refuses_bad_t5_values():
    with pytest.raises(ValueError, match="relative_buckets"):
        ModelConfig(relative_buckets=2)
    with pytest.raises(ValueError, match="relative_max_distance"):
        ModelConfig(relative_buckets=32, relative_max_distance=16)
    with pytest.raises(ValueError, match="attn_scale"):
        ModelConfig(attn_scale=0.0)
    with pytest.raises(ValueError, match="scale_decoder_output"):
        ModelConfig(arch="decoder", scale_decoder_output=True)
    with pytest.raises(ValueError, match="activation"):
        ModelConfig(activation="gated_gelu")


# ---------------------------------------------------------------------------------------------
# from_hf: logits and generation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_t5_logits_match(version, backend):
    hf = make(t5_config(num_decoder_layers=3, **(V10 if version == "v1.0" else V11)))
    model = from_hf(hf, attn_backend=backend)
    assert isinstance(model, Seq2SeqLM) and model.config.decoder_layers == 3
    assert model.config.scale_decoder_output == (version == "v1.0")
    assert model.config.activation == ("relu" if version == "v1.0" else "gated_gelu_tanh")
    src, src_mask, tgt, tgt_mask = padded_batch()
    assert max_diff(logits_of(model, src, src_mask, tgt, tgt_mask), logits_of(hf, src, src_mask, tgt, tgt_mask),
                    tgt_mask) < TOL
    labels = tgt.masked_fill(tgt_mask == 0, -100)
    with torch.no_grad():  # the loss, with decoder inputs shifted right from the labels on both sides
        ours = model(src, attention_mask=src_mask, labels=labels).loss
        theirs = hf(input_ids=src, attention_mask=src_mask, labels=labels).loss
    assert abs(ours.item() - theirs.item()) < TOL


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
def test_t5_greedy_generation_matches_transformers(version):
    hf = make(t5_config(**(V10 if version == "v1.0" else V11)), seed=3)
    model = from_hf(hf)
    src, src_mask, _, _ = padded_batch()
    theirs = hf.generate(src, attention_mask=src_mask, max_new_tokens=12, do_sample=False)
    ours = model.generate(src, attention_mask=src_mask, max_new_tokens=12)
    assert torch.equal(ours, theirs)
    # Stopping: make a token that row 0 emits mid-way the EOS; rows then end (and pad) at different steps.
    eos = int(theirs[0, 5])
    theirs = hf.generate(src, attention_mask=src_mask, max_new_tokens=12, do_sample=False, eos_token_id=eos)
    ours = model.generate(src, attention_mask=src_mask, max_new_tokens=12, eos_token_id=eos)
    assert torch.equal(ours, theirs)
    assert (theirs[0] == eos).any() and theirs[0, -1] == 0  # row 0 stopped, then got padding


def test_untied_head_from_an_older_checkpoint(tmp_path):
    """A transformers-4 T5 v1.1 checkpoint: tie_word_embeddings=false meant its own lm_head matrix and
    no scaling. It also carries the cross-attention bias table that transformers never reads."""
    hf = make(t5_config(**V11))
    hf.lm_head = torch.nn.Linear(48, VOCAB, bias=False)  # untie by hand: transformers 5 cannot build one
    torch.nn.init.normal_(hf.lm_head.weight, std=0.1)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    assert not torch.equal(state["lm_head.weight"], state["shared.weight"])
    state["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = torch.randn(8, 4)
    config = {k: v for k, v in hf.config.to_dict().items() if k != "scale_decoder_outputs"}
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False,
                                                      "architectures": ["T5ForConditionalGeneration"]}))
    from safetensors.torch import save_file

    save_file(state, tmp_path / "model.safetensors")
    model = from_hf(tmp_path)
    assert not model.config.tie_embeddings and not model.config.scale_decoder_output
    assert model.lm_head.weight is not model.encoder.embeddings.token.weight
    src, src_mask, tgt, tgt_mask = padded_batch()
    assert max_diff(logits_of(model, src, src_mask, tgt, tgt_mask), logits_of(hf, src, src_mask, tgt, tgt_mask),
                    tgt_mask) < TOL
    with pytest.raises(ValueError, match="config.tie_embeddings"):
        to_hf(model)


def test_from_hf_refuses_unsupported_t5(tmp_path):
    with pytest.raises(ValueError, match="feed_forward_proj"):
        from_hf(make(t5_config(feed_forward_proj="gated-silu")))
    hf = make(t5_config(**V10))
    state = dict(hf.state_dict())
    state["encoder.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(40, 47)  # wrong shape
    hf.config.to_json_file(tmp_path / "config.json")
    from safetensors.torch import save_file

    save_file({k: v.clone() for k, v in state.items()}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="attn.q_proj.weight expects shape"):
        from_hf(tmp_path, task="seq2seq")  # config.json without "architectures": the task says what to build


# ---------------------------------------------------------------------------------------------
# to_hf: a minillm T5 back to transformers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation, scaled", [("relu", True), ("gated_gelu_tanh", False)])
def test_to_hf_round_trip(tmp_path, activation, scaled):
    torch.manual_seed(0)
    config = preset("tiny-t5", vocab_size=VOCAB, d_model=48, n_heads=4, d_head=10, d_ff=70, n_layers=2,
                    n_decoder_layers=3, relative_buckets=8, relative_max_distance=20, activation=activation,
                    scale_decoder_output=scaled, pad_token_id=0, bos_token_id=0, eos_token_id=1)
    model = Seq2SeqLM(config).eval()
    src, src_mask, tgt, tgt_mask = padded_batch()
    expected = logits_of(model, src, src_mask, tgt, tgt_mask)
    hf = to_hf(model, out_dir=tmp_path).eval()
    assert hf.config.scale_decoder_outputs == scaled
    assert max_diff(logits_of(hf, src, src_mask, tgt, tgt_mask), expected, tgt_mask) < TOL
    loaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert max_diff(logits_of(loaded, src, src_mask, tgt, tgt_mask), expected, tgt_mask) < TOL
    back = from_hf(tmp_path)
    assert back.config.scale_decoder_output == scaled and back.config.activation == activation
    assert max_diff(logits_of(back, src, src_mask, tgt, tgt_mask), expected, tgt_mask) < TOL


def test_gpt2_and_bert_export_refuse_t5_settings():
    for field, value in (("attn_scale", 1.0), ("d_head", 8), ("ff_dropout", 0.1), ("final_dropout", 0.1)):
        with pytest.raises(ValueError, match=f"config.{field}"):
            to_hf(CausalLM(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2, **{field: value})))


def test_to_hf_refuses_what_t5_cannot_hold():
    base = preset("tiny-t5", vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2)
    for field, value in (("attn_scale", None), ("bias", True), ("activation", "swiglu"), ("norm", "layernorm"),
                         ("ff_dropout", 0.1)):
        with pytest.raises(ValueError, match=f"config.{field}"):
            to_hf(Seq2SeqLM(ModelConfig(**{**base.to_dict(), field: value})))


# ---------------------------------------------------------------------------------------------
# The recipes: `minillm pretrain|finetune --model t5`
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command, task", [("pretrain", "span-corruption"), ("finetune", "seq2seq")])
def test_t5_recipes(command, task):
    configs, _ = recipes.configs(command, "t5", None, {})
    assert configs["model"] == preset("tiny-t5") and configs["train"].task == task
    assert configs["train"].out_dir == f"runs/{command}-t5"
    # Without --model, the task still picks the seq2seq recipe, as before T5 existed.
    configs, _ = recipes.configs(command, None, None, {"train.task": task})
    assert configs["model"].pos_encoding == "sinusoidal"
