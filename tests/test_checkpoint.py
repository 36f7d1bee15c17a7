"""Checkpoints: SIGKILL mid-save, tied weights, weights_only state, loading, pretrained
initialisation across tasks, and the errors for a missing checkpoint, a truncated or corrupt file,
another architecture and another vocabulary. The run directory around them: tests/test_run_dir.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from minillm import checkpoint as ckpt
from minillm.config import ModelConfig
from minillm.tasks import build_model
from minillm.tokenizer import Tokenizer
from minillm.train_config import TrainConfig
from minillm.trainer import Trainer, seed_everything

ROOT = Path(__file__).resolve().parents[1]


def tiny(vocab_size: int = 100, **overrides) -> ModelConfig:
    fields = dict(vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=2, max_seq_len=16)
    return ModelConfig(**{**fields, **overrides})


def model_for(task: str = "causal-lm", seed: int = 0, **overrides):
    seed_everything(seed)
    arch = {"causal-lm": "decoder", "seq2seq": "encoder-decoder"}.get(task, "encoder")
    return build_model(tiny(**{"arch": arch, **overrides}), task)


def save(out_dir: Path, step: int, model, tokenizer=None) -> Path:
    return ckpt.save_checkpoint(out_dir, step, model, {"step": step, "data": {"position": step}},
                                {"task": "causal-lm", "model": model.config}, tokenizer)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [f"the quick brown fox number {i} jumps over the lazy dog {i * 7}" for i in range(200)]
    return Tokenizer.train(texts, tmp_path_factory.mktemp("tok") / "tok", vocab_size=320, n_sentinels=0, num_threads=1)


# =============================================================================================
# Atomicity
# =============================================================================================

CRASHING_SAVE = textwrap.dedent("""
    import os, sys, torch
    from minillm import checkpoint as ckpt
    from minillm.config import ModelConfig
    from minillm.tasks import build_model
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=2, max_seq_len=16), "causal-lm")
    configs = {"task": "causal-lm", "model": model.config}
    ckpt.save_checkpoint(sys.argv[1], 1, model, {"step": 1}, configs)
    torch.save(model.state_dict(), os.path.join(sys.argv[1], "expected.pt"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the second checkpoint holds other weights
    os.environ["MINILLM_CHECKPOINT_CRASH_AT"] = sys.argv[2]
    ckpt.save_checkpoint(sys.argv[1], 2, model, {"step": 2}, configs)
    print("not killed")
""")


@pytest.mark.parametrize("point", ["after_weights", "before_rename", "before_latest"])
def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path, point):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", CRASHING_SAVE, str(out), point], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode == -9, result.stdout + result.stderr  # SIGKILL
    assert (out / "latest").read_text().strip() == "step_000001"
    model, configs, tokenizer = ckpt.load_model(out)
    expected = torch.load(out / "expected.pt", weights_only=True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert tokenizer is None and configs["task"] == "causal-lm"
    # The next run, resumed or not, starts by deleting what the killed save left behind.
    leftovers = [p.name for p in out.iterdir() if p.name.startswith((".tmp-", ".latest"))]
    assert leftovers == {"after_weights": [".tmp-step_000002"], "before_rename": [".tmp-step_000002"]}.get(point, [])
    assert ckpt.prepare_run_dir(out, resume=True, overwrite=False) == out / "step_000001"
    assert not [p.name for p in out.iterdir() if p.name.startswith((".tmp-", ".latest"))]
    # The run can go on: the next save replaces whatever the killed one left behind.
    fresh = model_for()
    path = save(out, 2, fresh)
    assert ckpt.latest_checkpoint(out) == path
    assert not (out / ".tmp-step_000002").exists()
    assert torch.equal(ckpt.load_model(out)[0].lm_head.weight, fresh.lm_head.weight)


# =============================================================================================
# Contents
# =============================================================================================


def test_tied_weights_are_saved_once_and_tied_again(tmp_path):
    model = model_for()
    path = save(tmp_path, 5, model)
    from safetensors import safe_open

    with safe_open(path / ckpt.WEIGHTS, framework="pt") as f:
        keys = set(f.keys())
        ties = json.loads(f.metadata()["ties"])
    assert ties == {"lm_head.weight": "decoder.embeddings.token.weight"} and "lm_head.weight" not in keys
    loaded, _, _ = ckpt.load_model(path)
    assert loaded.lm_head.weight is loaded.decoder.embeddings.token.weight  # one tensor again
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    ids = torch.randint(7, 100, (2, 9))
    torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)


def test_state_loads_with_weights_only_and_holds_everything_to_resume(tmp_path):
    seed_everything(0)
    model = build_model(tiny(), "causal-lm")
    data = [{"input_ids": torch.randint(7, 100, (2, 8)), "labels": torch.randint(7, 100, (2, 8))}] * 3
    config = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=2, warmup_steps=0, progress=False, eval_every=0)
    Trainer(model, config, data).fit()
    checkpoint = ckpt.latest_checkpoint(tmp_path / "run")
    state = torch.load(checkpoint / ckpt.STATE, weights_only=True)
    assert state["step"] == 2 and state["data"]["micro_batches"] == 2
    assert {"optimizer", "scaler", "rng", "data", "best_value"} <= set(state)
    assert state["optimizer"]["state"] and isinstance(state["rng"][0]["torch"], torch.Tensor)
    configs = json.loads((checkpoint / ckpt.CONFIG).read_text())
    assert configs["task"] == "causal-lm" and configs["model"]["d_model"] == 32 and configs["train"]["max_steps"] == 2


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = ckpt.rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1))
    ckpt.set_rng_state(torch.load(_roundtrip(state), weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1)) == first


def _roundtrip(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def test_best_link_and_pruning(tmp_path):
    model = model_for()
    for step in (1, 2, 3, 4):
        path = save(tmp_path, step, model)
        if step == 2:
            ckpt.mark_best(tmp_path, path)
        ckpt.prune_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000002", "step_000004"]
    assert ckpt.resolve_checkpoint(tmp_path / "best").resolve() == (tmp_path / "step_000002").resolve()
    assert ckpt.load_model(tmp_path / "best")[0] is not None


# =============================================================================================
# Errors
# =============================================================================================


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no checkpoint at {tmp_path / 'nope'}"):
        ckpt.load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'empty'} holds neither model.safetensors nor a 'latest'"):
        ckpt.load_model(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "latest").write_text("step_000009\n")
    with pytest.raises(FileNotFoundError, match="names .*step_000009"):
        ckpt.load_model(tmp_path / "broken")


# Each loader and the files it reads.
LOADERS = {
    "read_weights": (lambda path: ckpt.read_weights(path), [ckpt.WEIGHTS]),
    "load_weights": (lambda path: ckpt.load_weights(model_for(), path), [ckpt.CONFIG, ckpt.WEIGHTS]),
    "load_state": (lambda path: ckpt.load_state(path), [ckpt.STATE]),
    "read_configs": (lambda path: ckpt.read_configs(path), [ckpt.CONFIG]),
    "load_model": (lambda path: ckpt.load_model(path), [ckpt.CONFIG, ckpt.WEIGHTS]),
    "init_from": (lambda path: ckpt.init_from(model_for(), path), [ckpt.CONFIG, ckpt.WEIGHTS]),
}


@pytest.mark.parametrize("loader, file", [(name, file) for name, (_, files) in LOADERS.items() for file in files])
def test_a_truncated_checkpoint_file_is_named(tmp_path, loader, file):
    """A file cut to half its bytes (a full disk, an interrupted copy) is a ValueError naming it,
    whatever the format's own error is (SafetensorError, a zip RuntimeError, JSONDecodeError)."""
    path = save(tmp_path / "run", 100, model_for())
    data = (path / file).read_bytes()
    (path / file).write_bytes(data[: len(data) // 2])
    load, _ = LOADERS[loader]
    with pytest.raises(ValueError, match=rf"^checkpoint: {path / file} is truncated or corrupt \(\w+: .+\)$"):
        load(tmp_path / "run")


def test_a_checkpoint_file_of_garbage_is_named(tmp_path):
    path = save(tmp_path, 1, model_for())
    (path / ckpt.STATE).write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=f"checkpoint: {path / ckpt.STATE} is truncated or corrupt"):
        ckpt.load_state(path)
    (path / ckpt.CONFIG).write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"checkpoint: {path / ckpt.CONFIG} holds a JSON list, not an object"):
        ckpt.load_model(path)


def test_architecture_mismatch_names_the_fields(tmp_path):
    path = save(tmp_path, 1, model_for())
    other = build_model(tiny(d_model=64, n_layers=3), "causal-lm")
    expected = r"different architecture: d_model: checkpoint 32, model 64; n_layers: checkpoint 2, model 3"
    with pytest.raises(ValueError, match=expected):
        ckpt.load_weights(other, path)
    with pytest.raises(ValueError, match="different architecture: d_model"):
        ckpt.init_from(other, path)
    # Runtime fields (dropout, backends) may differ.
    ckpt.load_weights(build_model(tiny(resid_dropout=0.2, attn_backend="reference"), "causal-lm"), path)


def test_vocab_mismatch_is_clear(tmp_path, tokenizer):
    n = tokenizer.vocab_size
    assert n != 100
    path = save(tmp_path / "a", 1, model_for())
    with pytest.raises(ValueError, match=f"init_from.*tokenizer has {n} pieces but the model's vocab_size is 100"):
        ckpt.init_from(model_for(), path, tokenizer)
    # A checkpoint saved with its tokenizer loads with it...
    good = model_for(vocab_size=n)
    path = save(tmp_path / "b", 1, good, tokenizer)
    loaded, _, tok = ckpt.load_model(path)
    assert tok.vocab_size == loaded.config.vocab_size == n
    # ...and one whose config no longer fits its tokenizer says so.
    (path / "config.json").write_text(json.dumps({"task": "causal-lm", "model": tiny(vocab_size=100).to_dict()}))
    with pytest.raises(ValueError, match=f"load_model.*tokenizer has {n} pieces but the model's vocab_size is 100"):
        ckpt.load_model(path)
    (path / "config.json").write_text(json.dumps({"task": "causal-lm", "model": good.config.to_dict()}))
    # A different tokenizer of the right size is refused too when initialising from a checkpoint.
    other = Tokenizer.train([f"completely different words {i} zebra yak" for i in range(300)], tmp_path / "other",
                            vocab_size=n, n_sentinels=0, num_threads=1)
    with pytest.raises(ValueError, match="tokenizer differs from the one saved"):
        ckpt.init_from(model_for(vocab_size=n), tmp_path / "b" / "step_000001", other)
    # A weight whose shape disagrees with the config is named.
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / ckpt.WEIGHTS)
    tensors["decoder.blocks.0.mlp.fc_in.bias"] = tensors["decoder.blocks.0.mlp.fc_in.bias"][:10]
    ties = json.dumps({"lm_head.weight": "decoder.embeddings.token.weight"})
    save_file(tensors, path / ckpt.WEIGHTS, metadata={"format": "pt", "ties": ties})
    with pytest.raises(ValueError, match=r"decoder.blocks.0.mlp.fc_in.bias has shape \(10,\), the model expects \(128,\)"):
        ckpt.load_model(path)


# =============================================================================================
# Initialising from pretrained weights
# =============================================================================================


def test_init_from_an_mlm_checkpoint_into_a_classifier(tmp_path):
    pretrained = model_for("mlm-nsp", type_vocab_size=2)
    config = TrainConfig(out_dir=str(tmp_path / "pre"), task="mlm-nsp", early_stopping_metric="val_loss")
    configs = {"task": "mlm-nsp", "model": pretrained.config, "train": config}
    path = ckpt.save_checkpoint(tmp_path / "pre", 1, pretrained, {}, configs)
    classifier = model_for("classification", seed=1, type_vocab_size=2, num_labels=3)
    head_before = classifier.classifier.weight.clone()
    report = ckpt.init_from(classifier, path)
    assert torch.equal(classifier.body.blocks[1].mlp.fc_in.weight, pretrained.encoder.blocks[1].mlp.fc_in.weight)
    assert torch.equal(classifier.body.embeddings.token.weight, pretrained.encoder.embeddings.token.weight)
    assert torch.equal(classifier.pooler.dense.weight, pretrained.pooler.dense.weight)  # BERT's pooler carries over
    assert torch.equal(classifier.classifier.weight, head_before)
    assert sorted(report["fresh"]) == ["classifier.bias", "classifier.weight"]
    # Same task: every weight.
    same = model_for("mlm-nsp", seed=2, type_vocab_size=2)
    assert ckpt.init_from(same, path)["fresh"] == []
    assert torch.equal(same.mlm_head.dense.weight, pretrained.mlm_head.dense.weight)


def test_init_from_an_mlm_checkpoint_into_a_mean_pooling_classifier_skips_the_pooler(tmp_path):
    pretrained = model_for("mlm-nsp", type_vocab_size=2)
    config = TrainConfig(out_dir=str(tmp_path / "pre"), task="mlm-nsp", early_stopping_metric="val_loss")
    path = ckpt.save_checkpoint(tmp_path / "pre", 1, pretrained, {}, {"task": "mlm-nsp", "model": pretrained.config, "train": config})
    classifier = model_for("classification", seed=1, type_vocab_size=2, num_labels=3, classifier_pooling="mean")
    report = ckpt.init_from(classifier, path)
    assert classifier.pooler is None and sorted(report["fresh"]) == ["classifier.bias", "classifier.weight"]
    assert torch.equal(classifier.body.blocks[0].attn.q_proj.weight, pretrained.encoder.blocks[0].attn.q_proj.weight)


def test_init_from_a_hugging_face_directory_in_the_trainer(tmp_path):
    from minillm.convert import save_hf

    fields = dict(pad_token_id=0, type_vocab_size=2, norm_placement="post")
    mlm = model_for("mlm", **fields)
    hf_dir = save_hf(mlm, tmp_path / "hf")  # config.json + model.safetensors, as transformers writes them
    config = TrainConfig(out_dir=str(tmp_path / "ft"), task="classification", init_from=str(hf_dir),
                         early_stopping_metric="accuracy", progress=False, max_steps=1)
    batches = [{"input_ids": torch.randint(7, 100, (4, 8)), "labels": torch.tensor([0, 1, 1, 0])}]
    trainer = Trainer(model_for("classification", seed=3, **fields), config, batches)
    body = trainer.raw_model.body
    assert torch.equal(body.blocks[0].attn.q_proj.weight, mlm.encoder.blocks[0].attn.q_proj.weight)
    assert torch.equal(body.embeddings.token_type.weight, mlm.encoder.embeddings.token_type.weight)
    with pytest.raises(ValueError, match="different architecture: n_layers: checkpoint 2, model 3"):
        ckpt.init_from(model_for("classification", n_layers=3, **fields), hf_dir)


def test_a_checkpoint_from_before_the_t5_fields_loads(tmp_path):
    """A config.json written before ModelConfig had T5's fields (attn_scale, d_head, ...) is the
    model those fields' defaults describe: it loads, and its weights fit."""
    import json

    from minillm import build_model, preset
    from minillm.checkpoint import load_model, load_weights, save_model

    model = build_model(preset("tiny", n_layers=1, vocab_size=64), "causal-lm").eval()
    save_model(tmp_path / "old", model)
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    for field in ("attn_scale", "d_head", "ff_dropout", "final_dropout", "relative_buckets",
                  "relative_max_distance", "scale_decoder_output"):
        del config["model"][field]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    loaded, _, _ = load_model(tmp_path / "old")
    ids = torch.randint(0, 64, (1, 7))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    load_weights(build_model(preset("tiny", n_layers=1, vocab_size=64), "causal-lm"), tmp_path / "old")
