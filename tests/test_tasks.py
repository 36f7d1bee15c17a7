"""Task objects (minillm.tasks): each task's batches go straight into the model it builds, its
loss and metrics, and what it refuses."""

import json
import random

import pytest
import torch

from minillm import TASKS, build_model, get_task, preset
from minillm.data.config import DataConfig
from minillm.data.prepare import prepare_from_config
from minillm.data.seq2seq import read_seq2seq_pairs
from minillm.evaluation import evaluate
from minillm.tasks import upgrade_saved_configs

WORDS = "one two three four five six seven eight nine ten alpha beta gamma delta the of and to in".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    path = root / "docs.jsonl"
    path.write_text("\n".join(
        json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200)))}) for _ in range(120)
    ))
    data = DataConfig(inputs=[str(path)], prepared_dir=str(root / "prepared"), vocab_size=320, seq_len=32,
                      val_fraction=0.1)
    tokenizer, _ = prepare_from_config(data, progress=False)
    return root, data, tokenizer


@pytest.mark.parametrize("task, name", [
    ("causal-lm", "tiny"), ("mlm", "tiny-bert"), ("mlm-nsp", "tiny-bert"), ("span-corruption", "tiny-seq2seq"),
])
def test_corpus_tasks_batches_fit_their_model(corpus, task, name):
    _, data, tokenizer = corpus
    config = preset(name, vocab_size=tokenizer.vocab_size)
    chosen = get_task(task)
    chosen.check(config, data)
    split = chosen.datasets(data, tokenizer, config, samples=64)
    assert split.validation is not None and split.test is None and "unigram_entropy" in split.baselines
    loader = torch.utils.data.DataLoader(split.train, batch_size=4, collate_fn=split.collate)
    batch = next(iter(loader))
    torch.manual_seed(0)
    model = chosen.build_model(config)
    assert torch.isfinite(model(**batch).loss) and model(**batch).loss.item() > 1.0  # untrained: near log(vocab)
    metrics = evaluate(model, chosen, loader, max_batches=2)
    assert set(metrics) == set(chosen.metrics)


def test_every_task_is_one_registered_object():
    assert list(TASKS) == ["causal-lm", "mlm", "mlm-nsp", "permutation-lm", "span-corruption", "seq2seq",
                          "classification", "cloze"]
    for name, task in TASKS.items():
        assert task.name == name and get_task(name) is task
    with pytest.raises(ValueError, match=r"task: got 'rlhf', expected one of \('causal-lm'"):
        build_model(preset("tiny"), "rlhf")


@pytest.mark.parametrize("task, name, arch", [
    ("causal-lm", "tiny-bert", "encoder"), ("mlm-nsp", "tiny", "decoder"), ("classification", "tiny-seq2seq",
                                                                              "encoder-decoder"),
])
def test_a_task_refuses_an_architecture_it_does_not_train(task, name, arch):
    with pytest.raises(ValueError, match=rf"ModelConfig.arch: task '{task}' trains arch .*, got '{arch}'"):
        get_task(task).check(preset(name), DataConfig(seq_len=32))
    with pytest.raises(ValueError, match="DataConfig.seq_len: got 512, longer than ModelConfig.max_seq_len=128"):
        get_task("causal-lm").check(preset("tiny"), DataConfig(seq_len=512))


def test_classification_from_files_with_a_test_file(corpus, tmp_path):
    _, data, tokenizer = corpus
    path = tokenizer.save(tmp_path / "run")
    (tmp_path / "train.tsv").write_text("sentence\tlabel\none two\t1\nthree four\t0\nfive\t1\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nsix seven\t0\n")
    (tmp_path / "test.tsv").write_text("sentence\tlabel\neight\t1\nnine\t1\nten\t0\n")
    files = dict(glue_task="sst2", tokenizer=str(path), seq_len=16, train_file=str(tmp_path / "train.tsv"),
                 validation_file=str(tmp_path / "dev.tsv"))
    task = get_task("classification")
    bert = preset("tiny-bert", vocab_size=tokenizer.vocab_size)
    no_test = task.datasets(DataConfig(**files), tokenizer, bert, samples=0)
    assert no_test.test is None and no_test.report_split == "validation"
    split = task.datasets(DataConfig(**files, test_file=str(tmp_path / "test.tsv")), tokenizer, bert, samples=0)
    assert split.report_split == "test" and len(split.test) == 3 and split.labels == ["0", "1"]
    assert split.baselines["majority_baseline"] == pytest.approx(2 / 3)  # "1", the training majority, on the test split
    config = task.configure_model(bert, split)
    batch = split.collate([split.train[i] for i in range(3)])
    assert config.num_labels == 2 and batch["labels"].tolist() == [1, 0, 1] and "token_type_ids" in batch
    assert torch.isfinite(task.build_model(config)(**batch).loss)
    with pytest.raises(ValueError, match="DataConfig.validation_file: required with train_file="):
        task.datasets(DataConfig(train_file=str(tmp_path / "train.tsv")), tokenizer, bert, samples=0)
    with pytest.raises(ValueError, match="DataConfig.test_file: got .* unless train_file names a file"):
        DataConfig(train_file="default", test_file=str(tmp_path / "test.tsv"))


def test_a_gpt_classifier_gets_no_segment_ids(corpus, tmp_path):
    """A GPT has no segment embeddings: its batches carry none (they used to, and it failed)."""
    _, _, tokenizer = corpus
    (tmp_path / "train.csv").write_text("text,label\none two,a\nthree,b\nfour five,a\n")
    data = DataConfig(train_file=str(tmp_path / "train.csv"), validation_file=str(tmp_path / "train.csv"), seq_len=16)
    gpt = preset("tiny", vocab_size=tokenizer.vocab_size, classifier_pooling="mean")
    task = get_task("classification")
    split = task.datasets(data, tokenizer, gpt, samples=0)
    batch = split.collate([split.train[i] for i in range(3)])
    assert "token_type_ids" not in batch
    model = task.build_model(task.configure_model(gpt, split))
    assert torch.isfinite(model(**batch).loss)


def test_seq2seq_pairs_from_files(corpus, tmp_path):
    _, _, tokenizer = corpus
    rows = [{"text": f"one two {w}", "target": f"{w} two one"} for w in WORDS]
    for name in ("train", "dev"):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = DataConfig(train_file=str(tmp_path / "train.jsonl"), validation_file=str(tmp_path / "dev.jsonl"), seq_len=16)
    task = get_task("seq2seq")
    config = preset("tiny-seq2seq", vocab_size=tokenizer.vocab_size)
    split = task.datasets(data, tokenizer, config, samples=0)
    assert len(split.train) == len(WORDS) and split.pairs["validation"][0] == ("one two one", "one two one")
    batch = split.collate([split.train[i] for i in range(4)])
    assert torch.isfinite(task.build_model(config)(**batch).loss)
    with pytest.raises(ValueError, match="DataConfig.train_file: task 'seq2seq' trains on a file of examples"):
        task.datasets(DataConfig(seq_len=16), tokenizer, config, samples=0)
    bad = tmp_path / "bad.csv"
    bad.write_text("source,tgt\na,b\n")
    with pytest.raises(ValueError, match=r"bad.csv: no column 'target'"):
        read_seq2seq_pairs(bad)


def test_configs_saved_by_an_older_minillm_are_read_in_todays_terms():
    old_t5 = {"task": "seq2seq", "train": {"task": "seq2seq"}, "data": {"objective": "seq2seq", "train_file": None}}
    new = upgrade_saved_configs(old_t5)
    assert new["task"] == new["train"]["task"] == "span-corruption" and "objective" not in new["data"]
    assert old_t5["data"]["objective"] == "seq2seq"  # the caller's dict is left alone
    pairs = {"task": "seq2seq", "data": {"objective": "seq2seq", "train_file": "pairs.jsonl"}}
    assert upgrade_saved_configs(pairs)["task"] == "seq2seq"


def test_evaluate_and_resolve_name_a_wrong_argument(corpus):
    from minillm import recipes
    from minillm.train_config import TrainConfig

    model = build_model(preset("tiny", vocab_size=320), "causal-lm")
    with pytest.raises(TypeError, match="task: expected a minillm.tasks.Task or a task name, got int"):
        evaluate(model, 3, [])
    with pytest.raises(TypeError, match="model: task 'mlm' trains a MaskedLM, got CausalLM"):
        evaluate(model, "mlm", [])
    with pytest.raises(ValueError, match="max_batches: expected an integer >= 0"):
        evaluate(model, "causal-lm", [], max_batches=-1)
    with pytest.raises(TypeError, match="data: expected a DataConfig, got dict"):
        recipes.resolve(preset("tiny"), {"seq_len": 32}, TrainConfig())
