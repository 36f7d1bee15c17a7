"""Properties of the model that must hold for every configuration: causality, padding invariance,
backends agreeing, grouped-query attention equal to repeated heads, RoPE being relative,
overfitting one batch, and clear errors on bad input."""

import dataclasses

import pytest
import torch

from minillm import ModelConfig, build_model, preset
from minillm.model import IGNORE_INDEX, RotaryEmbedding, sinusoidal_table

BACKENDS = ["reference", "sdpa", "triton"]


def small(arch="decoder", **overrides) -> ModelConfig:
    base = dict(arch=arch, vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=48, type_vocab_size=2 if arch == "encoder" else 0)
    base.update(overrides)
    return ModelConfig(**base)


def model_for(config: ModelConfig, task: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(config, task).eval()
    # Randomise norm weights and biases too, so a bug that ignores them cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


VARIANTS = [
    dict(),
    dict(pos_encoding="rope", norm="rmsnorm", activation="swiglu", n_kv_heads=2, bias=False),
    dict(pos_encoding="sinusoidal", norm_placement="post", activation="relu", n_kv_heads=1),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=["gpt2", "llama", "vaswani-mqa"])
def test_causality_changing_token_t_never_changes_earlier_logits(variant):
    model = model_for(small(**variant), "causal-lm")
    ids = torch.randint(7, 97, (2, 20))
    before = model(ids).logits
    for t in (0, 7, 19):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % 97
        after = model(changed).logits
        torch.testing.assert_close(after[:, :t], before[:, :t], atol=1e-6, rtol=0)
        assert not torch.allclose(after[:, t:], before[:, t:]), "the change must be visible from position t on"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS, ids=["gpt2", "llama", "vaswani-mqa"])
def test_decoder_padding_invariance(variant, backend):
    """A padded batch (left and right padding) gives each example the logits it gets alone."""
    model = model_for(small(attn_backend=backend, **variant), "causal-lm")
    lengths = [9, 4, 13]
    examples = [torch.randint(7, 97, (n,)) for n in lengths]
    T = max(lengths)
    for side in ("right", "left"):
        ids = torch.zeros(len(examples), T, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, ex in enumerate(examples):
            span = slice(0, len(ex)) if side == "right" else slice(T - len(ex), T)
            ids[i, span], mask[i, span] = ex, 1
        logits = model(ids, mask).logits
        for i, ex in enumerate(examples):
            alone = model(ex[None]).logits[0]
            span = slice(0, len(ex)) if side == "right" else slice(T - len(ex), T)
            torch.testing.assert_close(logits[i, span], alone, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_encoder_padding_invariance_with_token_types(backend):
    model = model_for(small("encoder", attn_backend=backend), "mlm-nsp")
    lengths = [11, 5]
    examples = [torch.randint(7, 97, (n,)) for n in lengths]
    types = [torch.randint(0, 2, (n,)) for n in lengths]
    ids = torch.zeros(2, 11, dtype=torch.long)
    mask, token_types = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (ex, ty) in enumerate(zip(examples, types)):
        ids[i, : len(ex)], mask[i, : len(ex)], token_types[i, : len(ex)] = ex, 1, ty
    out = model(ids, mask, token_types)
    for i, (ex, ty) in enumerate(zip(examples, types)):
        alone = model(ex[None], token_type_ids=ty[None])
        torch.testing.assert_close(out.logits[i, : len(ex)], alone.logits[0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(out.nsp_logits[i], alone.nsp_logits[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "arch,task", [("decoder", "causal-lm"), ("encoder", "mlm-nsp"), ("encoder-decoder", "seq2seq"), ("encoder", "classification")]
)
def test_backends_agree(arch, task):
    ids = torch.randint(7, 97, (2, 17))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    outputs = {}
    for backend in BACKENDS:
        model = model_for(small(arch, attn_backend=backend, n_kv_heads=2), task)
        kwargs = dict(input_ids=ids, attention_mask=mask)
        if task == "seq2seq":
            kwargs["decoder_input_ids"] = ids[:, :9]
        outputs[backend] = model(**kwargs).logits
    for backend in ("sdpa", "triton"):
        torch.testing.assert_close(outputs[backend], outputs["reference"], atol=2e-5, rtol=1e-4)


def test_auto_backend_is_sdpa_on_cpu_and_triton_refuses_cpu_without_interpreter(monkeypatch):
    from minillm.dispatch import resolve_attention_backend

    q = torch.zeros(1, 1, 1, 8)
    assert resolve_attention_backend("auto", q) == "sdpa"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="attn_backend='triton' needs CUDA"):
        resolve_attention_backend("triton", q)


def test_grouped_query_attention_equals_multi_head_with_repeated_kv_heads():
    """GQA with Hkv heads = MHA whose key/value projections repeat each group's head."""
    gqa = model_for(small(n_kv_heads=2), "causal-lm")
    mha = build_model(small(), "causal-lm").eval()
    state = gqa.state_dict()
    H, Hkv, D = 4, 2, 8
    for name in list(state):
        if name.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")):
            w = state[name].reshape(Hkv, D, *state[name].shape[1:])
            state[name] = w.repeat_interleave(H // Hkv, dim=0).reshape(H * D, *state[name].shape[1:])
    mha.load_state_dict(state)
    ids = torch.randint(7, 97, (2, 15))
    torch.testing.assert_close(gqa(ids).logits, mha(ids).logits, atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(head_dim=16, max_len=64, theta=10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        return (rope(q, torch.tensor([[m]])) * rope(k, torch.tensor([[n]]))).sum()

    torch.testing.assert_close(score(10, 3), score(40, 33), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(10, 3), score(10, 4))


def test_sinusoidal_table_matches_the_formula():
    table = sinusoidal_table(50, 8)
    pos, i = 37, 3  # dims 6 and 7
    angle = pos / 10000 ** (2 * i / 8)
    torch.testing.assert_close(table[pos, 2 * i], torch.tensor(angle).sin().float())
    torch.testing.assert_close(table[pos, 2 * i + 1], torch.tensor(angle).cos().float())


@pytest.mark.parametrize("arch,task", [("decoder", "causal-lm"), ("encoder", "mlm"), ("encoder-decoder", "seq2seq")])
def test_tiny_model_overfits_one_batch(arch, task):
    torch.manual_seed(0)
    config = small(arch, vocab_size=50, d_model=64)
    model = build_model(config, task).train()
    ids = torch.randint(7, 50, (4, 16))
    labels = ids.clone()
    if task == "mlm":
        labels[torch.rand(ids.shape) > 0.3] = IGNORE_INDEX
        ids = ids.masked_fill(labels != IGNORE_INDEX, 4)  # [MASK]
    kwargs = dict(input_ids=ids, labels=labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = model(**kwargs).loss
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 3.0 and loss.item() < 0.05, (first, loss.item())


def test_loss_sum_equals_mean_times_token_count():
    model = model_for(small(), "causal-lm")
    ids = torch.randint(7, 97, (3, 12))
    labels = ids.clone()
    labels[0, 5:] = IGNORE_INDEX
    mean = model(ids, labels=labels).loss
    total = model(ids, labels=labels, loss_reduction="sum").loss
    n_predicted = (labels[:, 1:] != IGNORE_INDEX).sum()
    torch.testing.assert_close(total, mean * n_predicted)


def test_masked_logits_only_equals_the_full_head_at_masked_positions_in_value_and_gradient():
    config = small("encoder")
    model = model_for(config, "mlm-nsp")
    ids = torch.randint(7, 97, (3, 16))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    labels = torch.full_like(ids, IGNORE_INDEX)
    chosen = (torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.3) & mask.bool()
    labels[chosen] = ids[chosen]
    full = model(ids, mask, labels=labels, loss_reduction="sum")
    full.loss.backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    sparse = model(ids, mask, labels=labels, loss_reduction="sum", masked_logits_only=True)
    sparse.loss.backward()
    assert sparse.logits.shape == (int(chosen.sum()), config.vocab_size)
    torch.testing.assert_close(sparse.logits, full.logits[chosen])
    torch.testing.assert_close(sparse.loss, full.loss)
    for name, p in model.named_parameters():
        if name in full_grads:
            torch.testing.assert_close(p.grad, full_grads[name], msg=name)
    with pytest.raises(ValueError, match="masked_logits_only: needs labels"):
        model(ids, mask, masked_logits_only=True)


@pytest.mark.parametrize("arch", ["encoder", "decoder"])
def test_mean_pooling_classifier_reads_the_average_of_real_tokens_and_ignores_padding(arch):
    model = model_for(small(arch, classifier_pooling="mean", num_labels=3), "classification")
    assert model.pooler is None  # no [CLS] pooler to train
    ids = torch.randint(7, 97, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    out = model(ids, mask)
    for row, n in ((0, 10), (1, 6)):
        mean = out.hidden_states[row, :n].mean(dim=0)  # independent: the plain average of real tokens
        torch.testing.assert_close(out.logits[row], model.classifier(mean))
    alone = model(ids[1:, :6])  # the same row without its padding
    torch.testing.assert_close(out.logits[1:], alone.logits)


def test_tied_embeddings_share_storage_and_optimizer_groups_skip_norms_biases_embeddings():
    model = build_model(small(), "causal-lm")
    assert model.lm_head.weight is model.decoder.embeddings.token.weight
    decay, no_decay = model.optimizer_groups(0.1)
    decay_ids = {id(p) for p in decay["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[i].endswith("weight") and "norm" not in names[i] for i in decay_ids)
    assert id(model.decoder.embeddings.token.weight) not in decay_ids
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_presets_build_and_scaled_residual_init():
    for name in ("tiny", "tiny-bert", "tiny-seq2seq", "bert-tiny"):
        assert isinstance(preset(name), ModelConfig)
    config = preset("gpt2-124m")
    assert (config.n_layers, config.d_model, config.n_heads, config.vocab_size) == (12, 768, 12, 50257)
    model = build_model(small(n_layers=8, d_model=64), "causal-lm")
    out_std = model.decoder.blocks[0].attn.out_proj.weight.std().item()
    in_std = model.decoder.blocks[0].attn.q_proj.weight.std().item()
    assert abs(in_std - 0.02) < 0.003 and abs(out_std - 0.02 / 4) < 0.001  # 0.02 / sqrt(2 * 8)


# ------------------------------------------------------------------------------------------
# Bad input: errors name the argument or field
# ------------------------------------------------------------------------------------------


def test_out_of_vocabulary_ids_are_rejected():
    model = model_for(small(), "causal-lm")
    with pytest.raises(ValueError, match="input_ids: id 97 is outside the vocabulary"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="input_ids: id -1"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(TypeError, match="input_ids: expected an integer tensor"):
        model(torch.zeros(1, 3))


def test_sequence_longer_than_max_is_rejected():
    model = model_for(small(), "causal-lm")
    with pytest.raises(ValueError, match="input_ids: sequence length 49 .* exceeds max_seq_len=48"):
        model(torch.ones(1, 49, dtype=torch.long))


def test_wrong_mask_and_token_type_shapes_are_rejected():
    model = model_for(small("encoder"), "mlm")
    ids = torch.ones(2, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask: expected shape"):
        model(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="token_type_ids: expected shape"):
        model(ids, token_type_ids=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="token_type_ids: values must lie"):
        model(ids, token_type_ids=torch.full((2, 6), 2))
    with pytest.raises(ValueError, match="labels: expected shape"):
        model(ids, labels=torch.ones(2, 5, dtype=torch.long))


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(n_heads=5), ValueError, "n_heads: got 5, which does not divide d_model=32"),
        (dict(n_kv_heads=3), ValueError, "n_kv_heads: got 3"),
        (dict(arch="rnn"), ValueError, "arch: got 'rnn'"),
        (dict(attn_backend="cuda"), ValueError, "attn_backend"),
        (dict(d_model="32"), TypeError, "d_model: expected int"),
        (dict(attn_dropout=1.0), ValueError, "attn_dropout"),
        (dict(vocab_size=0), ValueError, "vocab_size"),
        (dict(pad_token_id=500), ValueError, "pad_token_id"),
        (dict(classifier_pooling="max"), ValueError, "classifier_pooling: got 'max'"),
        (dict(classifier_pooling="cls"), ValueError, "classifier_pooling: 'cls' does not suit arch='decoder'"),
    ],
)
def test_config_validation_names_the_field(overrides, error, match):
    with pytest.raises(error, match=match):
        small(**overrides)


def test_unknown_preset_and_unknown_fields_are_rejected():
    with pytest.raises(ValueError, match="preset: unknown name 'gpt5'"):
        preset("gpt5")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['n_layer'\]"):
        ModelConfig.from_dict({"n_layer": 3})
    config = small()
    assert ModelConfig.from_dict(dataclasses.asdict(config)) == config


def test_wrong_architecture_for_task_is_rejected():
    with pytest.raises(ValueError, match="config.arch: CausalLM needs 'decoder'"):
        build_model(small("encoder"), "causal-lm")
    with pytest.raises(ValueError, match="task: got 'translate'"):
        build_model(small(), "translate")



@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_norm_backends_agree_in_forward_and_backward(norm):
    """The model's norms through our Triton kernel (interpreter) equal torch's, gradients included."""
    ids = torch.randint(7, 97, (2, 9))
    results = {}
    for backend in ("torch", "triton"):
        model = model_for(small(norm=norm, norm_backend=backend), "causal-lm")
        out = model(ids, labels=ids)
        out.loss.backward()
        results[backend] = (out.logits, {n: p.grad for n, p in model.named_parameters() if "norm" in n})
    torch.testing.assert_close(results["triton"][0], results["torch"][0], atol=1e-5, rtol=1e-5)
    for name, grad in results["torch"][1].items():
        torch.testing.assert_close(results["triton"][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_explicit_position_ids_are_used_and_checked():
    model = model_for(small("encoder"), "mlm")
    ids = torch.randint(7, 97, (1, 6))
    default = model(ids).logits
    shifted = model(ids, position_ids=torch.arange(2, 8)[None]).logits
    torch.testing.assert_close(model(ids, position_ids=torch.arange(6)[None]).logits, default)
    assert not torch.allclose(shifted, default)
    with pytest.raises(ValueError, match="position_ids: expected shape"):
        model(ids, position_ids=torch.arange(40, 46)[None] + 10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS, ids=["gpt2", "llama", "vaswani-mqa"])
def test_document_ids_give_each_packed_document_the_logits_it_gets_alone(variant, backend):
    """A window packing two documents, with document_ids and per-document position_ids: every
    token attends only within its document, so each document's logits equal its logits alone;
    a padded row in the same batch is unaffected."""
    model = model_for(small(attn_backend=backend, **variant), "causal-lm")
    first, second = torch.randint(7, 97, (5,)), torch.randint(7, 97, (8,))
    T = len(first) + len(second)
    ids = torch.stack((torch.cat((first, second)), torch.cat((second, torch.zeros(5, dtype=torch.long)))))  # (2, T)
    mask = torch.ones_like(ids)
    mask[1, len(second):] = 0  # row 1: the second document alone, right-padded
    document_ids = torch.tensor([[0] * 5 + [1] * 8, [0] * T])  # (2, T)
    position_ids = torch.stack((torch.cat((torch.arange(5), torch.arange(8))), torch.arange(T)))  # (2, T)
    logits = model(ids, mask, position_ids=position_ids, document_ids=document_ids).logits  # (2, T, V)
    first_alone, second_alone = model(first[None]).logits[0], model(second[None]).logits[0]
    torch.testing.assert_close(logits[0, :5], first_alone, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(logits[0, 5:], second_alone, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(logits[1, :8], second_alone, atol=2e-5, rtol=1e-4)
    # Without document_ids attention crosses the boundary: the second document sees the first.
    crossing = model(ids[:1], position_ids=position_ids[:1]).logits[0]
    assert not torch.allclose(crossing[5:], second_alone, atol=1e-3)


def test_without_document_ids_the_fast_causal_path_is_unchanged():
    """document_ids=None builds no mask (SDPA's is_causal); one document everywhere builds the
    mask and gives the same logits."""
    from minillm.model import self_attention_mask

    assert self_attention_mask(None, 6, 0, True, torch.device("cpu")) == (None, True)
    model = model_for(small(), "causal-lm")
    ids = torch.randint(7, 97, (2, 11))
    one_document = torch.zeros_like(ids)
    torch.testing.assert_close(model(ids, document_ids=one_document).logits, model(ids).logits, atol=2e-5, rtol=1e-4)


def test_document_ids_are_checked_and_refused_with_a_cache():
    model = model_for(small(), "causal-lm")
    ids = torch.randint(7, 97, (2, 6))
    with pytest.raises(ValueError, match=r"document_ids: expected shape \(B, T\) = \(2, 6\), got \(2, 5\)"):
        model(ids, document_ids=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="document_ids: expected an integer"):
        model(ids, document_ids=torch.zeros(2, 6))
    cache = model(ids).cache
    with pytest.raises(ValueError, match="document_ids: cannot be combined with a KV cache"):
        model(ids[:, :1], cache=cache, document_ids=torch.zeros(2, 1, dtype=torch.long))
