"""build_data: every objective's batches go straight into the matching minillm model."""

import json
import random

import pytest
import torch

from minillm import build_model, preset
from minillm.data.config import DataConfig
from minillm.data.pipeline import build_data

WORDS = "one two three four five six seven eight nine ten alpha beta gamma delta the of and to in".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    rng = random.Random(0)
    path = root / "docs.jsonl"
    path.write_text("\n".join(
        json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200)))}) for _ in range(120)
    ))
    return root, path


@pytest.mark.parametrize("objective, name, task", [
    ("causal", "tiny", "causal-lm"),
    ("mlm", "tiny-bert", "mlm"),
    ("nsp", "tiny-bert", "mlm-nsp"),
    ("seq2seq", "tiny-seq2seq", "seq2seq"),
])
def test_pretraining_batches_fit_the_model(corpus, objective, name, task):
    root, path = corpus
    config = DataConfig(inputs=[str(path)], prepared_dir=str(root / "prepared"), vocab_size=320, seq_len=32,
                        objective=objective, val_fraction=0.1)
    bundle = build_data(config, progress=False)
    assert bundle.validation is not None
    loader = torch.utils.data.DataLoader(bundle.train, batch_size=4, collate_fn=bundle.collator)
    batch = next(iter(loader))
    torch.manual_seed(0)
    model = build_model(preset(name, vocab_size=bundle.tokenizer.vocab_size), task)
    loss = model(**batch).loss
    assert torch.isfinite(loss) and loss.item() > 1.0  # untrained: near log(vocab)


def test_classification_from_files(corpus, tmp_path):
    root, path = corpus
    bundle = build_data(DataConfig(inputs=[str(path)], prepared_dir=str(root / "prepared"), vocab_size=320,
                                   seq_len=32, objective="causal"), progress=False)
    tokenizer = bundle.tokenizer.save(tmp_path / "run")
    (tmp_path / "train.tsv").write_text("sentence\tlabel\none two\t1\nthree four\t0\nfive\t1\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nsix seven\t0\n")
    config = DataConfig(objective="classification", glue_task="sst2", tokenizer=str(tokenizer), seq_len=16,
                        train_file=str(tmp_path / "train.tsv"), validation_file=str(tmp_path / "dev.tsv"))
    cls = build_data(config)
    batch = cls.collator([cls.train[i] for i in range(3)])
    model = build_model(preset("tiny-bert", vocab_size=cls.tokenizer.vocab_size, num_labels=len(cls.label_map)),
                        "classification")
    assert batch["labels"].tolist() == [1, 0, 1] and torch.isfinite(model(**batch).loss)
    with pytest.raises(ValueError, match="DataConfig.tokenizer"):
        build_data(DataConfig(objective="classification", train_file=str(tmp_path / "train.tsv")))
