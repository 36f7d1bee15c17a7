"""XLNet: the model against transformers, its masks, and the permutation language-model task.

Like tests/test_hf_equivalence.py: a tiny random transformers XLNet (vocab 101, width 48, 4 heads,
feed-forward 70) with *every* tensor filled with random values (norm weights around 1, the three
attention biases, seg_embed and mask_emb included), converted with `minillm.convert`, compared in
fp32 with the same perm_mask and target_mapping. Tolerance 1e-4 (observed ~1e-6).
"""

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from minillm.config import ModelConfig, preset  # noqa: E402
from minillm.convert import from_hf, to_hf  # noqa: E402
from minillm.model import XLNetClassifier, XLNetLM, rel_shift, relative_sinusoids, xlnet_masks  # noqa: E402

TOL = 1e-4
VOCAB = 101


def xlnet_config(**overrides):
    values = dict(vocab_size=VOCAB, d_model=48, n_layer=2, n_head=4, d_head=12, d_inner=70, mem_len=None)
    return transformers.XLNetConfig(**{**values, **overrides})


def randomize(hf_model, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in hf_model.state_dict().items():
            noise = torch.randn(tensor.shape, generator=gen) * 0.1
            tensor.copy_(1.0 + 2 * noise if name.endswith("layer_norm.weight") else noise)
    return hf_model.eval()


def make(cls, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return randomize(cls(xlnet_config(**overrides)), seed)


def permutation_inputs(B: int = 3, T: int = 9, P: int = 4, seed: int = 1):
    """Random ids and segments, a left-padded attention mask (rows of length T, T-3, T-5), and
    perm_mask / target_mapping from one random order per row: the last P positions of the order
    are predicted."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, VOCAB, (B, T), generator=gen)
    segments = torch.randint(0, 2, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    for row, pads in ((1, 3), (2, 5)):
        if row < B:
            mask[row, :pads] = 0
    perm_mask = torch.zeros(B, T, T)
    target_mapping = torch.zeros(B, P, T)
    for b in range(B):
        order = torch.randperm(T, generator=gen)
        rank = torch.empty(T, dtype=torch.long)
        rank[order] = torch.arange(T)
        # i may not see j at or after it in the order; the context (all but the last P) sees itself
        perm_mask[b] = (rank[None, :] >= rank[:, None].clamp(min=T - P)).float()
        target_mapping[b, torch.arange(P), order[T - P:]] = 1
    return ids, segments, mask, perm_mask, target_mapping


# ---------------------------------------------------------------------------------------------
# Equivalence with transformers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inputs", ["plain", "permutation", "permutation+segments+padding", "segments+padding"])
def test_lm_logits_match_transformers(inputs):
    hf = make(transformers.XLNetLMHeadModel)
    ours = from_hf(hf)
    assert isinstance(ours, XLNetLM)
    ids, segments, mask, perm_mask, target_mapping = permutation_inputs()
    kwargs = {
        "plain": {},
        "permutation": dict(perm_mask=perm_mask, target_mapping=target_mapping),
        "permutation+segments+padding": dict(perm_mask=perm_mask, target_mapping=target_mapping,
                                             token_type_ids=segments, attention_mask=mask),
        "segments+padding": dict(token_type_ids=segments, attention_mask=mask),
    }[inputs]
    with torch.no_grad():
        theirs, mine = hf(ids, **kwargs).logits, ours(ids, **kwargs).logits
    expected_len = target_mapping.shape[1] if "target_mapping" in kwargs else ids.shape[1]
    assert mine.shape == theirs.shape == (ids.shape[0], expected_len, VOCAB)
    assert (mine - theirs).abs().max().item() < TOL


@pytest.mark.parametrize("padded", [False, True])
def test_classifier_logits_match_transformers(padded):
    hf = make(transformers.XLNetForSequenceClassification, num_labels=3)
    ours = from_hf(hf)
    assert isinstance(ours, XLNetClassifier)
    ids, segments, mask, _, _ = permutation_inputs()
    kwargs = dict(attention_mask=mask, token_type_ids=segments) if padded else {}
    with torch.no_grad():
        theirs, mine = hf(ids, **kwargs).logits, ours(ids, **kwargs).logits
    assert mine.shape == theirs.shape == (3, 3)
    assert (mine - theirs).abs().max().item() < TOL


@pytest.mark.parametrize("cls", [transformers.XLNetLMHeadModel, transformers.XLNetForSequenceClassification])
def test_round_trip_object_and_directory(cls, tmp_path):
    hf = make(cls)
    ours = from_hf(hf)
    back = to_hf(ours, out_dir=tmp_path)
    assert type(back) is cls
    for name, tensor in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    reread = from_hf(tmp_path)
    for (name, a), (_, b) in zip(ours.named_parameters(), reread.named_parameters()):
        assert torch.equal(a, b), name
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [cls.__name__]
    loaded = cls.from_pretrained(tmp_path).eval()  # transformers reads what we wrote
    ids = permutation_inputs()[0]
    with torch.no_grad():
        assert (loaded(ids).logits - hf(ids).logits).abs().max().item() < TOL


def test_untied_lm_head_round_trips():
    hf = make(transformers.XLNetLMHeadModel, tie_word_embeddings=False)
    ours = from_hf(hf)
    assert not ours.config.tie_embeddings
    assert ours.lm_head.weight.data_ptr() != ours.body.embeddings.weight.data_ptr()
    ids = permutation_inputs()[0]
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max().item() < TOL
        assert (to_hf(ours)(ids).logits - hf(ids).logits).abs().max().item() < TOL


@pytest.mark.parametrize("field, value, cls", [
    ("attn_type", "uni", transformers.XLNetLMHeadModel),
    ("bi_data", True, transformers.XLNetLMHeadModel),
    ("clamp_len", 4, transformers.XLNetLMHeadModel),
    ("same_length", True, transformers.XLNetLMHeadModel),
    ("ff_activation", "silu", transformers.XLNetLMHeadModel),
    ("summary_type", "first", transformers.XLNetForSequenceClassification),
    ("summary_activation", None, transformers.XLNetForSequenceClassification),
    ("summary_use_proj", False, transformers.XLNetForSequenceClassification),
    ("summary_last_dropout", 0.3, transformers.XLNetForSequenceClassification),
])
def test_unsupported_config_values_are_refused(field, value, cls):
    hf = make(cls)
    hf.config.__dict__[field] = value
    with pytest.raises(ValueError, match=field):
        from_hf(hf)


def test_missing_and_extra_weights_are_refused(tmp_path):
    hf = make(transformers.XLNetLMHeadModel)
    to_hf(from_hf(hf), out_dir=tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "model.safetensors")
    extra = {**state, "transformer.layer.0.rel_attn.extra": torch.zeros(1)}
    save_file(extra, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="rel_attn.extra"):
        from_hf(tmp_path)
    del state["transformer.layer.1.rel_attn.r_s_bias"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="r_s_bias"):
        from_hf(tmp_path)


# ---------------------------------------------------------------------------------------------
# The pieces: positions, masks, the two streams
# ---------------------------------------------------------------------------------------------


def test_rel_shift_reads_distance_i_minus_j():
    T = 5
    R = relative_sinusoids(T, T, 8)  # (2T, C): row r is distance T - r
    scores = R[None, None, None, :, 0].expand(1, 1, T, 2 * T)  # feature 0, sin(d): distinct per distance
    shifted = rel_shift(scores, T)[0, 0]  # (T, T)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    assert torch.allclose(shifted, torch.sin((i - j).float()))


def test_masks_content_sees_itself_query_does_not():
    perm_mask = torch.ones(1, 4, 4)  # nobody may see anybody
    attention_mask = torch.tensor([[0, 1, 1, 1]])
    allowed_h, allowed_g = xlnet_masks(perm_mask, attention_mask, 4, torch.device("cpu"))
    assert torch.equal(allowed_h[0], torch.eye(4, dtype=torch.bool))
    assert not allowed_g.any()
    allowed_h, allowed_g = xlnet_masks(None, attention_mask, 4, torch.device("cpu"))
    assert torch.equal(allowed_g[0], attention_mask.bool().expand(4, 4))  # padding keys only
    assert xlnet_masks(None, None, 4, torch.device("cpu")) == (None, None)


def test_query_stream_never_sees_its_own_token():
    torch.manual_seed(0)
    model = XLNetLM(preset("tiny-xlnet", vocab_size=50, n_layers=2, d_model=32, n_heads=2)).eval()
    ids, _, _, perm_mask, target_mapping = permutation_inputs(B=1, T=7, P=3)
    ids = ids % 50
    target = int(target_mapping[0, 0].argmax())
    changed = ids.clone()
    changed[0, target] = (ids[0, target] + 1) % 50
    with torch.no_grad():
        before = model(ids, perm_mask=perm_mask, target_mapping=target_mapping).logits
        after = model(changed, perm_mask=perm_mask, target_mapping=target_mapping).logits
        content_before, content_after = model(ids).logits, model(changed).logits
    # prediction 0 is for the first target of the order: its query stream never reads its token...
    assert torch.equal(before[0, 0], after[0, 0])
    assert not torch.allclose(before[0, 1], after[0, 1])  # ...the next target's does
    assert not torch.allclose(content_before[0, target], content_after[0, target])  # the content stream does


def test_config_refuses_other_layouts():
    for field, value in [("pos_encoding", "learned"), ("norm_placement", "pre"), ("type_vocab_size", 0),
                         ("norm", "rmsnorm"), ("classifier_pooling", "mean"), ("activation", "swiglu")]:
        with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
            preset("tiny-xlnet", **{field: value})
    with pytest.raises(ValueError, match="config.arch"):
        XLNetLM(preset("tiny-bert"))
    model = XLNetLM(preset("tiny-xlnet", vocab_size=50, n_layers=1))
    with pytest.raises(ValueError, match="perm_mask"):
        model(torch.ones(2, 5, dtype=torch.long), perm_mask=torch.zeros(2, 5, 4))
    with pytest.raises(ValueError, match="target_mapping"):
        model(torch.ones(2, 5, dtype=torch.long), target_mapping=torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="labels"):
        model(torch.ones(2, 5, dtype=torch.long), target_mapping=torch.zeros(2, 3, 5), labels=torch.zeros(2, 5).long())


# ---------------------------------------------------------------------------------------------
# Permutation language modelling: masks, batches, the task, the recipes
# ---------------------------------------------------------------------------------------------


def test_permutation_masks_follow_the_order():
    import numpy as np

    from minillm.data.permutation import permutation_masks

    rng = np.random.default_rng(0)
    order = np.stack([rng.permutation(7) for _ in range(2)])  # (B, T)
    perm_mask, target_mapping = permutation_masks(order, 3)
    for b in range(2):
        rank = {int(pos): t for t, pos in enumerate(order[b])}
        for i in range(7):
            for j in range(7):
                target_i = rank[i] >= 4
                # a target sees what precedes it in the order; the context sees the context
                hidden = rank[j] >= rank[i] if target_i else rank[j] >= 4
                assert perm_mask[b, i, j] == float(hidden), (b, i, j)
        assert [int(row.argmax()) for row in target_mapping[b]] == list(order[b, 4:])
        assert (target_mapping[b].sum(1) == 1).all()
    with pytest.raises(ValueError, match="num_predict"):
        permutation_masks(order, 0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import random

    from minillm.data.config import DataConfig
    from minillm.data.prepare import prepare_from_config

    root = tmp_path_factory.mktemp("xlnet")
    rng = random.Random(0)
    words = "one two three four five six seven eight nine ten alpha beta gamma delta the of and to in".split()
    path = root / "docs.jsonl"
    path.write_text("\n".join(
        json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 200)))}) for _ in range(120)
    ))
    data = DataConfig(inputs=[str(path)], prepared_dir=str(root / "prepared"), vocab_size=320, seq_len=32,
                      val_fraction=0.1)
    tokenizer, _ = prepare_from_config(data, progress=False)
    return root, data, tokenizer


def test_permutation_lm_task_batches_train_the_model(corpus):
    from minillm import get_task
    from minillm.evaluation import evaluate

    _, data, tokenizer = corpus
    task = get_task("permutation-lm")
    config = preset("tiny-xlnet", vocab_size=tokenizer.vocab_size, d_model=32, n_heads=2, n_layers=2)
    task.check(config, data)
    split = task.datasets(data, tokenizer, config, samples=64)
    assert split.report_split == "validation" and "unigram_entropy" in split.baselines
    loader = torch.utils.data.DataLoader(split.train, batch_size=4, collate_fn=split.collate)
    batch = next(iter(loader))
    P = round(32 / 6)
    assert batch["perm_mask"].shape == (4, 32, 32) and batch["target_mapping"].shape == (4, P, 32)
    positions = batch["target_mapping"].argmax(-1)  # (B, P)
    assert torch.equal(batch["labels"], batch["input_ids"].gather(1, positions))
    again = split.collate([split.train[i] for i in range(4)])  # orders are a function of the index
    assert all(torch.equal(again[k], batch[k]) for k in batch)

    torch.manual_seed(0)
    model = task.build_model(config)
    assert isinstance(model, XLNetLM)
    out, terms = task.forward(model, batch)
    assert out.logits.shape == (4, P, tokenizer.vocab_size)
    assert int(task.target_counts(batch)["loss"]) == 4 * P
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = terms["loss"].item() / (4 * P)
    for _ in range(15):
        optimizer.zero_grad()
        task.forward(model, batch)[1]["loss"].backward()
        optimizer.step()
    assert task.forward(model, batch)[1]["loss"].item() / (4 * P) < first - 0.5  # it learns this batch
    metrics = evaluate(model, task, loader, max_batches=2)
    assert set(metrics) == set(task.metrics)
    with pytest.raises(ValueError, match="ModelConfig.arch: task 'permutation-lm'"):
        task.check(preset("tiny-bert"), data)


def test_xlnet_recipes_and_classifier_from_the_pretrained_body(tmp_path):
    from minillm import get_task
    from minillm.checkpoint import init_from, save_model
    from minillm.recipes import RECIPES
    from minillm.tasks import task_of

    assert RECIPES[("pretrain", "xlnet")].task == "permutation-lm"
    assert RECIPES[("finetune", "xlnet")].task == "classification"
    assert RECIPES[("pretrain", "xlnet")].arch == RECIPES[("finetune", "xlnet")].arch == "xlnet"
    config = preset("tiny-xlnet", vocab_size=64, d_model=32, n_heads=2, n_layers=2)
    torch.manual_seed(0)
    pretrained = XLNetLM(config)
    save_model(tmp_path / "lm", pretrained)
    classifier = get_task("classification").build_model(dataclasses.replace(config, num_labels=3))
    assert isinstance(classifier, XLNetClassifier) and task_of(classifier) == "classification"
    get_task("classification").check_model(classifier)
    result = init_from(classifier, tmp_path / "lm")
    assert sorted(result["fresh"]) == ["classifier.bias", "classifier.weight", "summary.bias", "summary.weight"]
    for name, tensor in pretrained.body.state_dict().items():
        assert torch.equal(classifier.body.state_dict()[name], tensor), name
    ids = torch.randint(7, 64, (2, 9))
    out = classifier(ids, attention_mask=torch.ones(2, 9, dtype=torch.long), labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)
    # LP-FT's probe freezes the embeddings and every block: the head alone trains
    from minillm.lora import apply_finetune_mode
    from minillm.train_config import TrainConfig

    apply_finetune_mode(classifier, TrainConfig(task="classification", finetune_mode="freeze", freeze_layers=2))
    trainable = sorted(name for name, p in classifier.named_parameters() if p.requires_grad)
    assert trainable == ["body.mask_emb", "classifier.bias", "classifier.weight", "summary.bias", "summary.weight"]

