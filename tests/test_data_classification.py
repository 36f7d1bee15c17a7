"""Classification files: CSV/TSV/JSONL with label maps, GLUE layouts, clear errors."""

import json

import pytest

from minillm.data.classification import (
    ClassificationCollator,
    ClassificationDataset,
    LabelMap,
    read_classification,
    read_glue,
    sample_examples,
)
from minillm.data.config import DataConfig
from minillm.data.pipeline import classification_examples
from minillm.data.seq2seq import Seq2SeqCollator, Seq2SeqPairDataset, read_seq2seq_pairs
from minillm.tokenizer import CLS_ID, EOS_ID, SEP_ID, Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = ["a good film", "a bad movie", "the cat sat on the mat", "is this a question", "yes it is"] * 40
    texts += [f"word{i} and more words {i * 7}" for i in range(200)]
    return Tokenizer.train(texts, tmp_path_factory.mktemp("tok") / "t", vocab_size=320)


def test_csv_jsonl_and_label_map(tok, tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("text,label\na good film,pos\na bad movie,neg\nfine,pos\n")
    examples = read_classification(train)
    assert examples.label_map.names == ["neg", "pos"] and examples.labels == [1, 0, 1]
    saved = examples.label_map.save(tmp_path / "run" / "labels.json")
    assert LabelMap.load(saved).names == ["neg", "pos"]
    val = tmp_path / "val.jsonl"
    val.write_text("\n".join(json.dumps({"sentence": t, "y": y}) for t, y in [("good", "pos"), ("bad", "neg")]))
    val_examples = read_classification(val, text_field="sentence", label_field="y", label_map=examples.label_map)
    assert val_examples.labels == [1, 0]
    ds = ClassificationDataset(examples, tok, 8)
    batch = ClassificationCollator(tok)([ds[i] for i in range(3)])
    assert batch["labels"].tolist() == [1, 0, 1] and batch["labels"].shape == (3,)
    assert (batch["input_ids"][:, 0] == CLS_ID).all() and (batch["token_type_ids"] == 0).all()


def test_pairs_truncate_longest_first(tok, tmp_path):
    path = tmp_path / "pairs.tsv"
    long_a = " ".join(["the cat sat on the mat"] * 10)
    path.write_text(f"q\tp\tlabel\n{long_a}\tyes it is\t1\nshort\t{long_a}\t0\n")
    examples = read_classification(path, text_field="q", text_pair_field="p")
    shorter = [min(tok.encode(x), tok.encode(y), key=len) for x, y in zip(examples.texts, examples.text_pairs)]
    for max_len in (2 * max(map(len, shorter)) + 5, 9):
        ds = ClassificationDataset(examples, tok, max_len)
        for k, item in enumerate(ds):
            ids, types = list(item["input_ids"]), item["token_type_ids"]
            assert len(ids) == max_len and ids.count(SEP_ID) == 2 and ids[-1] == SEP_ID
            first_sep = ids.index(SEP_ID)
            assert (types[: first_sep + 1] == 0).all() and (types[first_sep + 1 :] == 1).all()
            a, b = ids[1:first_sep], ids[first_sep + 1 : -1]
            if max_len > 9:  # room for the whole shorter text: only the longer one is cut
                assert shorter[k] in (a, b)
            else:  # both cut: longest-first leaves them within one token of each other
                assert abs(len(a) - len(b)) <= 1


def test_glue_layouts(tmp_path):
    cola = tmp_path / "cola.tsv"
    cola.write_text("gj04\t1\t\tOur friends won't buy this analysis.\ngj04\t0\t*\tThey drank the pub.\n")
    assert read_glue("cola", cola).texts[1] == "They drank the pub."
    mrpc = tmp_path / "mrpc.tsv"
    mrpc.write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tHe said \"hi\".\tHe greeted.\n")
    e = read_glue("mrpc", mrpc)
    assert e.texts == ['He said "hi".'] and e.text_pairs == ["He greeted."] and e.labels == [1]
    mnli = tmp_path / "mnli.tsv"
    mnli.write_text("index\tsentence1\tsentence2\tgold_label\n0\tA man.\tA person.\tentailment\n")
    assert read_glue("MNLI", mnli).labels == [1]
    qnli_test = tmp_path / "qnli_test.tsv"
    qnli_test.write_text("index\tquestion\tsentence\n0\tWho?\tHim.\n")
    assert read_glue("qnli", qnli_test, labelled=False).labels is None
    with pytest.raises(ValueError, match="task must be one of"):
        read_glue("stsb", mnli)


def test_missing_label_column_and_unknown_label(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("text,label\nx,a\ny,b\n")
    nolabel = tmp_path / "nolabel.csv"
    nolabel.write_text("text,category\nx,a\n")
    with pytest.raises(ValueError, match=r"nolabel.csv: no column 'label' \(columns: \['text', 'category'\]\)"):
        read_classification(nolabel)
    val = tmp_path / "val.csv"
    val.write_text("text,label\nx,a\nz,c\n")
    label_map = read_classification(train).label_map
    with pytest.raises(ValueError, match=r"val.csv:3: unknown label 'c'; .* \['a', 'b'\]"):
        read_classification(val, label_map=label_map)
    jsonl = tmp_path / "v.jsonl"
    jsonl.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"v.jsonl:1: no field 'label'"):
        read_classification(jsonl)
    rte_dev = tmp_path / "dev.tsv"
    rte_dev.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match=r"dev.tsv:2: unknown label 'maybe'"):
        read_glue("rte", rte_dev)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev.tsv", "nolabel.csv", "train.csv", "v.jsonl", "val.csv"]


def test_seq2seq_pairs(tok, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"source": "is this a question", "target": "yes it is"}) + "\n")
    pairs = read_seq2seq_pairs(path)
    batch = Seq2SeqCollator(tok)([Seq2SeqPairDataset(pairs, tok, 32, 32)[0]])
    target = tok.encode("yes it is") + [EOS_ID]
    assert batch["labels"][0].tolist() == target
    assert batch["decoder_input_ids"][0].tolist() == [tok.bos_id] + target[:-1]
    assert tok.decode(batch["input_ids"][0]) == "is this a question"
    bad = tmp_path / "bad.csv"
    bad.write_text("source,tgt\na,b\n")
    with pytest.raises(ValueError, match=r"bad.csv: no column 'target'"):
        read_seq2seq_pairs(bad)


def test_data_config_validation():
    config = DataConfig(seq_len=128, whole_word_mask=True)
    assert DataConfig.from_dict(config.to_dict()) == config
    for field, value in [("seq_len", 2), ("val_fraction", 1.0), ("model_type", "wordpiece"),
                         ("mlm_probability", 0.0), ("inputs", []), ("glue_task", "stsb"), ("random_ratio", 0.5),
                         ("train_examples", -1)]:
        with pytest.raises(ValueError, match=rf"DataConfig\.{field}:"):
            DataConfig(**{field: value})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['seq_length'\]"):
        DataConfig.from_dict({"seq_length": 3})


def test_a_label_budget_samples_the_training_split(tmp_path):
    rows = [f"text {i} {'good' if i % 3 else 'bad'},{'pos' if i % 3 else 'neg'}" for i in range(30)]
    (tmp_path / "train.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    (tmp_path / "dev.csv").write_text("text,label\nsome good text,pos\nsome bad text,neg\n")
    files = dict(train_file=str(tmp_path / "train.csv"),
                 validation_file=str(tmp_path / "dev.csv"))
    full = classification_examples(DataConfig(**files))
    few = classification_examples(DataConfig(**files, train_examples=8, seed=1))
    assert len(full["train"]) == 30 and len(few["train"]) == 8
    positions = [full["train"].texts.index(text) for text in few["train"].texts]
    assert positions == sorted(positions) and len(set(positions)) == 8  # distinct, in file order
    assert few["train"].labels == [full["train"].labels[i] for i in positions]  # labels stay with their texts
    assert few["train"].label_map.names == full["train"].label_map.names
    assert few["validation"].texts == full["validation"].texts  # held-out data untouched
    again = classification_examples(DataConfig(**files, train_examples=8, seed=1))
    other = classification_examples(DataConfig(**files, train_examples=8, seed=2))
    assert again["train"].texts == few["train"].texts and other["train"].texts != few["train"].texts
    with pytest.raises(ValueError, match=r"DataConfig.train_examples: got 31, expected 1..30"):
        sample_examples(full["train"], 31, seed=0)


def test_a_training_file_with_one_class_is_refused_as_it_is_read(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("text,label\na good film,pos\nfine,pos\ngreat,pos\n")
    message = (r"^\S*train.csv: every example has label 'pos' \(column 'label'\); "
               r"classification needs at least 2 classes$")
    with pytest.raises(ValueError, match=message):
        read_classification(train)
    with pytest.raises(ValueError, match=message):  # the pipeline reads it before any training
        classification_examples(DataConfig(train_file=str(train)))
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text('{"text": "a", "y": 1}\n{"text": "b", "y": 1}\n')
    with pytest.raises(ValueError, match=r"train.jsonl: every example has label '1' \(field 'y'\)"):
        read_classification(jsonl, label_field="y")
    # validation and test files may hold one class: they are read with the training label map
    (tmp_path / "two.csv").write_text("text,label\nx,pos\ny,neg\n")
    label_map = read_classification(tmp_path / "two.csv").label_map
    assert read_classification(train, label_map=label_map).labels == [1, 1, 1]
    # GLUE: the label set is fixed, so the training file says it is one
    sst2 = tmp_path / "sst2_train.tsv"
    sst2.write_text("sentence\tlabel\nnice\t1\ngood\t1\n")
    assert read_glue("sst2", sst2).labels == [1, 1]  # a dev file
    with pytest.raises(ValueError, match=r"sst2_train.tsv: every example has label '1' \(column 'label'\)"):
        read_glue("sst2", sst2, training=True)
