"""`minillm finetune --train.finetune_mode=adapter|prefix|deep-prompt|prompt` end to end, on a
tiny GPT pretrained for 1 step (the patterns of tests/test_cli.py): the run trains, saves only
its adapter, evaluates and reloads; bad settings are one-line errors."""

from __future__ import annotations

import random

import pytest
from safetensors import safe_open

from minillm import checkpoint as ckpt
from test_cli import TINY_MODEL, TINY_TRAIN, WORDS, data_args, one_line_error, run

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A 20-document corpus, a GPT pretrained on it for 1 step, and a two-class CSV task."""
    root = tmp_path_factory.mktemp("cli-methods")
    rng = random.Random(0)
    (root / "corpus").mkdir()
    for d in range(20):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(8)) + "." for _ in range(10)]
        (root / "corpus" / f"doc{d:02d}.txt").write_text(" ".join(sentences) + "\n")
    for name in ("train", "dev"):
        rows = ["text,label"]
        for _ in range(40):
            label = rng.choice(["yes", "no"])
            words = [rng.choice(WORDS) for _ in range(8)] + ["good" if label == "yes" else "bad"]
            rows.append(f"{' '.join(words)},{label}")
        (root / f"{name}.csv").write_text("\n".join(rows) + "\n")
    pretrain = [*TINY_TRAIN, "--train.max_steps=1", "--train.eval_every=0", "--train.eval_batches=1"]  # a base, quickly
    code, _, err = run("pretrain", *TINY_MODEL, *data_args(root), *pretrain, f"--train.out_dir={root / 'gpt'}")
    assert code == 0, err
    return root


def finetune_args(work, mode: str, *extra) -> list[str]:
    return ["finetune", "--model", "gpt", f"--train.init_from={work / 'gpt'}", f"--data.train_file={work / 'train.csv'}",
            f"--data.validation_file={work / 'dev.csv'}", "--data.seq_len=32", *TINY_TRAIN,
            f"--train.finetune_mode={mode}", f"--train.out_dir={work / mode}", *extra]


@pytest.mark.parametrize("mode,option", [("prefix", "--train.prefix_length=10"), ("adapter", "--train.adapter_size=4"),
                                         ("prompt", "--train.prompt_length=5"), ("deep-prompt", "--train.prompt_length=5")])
def test_finetune_with_a_parameter_efficient_method_end_to_end(work, mode, option):
    code, out, err = run(*finetune_args(work, mode, option))
    assert code == 0, err
    assert f'finetune_mode = "{mode}"' in out
    saved = ckpt.resolve_checkpoint(work / mode) / ckpt.WEIGHTS
    with safe_open(saved, framework="pt") as f:
        names = set(f.keys())
    assert names and all(n.startswith("classifier.") or any(k in n for k in (".adapter.", ".prefix.", ".prompt."))
                         for n in names)
    if mode == "prefix":
        assert {n for n in names if ".prefix." in n} == {"body.prefix.key_values"}  # folded: no MLP
    code, out, err = run("evaluate", "--checkpoint", work / mode, "--max-batches", 2)
    assert code == 0, err
    assert "(classification)" in out and "accuracy" in out


@pytest.mark.parametrize("extra,needles", [
    (["--train.finetune_mode=prefix", "--train.prefix_length=64"],
     ["TrainConfig.prefix_length: got 64, expected 1 .. max_seq_len - 1 = 63"]),
    (["--train.finetune_mode=prefix", "--train.prefix_length=10"],  # data.seq_len 64 (finetune's default)
     ["DataConfig.seq_len: got 64, but the 10 virtual tokens of TrainConfig.prefix_length come first",
      "lower --data.seq_len to 54 or less"]),
    (["--train.finetune_mode=prompt", "--train.prompt_length=0"], ["TrainConfig.prompt_length: got 0"]),
    (["--train.finetune_mode=adapter", "--train.adapter_size=0"], ["TrainConfig.adapter_size: got 0"]),
    (["--train.finetune_mode=prefix", "--train.adapter_size=4"],
     ["train.adapter_size", "finetune_mode is not 'adapter'"]),
    (["--train.finetune_mode=adapter", "--train.prefix_hidden=4"],
     ["train.prefix_hidden", "finetune_mode is not 'prefix'"]),
])
def test_bad_settings_are_one_line_errors(work, extra, needles, tmp_path):
    argv = ["finetune", "--model", "gpt", f"--train.init_from={work / 'gpt'}", f"--data.train_file={work / 'train.csv'}",
            f"--data.validation_file={work / 'dev.csv'}", *TINY_TRAIN, f"--train.out_dir={tmp_path / 'run'}", *extra]
    code, _, err = run(*argv)
    one_line_error(code, err, *needles)
    assert not (tmp_path / "run" / "latest").exists()


def test_causal_lm_prefix_tuning_through_pretrain_then_generate(work):
    """Causal-LM fine-tuning: `pretrain` from init_from with a prefix, then `generate` from the run
    (load_model puts the folded prefix on the base) past the window of max_seq_len - 1 - P tokens."""
    out_dir = work / "lm-prefix"
    code, _, err = run("pretrain", f"--train.init_from={work / 'gpt'}", *data_args(work), *TINY_TRAIN,
                       "--train.max_steps=2", "--train.eval_every=0", "--train.finetune_mode=prefix",
                       "--train.prefix_length=4", "--train.prefix_hidden=16", f"--train.out_dir={out_dir}")
    assert code == 0, err
    code, out, err = run("generate", "--checkpoint", out_dir, "--prompt", "The module", "--max-new-tokens", 70,
                         "--greedy")
    assert code == 0, err
    assert out.startswith("The module") and "window (max_seq_len - 1 - 4 virtual)" in err
