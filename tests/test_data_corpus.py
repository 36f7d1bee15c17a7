"""Corpus readers: formats, document boundaries, and clear errors for bad input."""

import json
from pathlib import Path

import pytest

from minillm.data.corpus import (
    Corpus,
    Document,
    describe_duplicates,
    read_csv,
    read_jsonl,
    read_text_file,
    read_utf8,
)


def test_text_file_splits(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first doc line one\nline two\n\n\nsecond doc\n\nthird\n", encoding="utf-8")
    assert [d.text for d in read_text_file(path)] == [path.read_text()]
    blocks = list(read_text_file(path, split="blank_lines"))
    assert [d.text for d in blocks] == ["first doc line one\nline two", "second doc", "third"]
    assert [d.id for d in blocks] == [f"{path}:1", f"{path}:5", f"{path}:7"]
    assert [d.text for d in read_text_file(path, split="lines")] == ["first doc line one", "line two", "second doc", "third"]


def test_jsonl_and_csv_fields(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": t, "n": i}) for i, t in enumerate(["alpha", "beta"])) + "\n")
    assert [d.text for d in read_jsonl(jsonl, field="body")] == ["alpha", "beta"]
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('id,content\n1,"hello, world"\n2,"multi\nline"\n')
    assert [d.text for d in read_csv(csv_path, field="content")] == ["hello, world", "multi\nline"]
    tsv = tmp_path / "d.tsv"
    tsv.write_text('content\tx\nbare "quote\t1\n')
    assert [d.text for d in read_csv(tsv, field="content")] == ['bare "quote']


def test_corpus_dirs_globs_and_fingerprint(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "sub" / "a.txt").write_text("ay")
    (tmp_path / ".hidden").write_text("secret")
    by_dir = Corpus([tmp_path])
    assert [d.text for d in by_dir] == ["bee", "ay"]
    assert [d.text for d in Corpus([str(tmp_path / "**" / "*.txt")])] == ["bee", "ay"]
    before = by_dir.fingerprint()
    assert Corpus([tmp_path]).fingerprint() == before
    (tmp_path / "b.txt").write_text("bee!")
    assert Corpus([tmp_path]).fingerprint() != before
    docs = Corpus([Document("x", "text")])
    assert list(docs) == [Document("x", "text")]


def test_missing_inputs_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        Corpus([tmp_path / "nope.txt"])
    with pytest.raises(FileNotFoundError, match=r"matched no file: .*\*\.md"):
        Corpus([str(tmp_path / "*.md")])


def test_invalid_utf8_names_file_and_offset_or_is_replaced(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes("caf\u00e9 ok\n".encode() + b"broken \xff\xfe here")
    offset = len("caf\u00e9 ok\n".encode()) + len(b"broken ")
    with pytest.raises(ValueError, match=rf"bad.txt: invalid UTF-8 at byte offset {offset}\b"):
        list(Corpus([path]))
    text = read_utf8(path, errors="replace")
    assert "\ufffd\ufffd here" in text
    assert [d.text for d in Corpus([path], errors="replace")] == [text]


def test_missing_field_and_column_are_named(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: no field 'text'"):
        list(read_jsonl(jsonl))
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("title,body\na,b\n")
    with pytest.raises(ValueError, match=r"d.csv: no column 'text' \(columns: \['title', 'body'\]\)"):
        list(Corpus([csv_path]))
    with pytest.raises(ValueError, match="format must be one of"):
        Corpus([csv_path], format="xml")


def test_a_file_reached_twice_is_read_once(tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("alpha")
    (tmp_path / "docs" / "b.txt").write_text("beta")
    (tmp_path / "link.txt").symlink_to(tmp_path / "docs" / "a.txt")
    monkeypatch.chdir(tmp_path)
    # a relative folder, an absolute glob of it, an absolute file path, a symlink
    corpus = Corpus(["docs", str(tmp_path / "docs" / "*.txt"), tmp_path / "docs" / "b.txt", "link.txt"])
    assert corpus.files == [Path("docs/a.txt"), Path("docs/b.txt")]  # first occurrences, input order
    assert len(corpus.duplicate_files) == 4
    assert [d.text for d in corpus] == ["alpha", "beta"]
    assert corpus.duplicates == {"files": 4, "documents": 0}
    assert corpus.fingerprint() == Corpus(["docs"]).fingerprint()  # a prepare of the folder alone is reused


def test_a_text_seen_before_is_dropped(tmp_path):
    (tmp_path / "a.txt").write_text("same words")
    (tmp_path / "b.txt").write_text("same words")  # another file, same text
    (tmp_path / "c.jsonl").write_text('{"text": "line"}\n{"text": "same words"}\n{"text": "line"}\n')
    (tmp_path / "d.csv").write_text("text\nrow\nline\nrow\n")
    (tmp_path / "e.md").write_text("block\n\nother\n\nblock\n")
    corpus = Corpus([tmp_path], split="blank_lines")
    assert corpus.duplicates == {"files": 0, "documents": None}  # not read yet
    docs = list(corpus)
    assert [(Path(d.id).name, d.text) for d in docs] == [
        ("a.txt:1", "same words"), ("c.jsonl:1", "line"), ("d.csv:2", "row"), ("e.md:1", "block"), ("e.md:3", "other"),
    ]
    assert corpus.duplicate_documents == 6
    assert list(corpus) == docs and corpus.duplicate_documents == 6  # the same on every pass
    assert describe_duplicates(corpus.duplicates) == "dropped 6 document(s) repeating an earlier document's text"
    assert describe_duplicates({"files": 2, "documents": 1}) == (
        "dropped 2 input file(s) reached twice (same resolved path) and 1 document(s) repeating an earlier "
        "document's text"
    )
    assert describe_duplicates({"files": 0, "documents": 0}) == "no duplicate dropped"
    in_memory = Corpus([Document("x", "text"), Document("y", " "), Document("z", "text"), Document("w", " ")])
    assert [d.id for d in in_memory] == ["x", "y", "w"] and in_memory.duplicate_documents == 1  # blanks pass


def test_auto_split_makes_a_single_file_paragraphs_and_keeps_several_files_whole(tmp_path):
    book = tmp_path / "input.txt"
    book.write_text("Chapter one.\nIt begins.\n\nChapter two.\n\n\nThe end.\n", encoding="utf-8")
    single = Corpus([book])
    assert single.text_split == "blank_lines"
    assert [d.text for d in single] == ["Chapter one.\nIt begins.", "Chapter two.", "The end."]
    assert Corpus([book], split="blank_lines").fingerprint() == single.fingerprint()  # the same shards
    assert [d.text for d in Corpus([book], split="file")] == [book.read_text()]
    other = tmp_path / "other.txt"
    other.write_text("A second file.\n\nWith two paragraphs.\n", encoding="utf-8")
    several = Corpus([book, other])
    assert several.text_split == "file"
    assert [d.text for d in several] == [book.read_text(), other.read_text()]
    with pytest.raises(ValueError, match="split must be one of"):
        list(read_text_file(book, split="auto"))  # auto depends on the other inputs: Corpus resolves it
