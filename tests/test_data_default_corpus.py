"""The embedded stdlib corpus: builds offline, same bytes twice, sane size; the package task."""

import socket
import time

import pytest

from minillm.data.default_corpus import build_default_corpus, default_corpus_documents, stdlib_classification_task


@pytest.fixture(scope="module")
def built(tmp_path_factory, request):
    """Build the corpus in a fresh cache with networking disabled; report the build time."""
    cache = tmp_path_factory.mktemp("cache")

    def no_network(*args, **kwargs):
        raise AssertionError("the default corpus must not touch the network")

    original = socket.socket.connect
    socket.socket.connect = no_network
    try:
        start = time.perf_counter()
        path = build_default_corpus(cache)
        seconds = time.perf_counter() - start
    finally:
        socket.socket.connect = original
    print(f"\ndefault corpus built in {seconds:.1f}s: {path.stat().st_size / 1e6:.2f} MB cache file")
    return cache, path


def test_same_bytes_twice(built, tmp_path):
    cache, path = built
    again = build_default_corpus(tmp_path)
    assert again != path and again.read_bytes() == path.read_bytes()
    assert build_default_corpus(cache) == path  # cached: not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [again.name]  # no temporary file left


def test_documents_are_stdlib_prose(built):
    cache, _ = built
    docs = default_corpus_documents(cache)
    ids = [d.id for d in docs]
    size = sum(len(d.text.encode()) for d in docs)
    assert 1_000_000 < size < 5_000_000, size
    assert len(set(ids)) == len(ids)
    assert "json" in ids and "collections" in ids and any(i.startswith("pydoc_data.topics:") for i in ids)
    assert not any(i.startswith(("test.", "idlelib.idle_test", "lib2to3.tests")) or ".test." in i for i in ids)
    json_doc = next(d for d in docs if d.id == "json")
    assert "JSON" in json_doc.text


def test_classification_task_split_by_module(built):
    cache, _ = built
    task = stdlib_classification_task(n_classes=6, cache_dir=cache)
    assert len(task.labels) == 7 and task.labels[-1] == "other"
    modules = {name: set(m) for name, m in task.modules.items()}
    assert not modules["train"] & modules["validation"]
    assert not modules["train"] & modules["test"] and not modules["validation"] & modules["test"]
    for split in (task.train, task.validation, task.test):
        assert {label for _, label in split} == set(range(7))  # every class in every split
    # the named labels are packages the modules come from
    packages = {m.split(".")[0] for m in modules["train"]}
    assert set(task.labels[:-1]) <= packages
    again = stdlib_classification_task(n_classes=6, cache_dir=cache)
    assert again.train == task.train and again.test == task.test
    with pytest.raises(ValueError, match="n_classes"):
        stdlib_classification_task(n_classes=0, cache_dir=cache)


def test_finetune_data_takes_stdlib_classes_from_the_config(built, tmp_path, monkeypatch):
    from minillm import preset
    from minillm.data import DataConfig
    from minillm.tasks import get_task
    from minillm.tokenizer import Tokenizer

    cache, _ = built
    monkeypatch.setenv("MINILLM_CACHE_DIR", str(cache))
    docs = [d.text for d in default_corpus_documents(cache)[:60]]
    tokenizer = Tokenizer.train(docs, tmp_path / "tok.model", vocab_size=400)
    data = DataConfig(train_file="default", stdlib_classes=3, seq_len=32)
    splits = get_task("classification").datasets(data, tokenizer, preset("tiny-bert"), samples=0)
    assert splits.labels == stdlib_classification_task(n_classes=3, cache_dir=cache).labels
    assert len(splits.labels) == 4 and splits.labels[-1] == "other"


def test_seq2seq_task_says_first_lines_backwards(built):
    from minillm.data.default_corpus import stdlib_seq2seq_task

    cache, _ = built
    task = stdlib_seq2seq_task(cache_dir=cache)
    splits = {"train": task.train, "validation": task.validation, "test": task.test}
    assert len(task.train) > 1000 and len(task.validation) > 100 and len(task.test) > 100
    for pairs in splits.values():
        for source, target in pairs:
            assert target.split() == source.split()[::-1] and 3 <= len(source.split()) <= 10
    sources = [{s for s, _ in pairs} for pairs in splits.values()]
    assert not (sources[0] & sources[1]) and not (sources[0] & sources[2]) and not (sources[1] & sources[2])
    first_lines = {d.splitlines()[0].strip() for r in default_corpus_documents(cache) for d in r.text.split("\n\n")}
    assert task.test[0][0] in {" ".join(line.split()) for line in first_lines}
    assert stdlib_seq2seq_task(cache_dir=cache) == task  # deterministic
    with pytest.raises(ValueError, match="min_words <= max_words"):
        stdlib_seq2seq_task(cache_dir=cache, min_words=5, max_words=4)
