"""Houlsby adapters (finetune_mode="adapter"), prefix tuning ("prefix"), P-tuning v2
("deep-prompt") and prompt tuning ("prompt"): what trains, what is saved and loaded, the KV
cache, padding, and the errors for bad settings. peft's versions: tests/test_peft_methods.py.

Tiny bodies (C=32, 2 blocks, 2 heads, V=64, max_seq_len=16), a BERT-style encoder (post-norm,
segments) and a GPT-style decoder (pre-norm), random with init_std=0.1 so that small changes
show in the logits.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from minillm import checkpoint as ckpt
from minillm.adapters import AdaptedSublayer, adapter_parameter_count, add_adapters
from minillm.config import ModelConfig
from minillm.generation import generate
from minillm.lora import apply_finetune_mode
from minillm.model import token_loss
from minillm.prompts import add_virtual_tokens, fold_prefixes, reparameterisations, unfold_prefixes
from minillm.tasks import build_model
from minillm.train_config import TrainConfig
from minillm.trainer import Trainer, seed_everything

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

V, T_MAX, L, C = 64, 16, 2, 32
METHODS = ("adapter", "prefix", "deep-prompt", "prompt")
VIRTUAL = ("prefix", "deep-prompt", "prompt")
SETTINGS = dict(adapter_size=4, prefix_length=3, prefix_hidden=8, prompt_length=3)


def body_config(arch: str, **overrides) -> ModelConfig:
    fields = dict(arch=arch, vocab_size=V, d_model=C, n_layers=L, n_heads=2, max_seq_len=T_MAX, init_std=0.1,
                  pos_encoding="learned", embed_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0, num_labels=3)
    if arch == "encoder":
        fields.update(norm_placement="post", type_vocab_size=2, activation="gelu")
    else:
        fields.update(norm_placement="pre", activation="gelu_tanh")
    return ModelConfig(**{**fields, **overrides})


def model_for(arch: str, task: str, seed: int = 0):
    seed_everything(seed)
    return build_model(body_config(arch), task).eval()


def batches(task: str, n: int = 3, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, V, (4, 10), generator=g)
        labels = torch.randint(0, 3, (4,), generator=g) if task == "classification" else ids
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def base_checkpoint(tmp_path, arch: str, task: str) -> str:
    out = tmp_path / f"base-{arch}-{task}"
    if not out.exists():
        model = model_for(arch, task)
        ckpt.save_checkpoint(out, 0, model, {}, {"task": task, "model": model.config})
    return str(out)


def settings(mode: str) -> dict:
    """SETTINGS that `mode` uses (the others would be refused as unused by the CLI)."""
    unused = TrainConfig(finetune_mode=mode, init_from="x").fields_without_effect()
    return {k: v for k, v in SETTINGS.items() if k not in unused}


def train_config(tmp_path, mode: str, arch: str, task: str, **overrides) -> TrainConfig:
    metric = "accuracy" if task == "classification" else "val_loss"
    fields = dict(out_dir=str(tmp_path / f"{mode}-{arch}"), task=task, finetune_mode=mode, max_steps=3,
                  warmup_steps=0, lr=3e-2, eval_every=0, log_every=1, progress=False, early_stopping_metric=metric,
                  init_from=base_checkpoint(tmp_path, arch, task), **settings(mode))
    return TrainConfig(**{**fields, **overrides})


def finetune(tmp_path, mode: str, arch: str, task: str, hooks=None, **overrides) -> tuple[Trainer, dict]:
    """Train 3 steps from base_checkpoint; returns the trainer and the state_dict before fit()."""
    config = train_config(tmp_path, mode, arch, task, **overrides)
    trainer = Trainer(model_for(arch, task, seed=1), config, batches(task), hooks=hooks)  # init_from overwrites seed 1
    before = {n: t.clone() for n, t in trainer.raw_model.state_dict().items()}
    trainer.fit()
    return trainer, before


def method_parameter(name: str) -> bool:
    return any(part in name for part in (".adapter.", ".prefix.", ".prompt."))


# =============================================================================================
# Adapters: identity at init, the paper's parameter count
# =============================================================================================


@pytest.mark.parametrize("arch", ["encoder", "decoder"])
def test_adapters_start_as_the_identity(arch):
    task = "classification" if arch == "encoder" else "causal-lm"
    base = model_for(arch, task)
    adapted = copy.deepcopy(base)
    wrapped = add_adapters(adapted, 4)
    assert wrapped == [f"{'body' if arch == 'encoder' else 'decoder'}.blocks.{i}.{s}" for i in range(L)
                       for s in ("attn", "mlp")]
    ids = batches(task)[0]["input_ids"]
    torch.testing.assert_close(adapted(ids).logits, base(ids).logits, rtol=0, atol=0)
    with torch.no_grad():  # a non-zero up-projection must change the output: the adapters are on the path
        for module in adapted.modules():
            if isinstance(module, AdaptedSublayer):
                module.adapter.up.weight.normal_()
    assert (adapted(ids).logits - base(ids).logits).abs().max() > 1e-2


@pytest.mark.parametrize("size", [1, 4, 7])
def test_adapter_parameter_count_is_the_papers(size):
    """Two adapters per block, each with W_down (C m), b_down (m), W_up (m C), b_up (C):
    2 L (2 C m + C + m); plus the classifier head, which trains too."""
    model = model_for("encoder", "classification")
    counts = apply_finetune_mode(model, TrainConfig(finetune_mode="adapter", adapter_size=size, init_from="x",
                                                    task="classification", early_stopping_metric="accuracy"))
    head = sum(p.numel() for p in model.classifier.parameters())
    assert counts["trainable"] == 2 * L * (2 * C * size + C + size) + head
    assert adapter_parameter_count(L, C, size) == 2 * L * (2 * C * size + C + size)


# =============================================================================================
# Training: only the method's parameters (and the head) change, and only they are saved
# =============================================================================================


@pytest.mark.parametrize("mode", METHODS)
@pytest.mark.parametrize("arch,task", [("encoder", "classification"), ("decoder", "causal-lm")])
def test_a_run_trains_and_saves_only_its_parameters_and_loads_on_a_fresh_base(tmp_path, mode, arch, task):
    trainer, before = finetune(tmp_path, mode, arch, task)
    model = trainer.raw_model
    base = {n: t for n, t in model_for(arch, task).state_dict().items()}  # the weights init_from loaded
    after = model.state_dict()
    new = {n for n in after if n.replace(".base.", ".") not in base}  # the method's own modules
    assert new and all(method_parameter(n) for n in new)
    changed = {n for n in after if n not in new and not torch.equal(after[n], base[n.replace(".base.", ".")])}
    head = {n for n in after if n.startswith("classifier.")}
    assert changed == (head if task == "classification" else set())
    assert all(not torch.equal(after[n], before[n]) for n in new)  # every one of them trained
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == new | head

    # What the run saved: only those, and they load on a fresh base (load_model) with the same outputs.
    trained = model.eval()
    weights = ckpt.resolve_checkpoint(trainer.out_dir) / ckpt.WEIGHTS
    with safe_open(weights, framework="pt") as f:
        saved = set(f.keys())
        described = json.loads(f.metadata()["adapter"])
    assert described["method"] == mode
    assert saved and all(method_parameter(n) or n.startswith("classifier.") for n in saved)
    base_file = ckpt.resolve_checkpoint(base_checkpoint(tmp_path, arch, task)) / ckpt.WEIGHTS
    assert weights.stat().st_size < base_file.stat().st_size / 4  # a small file beside the base
    if mode == "prefix":  # the MLP is folded away: only P x 2 L C keys and values
        stack = "body" if arch == "encoder" else "decoder"
        assert {n for n in saved if ".prefix." in n} == {f"{stack}.prefix.key_values"}
        with safe_open(weights, framework="pt") as f:
            assert tuple(f.get_tensor(f"{stack}.prefix.key_values").shape) == (3, 2 * L * C)
    loaded, _, _ = ckpt.load_model(trainer.out_dir)
    batch = batches(task, seed=7)[0]
    batch["attention_mask"][0, 6:] = 0  # a padded row too
    with torch.no_grad():
        expected = trained(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = loaded(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        plain = model_for(arch, task)(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (expected - plain).abs().max() > 1e-4  # the method changed the outputs: the check means something
    ckpt.load_weights(trained, trainer.out_dir)  # back into the trained model (a prefix's MLP is folded first)
    with torch.no_grad():
        again = trained(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(again, expected, rtol=1e-5, atol=1e-5)


def test_an_adapter_run_is_not_a_base_to_start_from(tmp_path):
    trainer, _ = finetune(tmp_path, "deep-prompt", "decoder", "causal-lm", max_steps=1)
    with pytest.raises(ValueError, match="init_from: .* is a 'deep-prompt' run's adapter, which does not merge"):
        ckpt.init_from(model_for("decoder", "causal-lm"), trainer.out_dir)
    with pytest.raises(ValueError, match="save_model: the model has adapters or virtual tokens"):
        ckpt.save_model(tmp_path / "saved", trainer.raw_model)


def test_prefix_fold_keeps_the_keys_and_values():
    model = model_for("decoder", "causal-lm")
    add_virtual_tokens(model, "prefix", 3, prefix_hidden=8)
    ids = batches("causal-lm")[0]["input_ids"]
    before = model(ids).logits
    prefix = model.decoder.prefix
    fold_prefixes(model)
    assert [n for n, _ in prefix.named_parameters()] == ["key_values"]
    assert prefix.key_values.shape == (3, 2 * L * C)
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_unfolding_a_prefix_gives_its_mlp_back_and_checks_it():
    model = model_for("decoder", "causal-lm")
    add_virtual_tokens(model, "prefix", 3, prefix_hidden=8)
    ids = batches("causal-lm")[0]["input_ids"]
    before, saved = model(ids).logits, reparameterisations(model)
    assert sorted(saved) == ["decoder.prefix.mlp.0.bias", "decoder.prefix.mlp.0.weight", "decoder.prefix.mlp.2.bias",
                             "decoder.prefix.mlp.2.weight", "decoder.prefix.prefix_tokens"]
    fold_prefixes(model)
    unfold_prefixes(model, saved)
    assert model.decoder.prefix.key_values is None and sorted(reparameterisations(model)) == sorted(saved)
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    fold_prefixes(model)
    saved["decoder.prefix.prefix_tokens"] = saved["decoder.prefix.prefix_tokens"] + 1.0  # another step's MLP
    with pytest.raises(ValueError, match="the saved MLP of decoder.prefix does not make its saved keys and values"):
        unfold_prefixes(model, saved)


# =============================================================================================
# Causal-LM labels, classification pooling, KV cache, padding
# =============================================================================================


@pytest.mark.parametrize("mode", VIRTUAL)
def test_virtual_positions_are_never_scored_or_pooled(mode):
    """The stack returns the caller's positions only: a causal LM's loss is its own tokens' shifted
    loss, and a classifier pools [CLS] (position 0 of the input), not a virtual token."""
    lm = model_for("decoder", "causal-lm")
    add_virtual_tokens(lm, mode, 3, prefix_hidden=8)
    ids = batches("causal-lm")[0]["input_ids"]
    out = lm(ids, labels=ids)
    assert out.logits.shape == (*ids.shape, V)
    torch.testing.assert_close(out.loss, token_loss(out.logits[:, :-1], ids[:, 1:], "mean"))
    classifier = model_for("encoder", "classification")
    add_virtual_tokens(classifier, mode, 3, prefix_hidden=8)
    out = classifier(ids)
    torch.testing.assert_close(out.logits, classifier.classifier(classifier.pooler(out.hidden_states)))
    assert out.hidden_states.shape[1] == ids.shape[1]


@pytest.mark.parametrize("mode", METHODS)
def test_generation_with_the_kv_cache_equals_without(mode):
    model = model_for("decoder", "causal-lm")
    apply_finetune_mode(model, TrainConfig(finetune_mode=mode, init_from="x", **settings(mode)))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)  # trained-looking values: the up-projection is no longer zero
    ids = torch.randint(3, V, (3, 4), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    cached = generate(model, ids, mask, max_new_tokens=8, use_cache=True)
    uncached = generate(model, ids, mask, max_new_tokens=8, use_cache=False)
    assert torch.equal(cached, uncached)
    assert cached.shape[1] == 4 + 8


def test_generation_window_leaves_room_for_the_virtual_tokens():
    """A prefix takes P of max_seq_len positions: generating past max_seq_len - P tokens slides the
    window (no cache), never past the position table."""
    model = model_for("decoder", "causal-lm")
    add_virtual_tokens(model, "deep-prompt", 5)
    ids = torch.randint(3, V, (1, 8), generator=torch.Generator().manual_seed(3))
    out = generate(model, ids, max_new_tokens=10)
    assert out.shape == (1, 18)


@pytest.mark.parametrize("mode", METHODS)
@pytest.mark.parametrize("arch,task,side", [("encoder", "classification", "right"), ("decoder", "causal-lm", "left"),
                                            ("decoder", "classification", "left")])
def test_a_padded_batch_gives_the_unpadded_logits(mode, arch, task, side):
    model = model_for(arch, task)
    metric = "accuracy" if task == "classification" else "val_loss"
    apply_finetune_mode(model, TrainConfig(finetune_mode=mode, init_from="x", task=task, early_stopping_metric=metric,
                                           **settings(mode)))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    ids = torch.randint(3, V, (1, 6), generator=torch.Generator().manual_seed(4))
    pad = torch.zeros(1, 4, dtype=torch.long)
    padded = torch.cat((pad, ids), 1) if side == "left" else torch.cat((ids, pad), 1)
    mask = (torch.arange(10)[None] >= 4) if side == "left" else (torch.arange(10)[None] < 6)
    with torch.no_grad():
        alone = model(ids).logits
        together = model(padded, attention_mask=mask.long()).logits
    if task == "causal-lm":
        together = together[:, 4:] if side == "left" else together[:, :6]
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


# =============================================================================================
# Bad settings
# =============================================================================================


@pytest.mark.parametrize("field", ["adapter_size", "prefix_length", "prefix_hidden", "prompt_length"])
def test_zero_sizes_are_refused(field):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}: got 0, expected an integer >= 1"):
        TrainConfig(**{field: 0})


@pytest.mark.parametrize("mode,field", [("prefix", "prefix_length"), ("deep-prompt", "prompt_length"),
                                        ("prompt", "prompt_length")])
@pytest.mark.parametrize("length", [T_MAX, T_MAX + 5])
def test_a_virtual_length_that_fills_max_seq_len_is_refused(mode, field, length):
    model = model_for("decoder", "causal-lm")
    config = TrainConfig(finetune_mode=mode, init_from="x", **{field: length})
    with pytest.raises(ValueError, match=f"TrainConfig.{field}: got {length}, expected 1 .. max_seq_len - 1 = 15"):
        apply_finetune_mode(model, config)


def test_a_prefix_without_its_mlp_is_refused():
    with pytest.raises(ValueError, match="TrainConfig.prefix_hidden: got 0, expected an integer >= 1 for a prefix"):
        add_virtual_tokens(model_for("decoder", "causal-lm"), "prefix", 3)


def test_a_sequence_that_does_not_fit_beside_the_prompt_is_refused():
    model = model_for("decoder", "causal-lm")
    add_virtual_tokens(model, "prompt", 4)
    model(torch.randint(3, V, (1, T_MAX - 4)))  # fits exactly
    with pytest.raises(ValueError, match="plus the 4 virtual tokens of the prompt/prefix exceeds max_seq_len=16"):
        model(torch.randint(3, V, (1, T_MAX - 3)))


@pytest.mark.parametrize("mode", METHODS)
def test_these_modes_need_a_base(mode):
    with pytest.raises(ValueError, match=f"TrainConfig.init_from: got None, expected a pretrained checkpoint when "
                                         f"finetune_mode='{mode}'"):
        TrainConfig(finetune_mode=mode)


@pytest.mark.parametrize("mode,unused", [("adapter", {"prefix_length", "prefix_hidden", "prompt_length"}),
                                         ("prefix", {"adapter_size", "prompt_length"}),
                                         ("deep-prompt", {"adapter_size", "prefix_length", "prefix_hidden"}),
                                         ("prompt", {"adapter_size", "prefix_length", "prefix_hidden"}),
                                         ("lora", {"adapter_size", "prefix_length", "prefix_hidden", "prompt_length"})])
def test_the_other_modes_options_are_reported_unused(mode, unused):
    reported = set(TrainConfig(finetune_mode=mode, init_from="x").fields_without_effect())
    mine = {"adapter_size", "prefix_length", "prefix_hidden", "prompt_length"}
    assert reported & mine == unused


def test_encoder_decoder_models_are_refused():
    seed_everything(0)
    model = build_model(ModelConfig(arch="encoder-decoder", vocab_size=V, d_model=C, n_layers=1, n_heads=2,
                                    max_seq_len=T_MAX), "seq2seq")
    with pytest.raises(ValueError, match="need an encoder \\(BERT\\) or decoder \\(GPT\\) model, got arch='encoder-decoder'"):
        add_virtual_tokens(model, "prompt", 2)
    with pytest.raises(ValueError, match="has cross-attention"):
        add_adapters(model, 2)


def stop_at_2(trainer, row):
    trainer.should_stop = trainer.step == 2


@pytest.mark.parametrize("mode", METHODS)
def test_a_run_resumes_exactly(tmp_path, mode):
    """Stop at step 2 of 3 and resume: the same weights as 3 steps at once. Resuming loads the base
    again (init_from), adds the method's modules and loads the saved ones; a prefix run's MLP comes
    back from the training state (its weights file holds only the folded prefix)."""
    straight, _ = finetune(tmp_path / "a", mode, "decoder", "causal-lm")
    cut, _ = finetune(tmp_path / "b", mode, "decoder", "causal-lm", hooks={"on_step_end": stop_at_2})
    resumed = Trainer(model_for("decoder", "causal-lm", seed=7), dataclasses.replace(cut.config, resume=True),
                      batches("causal-lm"))
    assert resumed.step == 2
    resumed.fit()
    expected, got = straight.raw_model.state_dict(), resumed.raw_model.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(got[n], t) for n, t in expected.items())
