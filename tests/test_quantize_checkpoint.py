"""`minillm quantize` end to end on a tiny trained run: the quantized checkpoint is smaller on disk,
`evaluate` scores it close to the float one, `generate` samples from it, and every bad setting
is a one-line error that leaves nothing on disk."""

from __future__ import annotations

import json
import re

import pytest
import safetensors.torch

from minillm import checkpoint as ckpt
from minillm.quantized import QuantizedLinear
from test_cli import TINY_TRAIN, data_args, one_line_error, run, work  # noqa: F401  (work: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

MODEL = ["--model.n_layers=2", "--model.d_model=64", "--model.n_heads=2", "--model.max_seq_len=64"]


@pytest.fixture(scope="module")
def gpt_run(work):  # noqa: F811
    out_dir = work / "gpt-quant"
    code, out, err = run("pretrain", *MODEL, *data_args(work), *TINY_TRAIN, "--train.max_steps=10",
                         "--train.eval_every=0", f"--train.out_dir={out_dir}")
    assert code == 0, err
    return out_dir


@pytest.fixture(scope="module")
def float_loss(gpt_run) -> float:
    return val_loss(gpt_run)


def val_loss(checkpoint) -> float:
    code, out, err = run("evaluate", "--checkpoint", checkpoint, "--max-batches", 4)
    assert code == 0, err
    return float(re.search(r"val_loss (\d+\.\d+)", out).group(1))


@pytest.mark.parametrize("bits,extra,tolerance", [
    (8, [], 0.01), (4, ["--group-size", "32", "--scheme", "asymmetric"], 0.15)])
def test_quantized_checkpoint_is_smaller_and_scores_close(gpt_run, float_loss, tmp_path, bits, extra, tolerance):
    out = tmp_path / f"int{bits}"
    code, stdout, err = run("quantize", "--checkpoint", gpt_run, "--bits", bits, *extra, "--out", out)
    assert code == 0, err
    assert "12 linear layers" in stdout and "MB ->" in stdout
    source = ckpt.resolve_checkpoint(gpt_run)
    before, after = (source / ckpt.WEIGHTS).stat().st_size, (out / ckpt.WEIGHTS).stat().st_size
    # The blocks' projections are ~2/3 of this model's weights; the rest (embeddings) stays float32.
    assert after < before * (0.6 if bits == 8 else 0.5), (before, after)
    config = json.loads((out / "config.json").read_text())
    spec = config["quantization"]
    assert spec["bits"] == bits and spec["source"] == str(source.resolve()) and len(spec["layers"]) == 12
    assert spec["group_size"] == (None if bits == 8 else 32)
    assert "train" not in config and config["data"] == ckpt.read_configs(source)["data"]
    assert abs(val_loss(out) - float_loss) < tolerance

    model, configs, tokenizer = ckpt.load_model(out)
    layers = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert layers == set(spec["layers"]) and tokenizer is not None
    saved = safetensors.torch.load_file(out / ckpt.WEIGHTS)
    assert any(name.endswith(".scales") for name in saved) and not any(
        name.endswith("q_proj.weight") for name in saved)

    code, stdout, err = run("generate", "--checkpoint", out, "--prompt", "The module", "--max-new-tokens", 5,
                            "--greedy")
    assert code == 0, err
    assert stdout.startswith("The module") and len(stdout.splitlines()) == 1


def test_quantize_checkpoint_api_and_what_a_quantized_checkpoint_refuses(gpt_run, tmp_path):
    out = ckpt.quantize_checkpoint(gpt_run, tmp_path / "q8", 8, None, "symmetric")
    assert (out / ckpt.WEIGHTS).is_file() and (out / "tokenizer.model").is_file()
    with pytest.raises(ValueError, match="quantized already"):
        ckpt.quantize_checkpoint(out, tmp_path / "again", 8)
    assert not (tmp_path / "again").exists()
    model, _, _ = ckpt.load_model(gpt_run)
    with pytest.raises(ValueError, match="is a quantized checkpoint, for inference only"):
        ckpt.init_from(model, out)
    quantized, _, _ = ckpt.load_model(out)
    with pytest.raises(ValueError, match="quantized layers, .* write it with quantize_checkpoint"):
        ckpt.save_model(tmp_path / "saved", quantized)
    one_line_error(*run("export", "--checkpoint", out, "--out", tmp_path / "hf")[::2], "is a quantized checkpoint")
    assert not (tmp_path / "hf").exists()


def test_bad_settings_are_one_line_errors_that_write_nothing(gpt_run, tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    one_line_error(*run("quantize", "--checkpoint", gpt_run, "--bits", 8, "--out", occupied)[::2],
                   "not an empty directory")
    assert sorted(p.name for p in occupied.iterdir()) == ["keep.txt"]
    out = tmp_path / "q"
    # d_model 64: groups of 128 (the int4 default) do not divide the projections' inputs
    one_line_error(*run("quantize", "--checkpoint", gpt_run, "--bits", 4, "--out", out)[::2],
                   "in_features 64 is not a multiple of group_size 128")
    one_line_error(*run("quantize", "--checkpoint", gpt_run, "--bits", 3, "--out", out)[::2],
                   "--bits", "invalid choice")
    one_line_error(*run("quantize", "--checkpoint", gpt_run, "--bits", 4, "--group-size", 0, "--out", out)[::2],
                   "--group-size", "expected an integer >= 1")
    one_line_error(*run("quantize", "--checkpoint", gpt_run, "--bits", 8, "--scheme", "absmax", "--out", out)[::2],
                   "--scheme", "invalid choice")
    one_line_error(*run("quantize", "--checkpoint", tmp_path / "missing", "--bits", 8, "--out", out)[::2],
                   "missing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]  # no out, no temporary directory
