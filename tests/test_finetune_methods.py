"""The few-shot methods and the methods benchmark from the command line, on test_cli's tiny BERT
and GPT runs and CSV task (one module, so those runs are made once): `minillm evaluate
--label-scoring`, `minillm finetune --train.task=cloze`, and `minillm bench finetune-methods` at its
--quick size (every finetune_mode in one table with its parameters, file size and figures; the
few-shot table with its three arms)."""

from __future__ import annotations

import json

import pytest

from minillm.train_config import FINETUNE_MODES
from test_cli import TINY_TRAIN, bert_run, gpt_run, run, work  # noqa: F401  (test_cli's tiny corpus, CSV task, runs)

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def test_the_methods_benchmark_runs_every_mode_and_the_few_shot_arms(work, bert_run, gpt_run, tmp_path):  # noqa: F811
    code, out, err = run("bench", "finetune-methods", "--quick", f"--init={bert_run[0]}", f"--gpt={gpt_run[0]}",
                         "--seeds", "0", "--steps=3", "--shots", "4", f"--results={tmp_path}",
                         "--tsv", work / "train.csv", work / "dev.csv", "--cloze-verbalizer=no=e,yes=a")
    assert code == 0, err
    results = json.loads((tmp_path / "finetune_methods_cpu.json").read_text())
    methods = {row["method"]: row for row in results["methods"]}
    assert list(methods) == [m for m in FINETUNE_MODES if m != "keep"]
    for row in methods.values():
        assert row["seeds"] == 1 and 0 <= row["accuracy_mean"] <= 1 and row["bytes"] > 0 and row["trainable"] > 0
    assert methods["lora"]["trainable"] < methods["full"]["trainable"]
    assert methods["lora"]["bytes"] < methods["full"]["bytes"] and methods["adalora"]["bytes"] < methods["full"]["bytes"]
    few = {row["arm"]: row for row in results["few_shot"]}
    assert set(few) == {"head fine-tuning, 4/class", "PET cloze, 4/class", "zero-shot scoring, 0/class"}
    assert all("skipped" not in row for row in few.values())
    table = (tmp_path / "finetune_methods_cpu.md").read_text()
    assert "| adalora |" in table and "| PET cloze, 4/class |" in table
    assert (tmp_path / "finetune_methods_cpu.png").stat().st_size > 0
    assert (tmp_path / "finetune_methods_cpu.csv").read_text().startswith("method,")


def test_the_methods_benchmark_on_a_gpt_body(work, gpt_run, tmp_path):  # noqa: F811
    """--model gpt: every method on the causal LM; PET's arm is skipped with its reason. The text
    fills the GPT's whole max_seq_len (64), so prefix and prompt runs get it cut to what their
    virtual tokens leave."""
    code, out, err = run("bench", "finetune-methods", "--quick", "--model=gpt", f"--init={gpt_run[0]}",
                         f"--gpt={gpt_run[0]}", "--seeds", "0", "--steps=2", "--shots", "4", f"--results={tmp_path}",
                         "--tsv", work / "train.csv", work / "dev.csv", "--data.seq_len=64")
    assert code == 0, err
    results = json.loads((tmp_path / "finetune_methods_gpt_cpu.json").read_text())
    assert results["model"] == "gpt"
    assert [row["method"] for row in results["methods"]] == [m for m in FINETUNE_MODES if m != "keep"]
    assert all(row["trainable"] > 0 and row["bytes"] > 0 for row in results["methods"])
    few = {row["arm"]: row for row in results["few_shot"]}
    assert "needs a masked LM" in few["PET cloze, 4/class"]["skipped"]
    assert "skipped" not in few["head fine-tuning, 4/class"] and "skipped" not in few["zero-shot scoring, 0/class"]
    assert not (tmp_path / "finetune_methods_cpu.json").exists()  # the BERT table is not overwritten


# =============================================================================================
# minillm evaluate --label-scoring, minillm finetune --train.task=cloze
# =============================================================================================


def test_evaluate_label_scoring_from_the_command_line(work, gpt_run):  # noqa: F811
    gpt_dir, _ = gpt_run
    files = [f"--data.train_file={work / 'train.csv'}", f"--data.validation_file={work / 'dev.csv'}",
             f"--data.test_file={work / 'test.csv'}"]
    code, out, err = run("evaluate", "--checkpoint", gpt_dir, "--label-scoring", "--shots=1", "--device=cpu", *files)
    assert code == 0, err
    assert "label scoring, 1-shot, test split (40 examples, words ['no', 'yes']): accuracy" in out
    code, out, err = run("evaluate", "--checkpoint", gpt_dir, "--label-scoring", "--verbalizer=bad,good,other",
                         "--device=cpu", *files)
    assert code == 2 and err.strip().count("\n") == 0
    assert "--verbalizer: got 3 words ['bad', 'good', 'other'], expected one per label ['no', 'yes']" in err
    code, out, err = run("evaluate", "--checkpoint", gpt_dir, "--shots=2")
    assert code == 2 and "--shots: only with --label-scoring" in err and err.strip().count("\n") == 0


def test_finetune_cloze_from_the_command_line(work, bert_run):  # noqa: F811
    out_dir = work / "cloze"
    files = [f"--data.train_file={work / 'train.csv'}", f"--data.validation_file={work / 'dev.csv'}",
             "--data.seq_len=32", "--train.task=cloze"]
    code, out, err = run("finetune", f"--train.init_from={bert_run[0]}", *files, "--data.cloze_verbalizer=no=e,yes=a",
                         "--data.cloze_pattern={text} it is [MASK] .", *TINY_TRAIN, "--train.max_steps=4",
                         f"--train.out_dir={out_dir}")
    assert code == 0, err
    assert "as cloze questions '{text} it is [MASK] .', words {'no': 'e', 'yes': 'a'}" in out
    assert "validation accuracy" in out and "majority-class baseline" in out
    code, out, err = run("evaluate", "--checkpoint", out_dir / "best")
    assert code == 0, err
    assert "(cloze)" in out and "accuracy" in out
    # a word of several pieces: one line naming the word
    code, out, err = run("finetune", f"--train.init_from={bert_run[0]}", *files, *TINY_TRAIN,
                         "--data.cloze_verbalizer=no=e,yes=valuefunctionmodule", f"--train.out_dir={work / 'c2'}")
    assert code == 2 and "the word 'valuefunctionmodule' is" in err and err.strip().count("\n") == 0
