"""prepare + TokenShards: skip on rerun, rebuild on change, atomic under SIGKILL, disjoint split."""

import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from minillm.data.config import DataConfig
from minillm.data.corpus import Corpus, Document
from minillm.data.prepare import prepare, prepare_from_config, token_dtype
from minillm.data.shards import TokenShards
from minillm.tokenizer import EOS_ID, Tokenizer

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
    "tau upsilon phi chi psi omega the of and to in is that for it as with was on be by this"
).split()


def write_corpus(directory, n_files=3, docs_per_file=120, seed=0):
    """JSONL files of random word documents; returns their paths."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(n_files):
        lines = []
        for d in range(docs_per_file):
            words = [rng.choice(WORDS) for _ in range(rng.randint(5, 120))]
            lines.append(json.dumps({"text": f"doc {f}-{d}: " + " ".join(words)}))
        path = directory / f"part{f}.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    paths = write_corpus(root / "corpus")
    tok = Tokenizer.train([d.text for d in Corpus(paths)], root / "tok", vocab_size=400)
    return root, paths, tok


def files_of(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_shards_round_trip_and_disjoint_split(setup, tmp_path):
    root, paths, tok = setup
    result = prepare(paths, tok, tmp_path / "out", val_fraction=0.1, progress=False)
    assert not result.skipped
    train, val = TokenShards(tmp_path / "out", "train"), TokenShards(tmp_path / "out", "val")
    docs = list(Corpus(paths))
    assert len(train) + len(val) == len(docs) and len(val) == round(0.1 * len(docs))
    assert train.tokens.dtype == np.uint16 and isinstance(train.tokens, np.memmap)
    train_texts = {tok.decode(train.document(i)) for i in range(len(train))}
    val_texts = {tok.decode(val.document(i)) for i in range(len(val))}
    assert train_texts | val_texts == {d.text for d in docs}  # every document, exactly once...
    assert not train_texts & val_texts  # ...in exactly one split
    # every document ends in EOS, offsets bound the documents
    assert (train.tokens[train.offsets[1:] - 1] == EOS_ID).all()
    assert train.offsets[-1] == len(train.tokens) == result.manifest["splits"]["train"]["tokens"]
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == tok.model_proto


def test_rerun_skips_and_changed_input_rebuilds(setup, tmp_path):
    root, paths, tok = setup
    corpus_dir = tmp_path / "corpus"
    mine = write_corpus(corpus_dir, n_files=2, docs_per_file=30, seed=1)
    out = tmp_path / "out"
    assert not prepare(mine, tok, out, progress=False).skipped
    before = files_of(out)
    second = prepare(mine, tok, out, progress=False)
    assert second.skipped and files_of(out) == before
    with open(mine[0], "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "a brand new document"}) + "\n")
    third = prepare(mine, tok, out, progress=False)
    assert not third.skipped and files_of(out)["manifest.json"] != before["manifest.json"]
    assert third.manifest["splits"]["train"]["documents"] + third.manifest["splits"]["val"]["documents"] == 61
    # a changed setting rebuilds too
    assert not prepare(mine, tok, out, val_fraction=0.2, progress=False).skipped


def test_output_does_not_depend_on_workers_or_chunks(setup, tmp_path):
    root, paths, tok = setup
    prepare(paths, tok, tmp_path / "one", num_workers=1, progress=False)
    prepare(paths, tok, tmp_path / "two", num_workers=2, chunk_bytes=3000, progress=False)
    assert files_of(tmp_path / "one") == files_of(tmp_path / "two")
    # and the word-cached encoding equals plain sentencepiece
    shards = TokenShards(tmp_path / "one", "train")
    by_text = {d.text: d for d in Corpus(paths)}
    text = tok.decode(shards.document(0))
    assert shards.document(0).tolist() == tok.sp.encode(by_text[text].text)


def test_foreign_tokenizer_without_word_cache(setup, tmp_path):
    import io

    import sentencepiece as spm

    root, paths, _ = setup
    buffer = io.BytesIO()  # sentencepiece defaults: NFKC, whitespace collapsed, eos=2
    spm.SentencePieceTrainer.train(sentence_iterator=iter([d.text for d in Corpus(paths)]), model_writer=buffer,
                                   vocab_size=100, minloglevel=2)
    (tmp_path / "foreign.model").write_bytes(buffer.getvalue())
    tok = Tokenizer.load(tmp_path / "foreign.model")
    assert not tok.splits_on_spaces
    docs = [Document("a", "two  spaces   here"), Document("b", "alpha beta")]
    prepare(docs, tok, tmp_path / "out", val_fraction=0, progress=False)
    shards = TokenShards(tmp_path / "out")
    assert shards.document(0, with_eos=True).tolist() == tok.sp.encode(docs[0].text) + [2]


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    from minillm.data.prepare import prepare
    prepare(sys.argv[3:], sys.argv[1], sys.argv[2], num_workers=2, chunk_bytes=3000, progress=False)
    """
)


@pytest.mark.parametrize("crash_at", ["chunk:2", "publish"])
def test_killed_prepare_leaves_nothing_complete_and_rerun_is_identical(setup, tmp_path, crash_at):
    root, paths, tok = setup
    reference = tmp_path / "reference"
    prepare(paths, tok, reference, num_workers=2, chunk_bytes=3000, progress=False)
    out = tmp_path / "out"
    if crash_at == "publish":  # an older complete prepare of other inputs is being replaced
        prepare(paths[:1], tok, out, progress=False)
    env = dict(os.environ, MINILLM_PREPARE_CRASH_AT=crash_at)
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(tok.path), str(out), *map(str, paths)], env=env, capture_output=True
    )
    assert proc.returncode == -9, proc.stderr.decode()  # really killed by SIGKILL
    assert not (out / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="never prepared or its prepare was interrupted"):
        TokenShards(out, "train")
    result = prepare(paths, tok, out, num_workers=2, chunk_bytes=3000, progress=False)
    assert not result.skipped
    assert files_of(out) == files_of(reference)  # byte-identical, no temporary file left


def test_bad_inputs_leave_nothing_on_disk(setup, tmp_path):
    root, paths, tok = setup
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n\n")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"corpus is empty.*empty.txt"):
        prepare([empty], tok, out, progress=False)
    assert not out.exists()
    with pytest.raises(ValueError, match="corpus is empty"):
        prepare([Document("blank", " \n ")], tok, out, progress=False)
    assert not out.exists()
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good text then \x80 bad")
    with pytest.raises(ValueError, match=r"bad.txt: invalid UTF-8 at byte offset 15"):
        prepare([paths[0], bad], tok, out, progress=False)
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        prepare([tmp_path / "missing.txt"], tok, out, progress=False)
    # an existing complete prepare survives a failed rebuild untouched
    prepare(paths[:1], tok, out, progress=False)
    before = files_of(out)
    with pytest.raises(ValueError, match="invalid UTF-8"):
        prepare([paths[0], bad], tok, out, progress=False)
    assert files_of(out) == before
    # errors="replace" accepts the file
    result = prepare(Corpus([bad], errors="replace"), tok, tmp_path / "replaced", val_fraction=0, progress=False)
    assert "\ufffd" in tok.decode(TokenShards(tmp_path / "replaced").document(0))
    assert result.manifest["splits"]["val"]["documents"] == 0


def test_damaged_shard_is_refused_and_dtype_rule(setup, tmp_path):
    root, paths, tok = setup
    prepare([Document("a", "one two three"), Document("b", "four five")], tok, tmp_path, val_fraction=0.5,
            progress=False)
    with open(tmp_path / "train.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="train.bin has .* bytes, manifest.json records"):
        TokenShards(tmp_path, "train")
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    with pytest.raises(ValueError, match="val_fraction=0.5 leaves no training document"):
        prepare([Document("a", "one")], tok, tmp_path / "x", val_fraction=0.5, progress=False)


@pytest.mark.parametrize("name, data, error", [
    ("part9.jsonl", b'{"text": "fine"}\n{"text": "fine too"\n', r"part9.jsonl:2: not valid JSON"),
    ("part9.txt", b"fine words, then \xc3(", r"part9.txt: invalid UTF-8 at byte offset 17"),
], ids=["not-json", "invalid-utf8"])
def test_bad_text_met_while_training_the_tokenizer_names_the_file(tmp_path, name, data, error):
    """The tokenizer trained by prepare_from_config meets the bad file after the good ones: the
    error is the reader's ValueError, and nothing is written."""
    write_corpus(tmp_path / "corpus", n_files=1, docs_per_file=40)
    (tmp_path / "corpus" / name).write_bytes(data)
    config = DataConfig(inputs=[str(tmp_path / "corpus")], prepared_dir=str(tmp_path / "prepared"), vocab_size=320)
    with pytest.raises(ValueError, match=error):
        prepare_from_config(config, progress=False)
    assert not (tmp_path / "prepared").exists()


def test_a_document_named_twice_is_prepared_once(setup, tmp_path, capsys):
    """A folder and a glob of it give the folder's shards; a copied file and a repeated line are
    dropped before the split, so no validation text is also a training text."""
    root, paths, tok = setup
    folder = paths[0].parent
    alone = prepare([folder], tok, tmp_path / "alone", val_fraction=0.1, progress=False)
    twice = prepare([folder, str(folder / "*.jsonl")], tok, tmp_path / "twice", val_fraction=0.1, progress=True)
    assert twice.duplicates == {"files": 3, "documents": 0} and alone.duplicates == {"files": 0, "documents": 0}
    assert twice.manifest["duplicates"] == twice.duplicates
    assert "prepare: dropped 3 input file(s) reached twice (same resolved path)" in capsys.readouterr().err
    shards = ("train.bin", "train.idx.npy", "val.bin", "val.idx.npy")
    for name in shards:
        assert (tmp_path / "twice" / name).read_bytes() == (tmp_path / "alone" / name).read_bytes()
    assert twice.manifest["splits"] == alone.manifest["splits"]

    copies = tmp_path / "copies"
    copies.mkdir()
    (copies / "copy.jsonl").write_bytes(paths[0].read_bytes())  # another file, the same 120 texts
    (copies / "line.jsonl").write_text(paths[1].read_text().splitlines()[5] + "\n")  # one text again
    result = prepare([folder, copies], tok, tmp_path / "copies_out", val_fraction=0.1, progress=True)
    assert result.duplicates == {"files": 0, "documents": 121}
    assert "prepare: dropped 121 document(s) repeating an earlier document's text" in capsys.readouterr().err
    for name in shards:
        assert (tmp_path / "copies_out" / name).read_bytes() == (tmp_path / "alone" / name).read_bytes()
    train, val = TokenShards(tmp_path / "copies_out", "train"), TokenShards(tmp_path / "copies_out", "val")
    train_texts = [tok.decode(train.document(i)) for i in range(len(train))]
    val_texts = [tok.decode(val.document(i)) for i in range(len(val))]
    assert len(set(train_texts)) == len(train_texts) and not set(train_texts) & set(val_texts)

    # a rerun that finds the folder's shards up to date still counts this call's repeated files
    again = prepare([folder, str(folder / "*.jsonl")], tok, tmp_path / "alone", val_fraction=0.1, progress=False)
    assert again.skipped and again.duplicates == {"files": 3, "documents": 0}
