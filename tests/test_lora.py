"""Fine-tuning modes (LoRA, BitFit, freeze), LoRA merging, LoRA runs' adapter-only checkpoints,
optimizer groups and the LR schedule."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch

from minillm import checkpoint as ckpt
from minillm.config import ModelConfig
from minillm.lora import LoRALinear, add_lora, apply_finetune_mode, merge_lora
from minillm.tasks import build_model
from minillm.optim import lr_at, parameter_groups
from minillm.train_config import TrainConfig
from minillm.trainer import Trainer, seed_everything


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def classifier(seed: int = 0, **overrides):
    seed_everything(seed)
    fields = dict(arch="encoder", vocab_size=100, d_model=32, n_layers=3, n_heads=2, max_seq_len=16, num_labels=3,
                  type_vocab_size=2, activation="swiglu")
    return build_model(ModelConfig(**{**fields, **overrides}), "classification")


def batches(n: int = 4, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(7, 100, (4, 10), generator=g), "attention_mask": torch.ones(4, 10, dtype=torch.long),
             "labels": torch.randint(0, 3, (4,), generator=g)} for _ in range(n)]


def base_run(tmp_path, seed: int = 0, **overrides) -> str:
    """A checkpoint of classifier(seed) as it is built: the base a LoRA run starts from."""
    out = tmp_path / f"base-{seed}"
    if not out.exists():
        model = classifier(seed, **overrides)
        ckpt.save_checkpoint(out, 0, model, {}, {"task": "classification", "model": model.config})
    return str(out)


def replace_base(tmp_path, model) -> None:
    """Overwrite base_run's checkpoint (same path) with `model`'s weights."""
    shutil.rmtree(tmp_path / "base-0")
    ckpt.save_checkpoint(tmp_path / "base-0", 0, model, {}, {"task": "classification", "model": model.config})


def finetune(tmp_path, mode: str, before_training=None, **overrides) -> tuple[dict, Trainer]:
    """Train 3 steps in `mode` (LoRA: from base_run, the same weights); returns ({name: changed?}, trainer)."""
    if mode == "lora" and "init_from" not in overrides:
        overrides["init_from"] = base_run(tmp_path)
    config = TrainConfig(out_dir=str(tmp_path / mode), task="classification", finetune_mode=mode, max_steps=3,
                         warmup_steps=0, lr=1e-2, weight_decay=0.1, eval_every=0, progress=False,
                         early_stopping_metric="accuracy", **overrides)
    model = classifier()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model, config, batches(), before_training=before_training)
    trainer.fit()
    # LoRA moves a wrapped layer's weight to <layer>.base.weight
    after = {n.replace(".base.", "."): p for n, p in trainer.raw_model.named_parameters()}
    changed = {n: not torch.equal(after[n], before[n]) for n in before}
    changed.update({n: True for n in after if n not in before})  # new parameters (LoRA A, B)
    return changed, trainer


def test_lora_trains_only_its_parameters_and_the_head(tmp_path):
    changed, trainer = finetune(tmp_path, "lora", lora_rank=4, lora_alpha=8.0)
    model = trainer.raw_model
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    # 4 attention projections + 3 SwiGLU projections in each of 3 blocks
    targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_gate", "fc_out")
    assert len(wrapped) == 3 * 7 and all(n.split(".")[-1] in targets for n in wrapped)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(model.named_parameters()) if "lora_" in n or n.startswith("classifier.")}
    moved = {n for n, c in changed.items() if c}
    assert moved == trainable  # everything trainable moved (B from zero), nothing else did
    assert "body.blocks.0.attn.q_proj.weight" in changed and "body.blocks.0.attn.q_proj.weight" not in moved
    assert trainer.trainable["trainable"] == sum(p.numel() for n, p in model.named_parameters() if n in trainable)


def test_merged_lora_model_equals_the_unmerged_one(tmp_path):
    _, trainer = finetune(tmp_path, "lora", lora_rank=4, lora_alpha=8.0, lora_dropout=0.1)
    model = trainer.raw_model.eval()
    assert any(m.lora_B.abs().max() > 0 for m in model.modules() if isinstance(m, LoRALinear))
    batch = batches(1, seed=5)[0]
    unmerged = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(classifier().state_dict())  # plain model layout again
    torch.testing.assert_close(merged(**{k: v for k, v in batch.items() if k != "labels"}).logits, unmerged,
                               rtol=1e-5, atol=1e-6)
    # A LoRA checkpoint loads back merged, with the same outputs...
    loaded, configs, _ = ckpt.load_model(tmp_path / "lora")
    assert configs["train"]["finetune_mode"] == "lora"
    torch.testing.assert_close(loaded(**{k: v for k, v in batch.items() if k != "labels"}).logits, unmerged,
                               rtol=1e-5, atol=1e-6)
    # ...and initialises a further fine-tune with its merged weights.
    again = classifier(seed=4)
    ckpt.init_from(again, tmp_path / "lora")
    torch.testing.assert_close(again.eval()(**{k: v for k, v in batch.items() if k != "labels"}).logits, unmerged,
                               rtol=1e-5, atol=1e-6)


def logits(model, batch: dict) -> torch.Tensor:
    return model.eval()(**{k: v for k, v in batch.items() if k != "labels"}).logits


# =============================================================================================
# A LoRA run's checkpoint: the adapter alone, on top of its base
# =============================================================================================


def test_a_lora_run_saves_only_the_adapter(tmp_path):
    """What trained (A, B of every wrapped layer, the head) and how to find the base: not the
    full weights under LoRA's names, as it used to."""
    _, trainer = finetune(tmp_path, "lora", lora_rank=4, lora_alpha=8.0)
    saved = ckpt.latest_checkpoint(tmp_path / "lora")
    names = set(ckpt.read_weights(saved))
    trainable = {n for n, p in trainer.raw_model.named_parameters() if p.requires_grad}
    assert names == trainable and all("lora_" in n or n.startswith("classifier.") for n in names)
    adapter = ckpt.read_adapter(tmp_path / "lora")
    wrapped = [n for n, m in trainer.raw_model.named_modules() if isinstance(m, LoRALinear)]
    assert (adapter.rank, adapter.alpha, adapter.targets) == (4, 8.0, wrapped) and len(wrapped) == 3 * 7
    base = tmp_path / "base-0" / "step_000000"
    assert adapter.base == str(tmp_path / "base-0") and adapter.base_checkpoint == str(base.resolve())
    assert len(adapter.base_sha256) == 64
    size, full = (saved / ckpt.WEIGHTS).stat().st_size, (base / ckpt.WEIGHTS).stat().st_size
    assert size < full / 4, (size, full)


def test_a_lora_run_loads_on_its_base_merged_or_not_and_refuses_another_base(tmp_path):
    _, trainer = finetune(tmp_path, "lora", lora_rank=4, lora_alpha=8.0)
    batch = batches(1, seed=5)[0]
    trained = logits(trainer.raw_model, batch)
    unmerged, _, _ = ckpt.load_model(tmp_path / "lora", merge_lora=False)
    assert sum(isinstance(m, LoRALinear) for m in unmerged.modules()) == 3 * 7
    torch.testing.assert_close(logits(unmerged, batch), trained, rtol=0, atol=0)  # the very same tensors
    merged, _, _ = ckpt.load_model(tmp_path / "lora", merge_lora=True)  # what an export reads
    assert set(merged.state_dict()) == set(classifier().state_dict())  # plain weights
    torch.testing.assert_close(logits(merged, batch), trained, rtol=1e-5, atol=1e-6)

    # On a base model object you hold: the same; on another base: refused, and left untouched.
    on_base = ckpt.load_adapter(classifier(seed=0), tmp_path / "lora")
    torch.testing.assert_close(logits(on_base, batch), trained, rtol=0, atol=0)
    other = classifier(seed=1)
    with pytest.raises(ValueError, match="a different base model"):
        ckpt.load_adapter(other, tmp_path / "lora")
    assert not any(isinstance(m, LoRALinear) for m in other.modules())
    with pytest.raises(ValueError, match=r"holds a LoRA adapter and this model has no LoRA layers; use load_adapter"):
        ckpt.load_weights(classifier(), tmp_path / "lora")
    # The base checkpoint now holds other weights: loading the run says so.
    replace_base(tmp_path, other)
    with pytest.raises(ValueError, match="a different base model"):
        ckpt.load_model(tmp_path / "lora")


def test_lora_resume_is_bit_exact_and_checks_the_base(tmp_path):
    """Stop at step 3 and resume to 6: the same losses and adapter as 6 steps at once. The resumed
    run loads its base again (init_from) and the adapter on top, with dropout's RNG restored."""
    settings = dict(task="classification", finetune_mode="lora", lora_rank=4, lora_alpha=8.0, lora_dropout=0.1,
                    init_from=base_run(tmp_path, resid_dropout=0.1), max_steps=6, warmup_steps=0, lr=1e-2,
                    eval_every=0, log_every=1, progress=False, early_stopping_metric="accuracy")
    full = Trainer(classifier(0, resid_dropout=0.1), TrainConfig(out_dir=str(tmp_path / "full"), **settings), batches())
    full.fit()

    def stop_at_3(trainer, row):
        trainer.should_stop = trainer.step == 3

    cut = TrainConfig(out_dir=str(tmp_path / "cut"), **settings)
    Trainer(classifier(0, resid_dropout=0.1), cut, batches(), hooks={"on_step_end": stop_at_3}).fit()
    assert ckpt.latest_checkpoint(tmp_path / "cut").name == "step_000003"
    # Another seed's weights: resuming must replace the base (init_from) and the adapter (checkpoint).
    resumed = Trainer(classifier(7, resid_dropout=0.1), dataclasses.replace(cut, resume=True), batches())
    assert resumed.step == 3
    resumed.fit()

    def losses(name: str) -> list[float]:
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r["kind"] == "train"]

    assert len(losses("full")) == 6 and losses("cut") == losses("full") and losses("full")[0] != losses("full")[-1]
    expected, got = full.raw_model.state_dict(), resumed.raw_model.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(got[n], t) for n, t in expected.items())

    # Resuming on top of a base whose weights have changed since is refused.
    replace_base(tmp_path, classifier(seed=1, resid_dropout=0.1))
    with pytest.raises(ValueError, match="a different base model"):
        Trainer(classifier(0, resid_dropout=0.1), dataclasses.replace(cut, resume=True), batches())


def test_an_adapter_holds_what_its_base_does_not_give(tmp_path):
    """From an MLM base, the classifier's pooler is fresh (and frozen by LoRA); a norm that a probe
    trained before LoRA is not the base's either: both are saved, so the run reloads exactly."""
    mlm = build_model(classifier().config, "mlm")
    ckpt.save_checkpoint(tmp_path / "mlm", 0, mlm, {}, {"task": "mlm", "model": mlm.config})

    def probe(model):  # as LP-FT's probe would: train (here: shift) the final norm before LoRA
        with torch.no_grad():
            model.body.final_norm.weight.add_(0.5)

    _, trainer = finetune(tmp_path, "lora", before_training=probe, init_from=str(tmp_path / "mlm"))
    names = set(ckpt.read_weights(tmp_path / "lora"))
    assert {"pooler.dense.weight", "body.final_norm.weight"} <= names
    assert not trainer.raw_model.body.final_norm.weight.requires_grad  # frozen, yet saved
    assert not any(n.startswith("body.embeddings.") or ".base." in n for n in names)
    batch = batches(1, seed=5)[0]
    loaded, _, _ = ckpt.load_model(tmp_path / "lora", merge_lora=False)
    torch.testing.assert_close(logits(loaded, batch), logits(trainer.raw_model, batch), rtol=0, atol=0)


def test_lora_needs_a_base():
    with pytest.raises(ValueError, match=r"TrainConfig.init_from: got None, expected a pretrained checkpoint"):
        TrainConfig(finetune_mode="lora")


def test_lora_starts_as_the_original_model():
    model = classifier().eval()
    batch = batches(1)[0]
    before = model(batch["input_ids"]).logits
    add_lora(model, rank=2, alpha=4.0)
    torch.testing.assert_close(model(batch["input_ids"]).logits, before, rtol=0, atol=0)  # B = 0


def test_bitfit_trains_biases_and_the_head(tmp_path):
    changed, trainer = finetune(tmp_path, "bitfit")
    moved = {n for n, c in changed.items() if c}
    expected = {n for n, p in trainer.raw_model.named_parameters() if n.endswith("bias") or n.startswith("classifier.")}
    assert moved == expected


def test_freeze_first_layers(tmp_path):
    changed, _ = finetune(tmp_path, "freeze", freeze_layers=2)
    moved = {n for n, c in changed.items() if c}
    frozen = {n for n in changed if n.startswith(("body.embeddings.", "body.blocks.0.", "body.blocks.1."))}
    assert frozen and not (moved & frozen)
    assert moved == set(changed) - frozen
    with pytest.raises(ValueError, match="TrainConfig.freeze_layers: got 5, but the model has 3 blocks"):
        apply_finetune_mode(classifier(), TrainConfig(finetune_mode="freeze", freeze_layers=5))


# =============================================================================================
# Optimizer groups and the schedule
# =============================================================================================


def test_no_decay_on_biases_norms_embeddings_and_layerwise_lr():
    model = classifier()
    config = TrainConfig(task="classification", early_stopping_metric="accuracy", layer_lr_decay=0.5, weight_decay=0.1)
    groups = parameter_groups(model, config)
    names = {id(p): n for n, p in model.named_parameters()}
    scale, decay = {}, {}
    for group in groups:
        for p in group["params"]:
            scale[names[id(p)]], decay[names[id(p)]] = group["lr_scale"], group["weight_decay"]
    assert len(scale) == len(list(model.parameters()))  # every parameter exactly once
    assert decay["body.blocks.0.attn.q_proj.weight"] == 0.1 and decay["body.blocks.0.attn.q_proj.bias"] == 0.0
    assert decay["body.embeddings.token.weight"] == 0.0 and decay["body.blocks.2.mlp_norm.weight"] == 0.0
    L = 3  # blocks; depth 0 embeddings, i + 1 block i, L + 1 pooler and classifier
    assert scale["classifier.weight"] == 1.0 and scale["pooler.dense.weight"] == 1.0
    assert scale["body.blocks.2.mlp.fc_in.weight"] == 0.5
    assert scale["body.blocks.0.mlp.fc_in.weight"] == 0.5**L
    assert scale["body.embeddings.token.weight"] == 0.5 ** (L + 1)


def test_lr_schedule():
    cosine = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110, schedule="cosine")
    assert lr_at(0, cosine) == pytest.approx(0.1) and lr_at(9, cosine) == pytest.approx(1.0)
    assert lr_at(10, cosine) == pytest.approx(1.0)
    assert lr_at(60, cosine) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos(pi/2) = 0
    assert lr_at(110, cosine) == pytest.approx(0.1) and lr_at(500, cosine) == pytest.approx(0.1)
    linear = TrainConfig(lr=2.0, min_lr_ratio=0.0, warmup_steps=0, max_steps=100, schedule="linear")
    assert lr_at(25, linear) == pytest.approx(1.5)
    constant = TrainConfig(lr=2.0, warmup_steps=4, max_steps=100, schedule="constant")
    assert lr_at(1, constant) == pytest.approx(1.0) and lr_at(99, constant) == 2.0
    values = [lr_at(s, cosine) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay
    assert math.isclose(min(values), 0.1)
