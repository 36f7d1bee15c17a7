"""Tokenizer: fixed special ids, exact round trip, batch encoding, foreign models, bad input."""

import io
import random

import numpy as np
import pytest
import sentencepiece as spm

from minillm.data.word_cache import WordCache
from minillm.tokenizer import BOS_ID, CLS_ID, EOS_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID, Tokenizer

WORDS = (
    "the of and to in is that for it as with was on be by this are from or an which function "
    "return value module class object string list dict file path name data error type default "
    "argument keyword tokenizer corpus model train batch mask sentence document parse encode"
).split()


def make_texts(n_docs: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        lines = []
        for _ in range(rng.randint(1, 6)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 25))]
            lines.append(" ".join(words).capitalize() + ".")
        docs.append("\n".join(lines))
    return docs


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def tok(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "tok"
    return Tokenizer.train(make_texts(400), path, vocab_size=420, model_type=request.param)


TRICKY = [
    "plain words here",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\nblank lines\n",
    "multiple    inner   spaces",
    "Ünïcödé, 日本語, emoji 😀 and symbols ∑≠√",
    "[MASK] [CLS] <sentinel_0> look like specials but are text",
    "",
    "\n",
    " ",
]


def test_special_ids_are_fixed(tok):
    assert [tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.bos_id, tok.eos_id] == [
        PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID, BOS_ID, EOS_ID
    ] == list(range(7))
    assert tok.id_to_piece(MASK_ID) == "[MASK]"
    assert tok.sentinel_ids == list(range(7, 7 + 16))
    assert tok.special[:23].all()  # specials and sentinels
    assert tok.id_to_piece(23) == "\n" and not tok.special[23:].any()  # newline, bytes, pieces: maskable
    assert tok.newline_id == 23


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert UNK_ID not in ids  # byte fallback covers every character


def test_documented_round_trip_exception(tok):
    assert tok.decode(tok.encode("a\u2581b")) == "a b"  # U+2581 is sentencepiece's space marker


def test_text_never_becomes_a_special_token(tok):
    ids = tok.encode("[MASK] [CLS] [SEP] <sentinel_0>")
    assert not set(ids) & set(range(7 + 16))


def test_batch_matches_single(tok):
    texts = make_texts(50, seed=3) + TRICKY
    batch = tok.encode_batch(texts)
    assert batch == [tok.encode(t) for t in texts]
    assert tok.decode_batch(batch) == texts


def test_save_load_gives_same_ids(tok, tmp_path):
    saved = tok.save(tmp_path / "run")
    assert saved.name == "tokenizer.model"
    again = Tokenizer.load(tmp_path / "run")
    text = make_texts(1, seed=9)[0]
    assert again.encode(text) == tok.encode(text) and again.vocab_size == tok.vocab_size


def test_word_start_and_space_splitting(tok):
    ids = tok.encode("return value\nname")
    pieces = [tok.id_to_piece(i) for i in ids]
    assert [tok.is_word_start(i) for i in ids] == [p.startswith("\u2581") or p == "\n" for p in pieces]
    assert tok.splits_on_spaces
    text = "  the   module\tfile  "
    words = [i for w in text.split(" ") for i in (tok.encode(w) if w else tok.space_ids)]
    assert words == tok.encode(text)


def test_word_cache_encoding_matches_sentencepiece_on_random_strings(tok):
    """prepare encodes each space-separated word once; it must equal whole-text encoding."""
    import minillm.data.prepare as prep_module

    rng = random.Random(7)
    alphabet = list("abcdefgh.,()_") + [" ", " ", " ", "\t", "\n", "\u00a0", "\u3000", "\u2581", "é", "😀", "日"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(500)]
    texts += [rng.choice(WORDS) + " " * rng.randint(0, 3) + rng.choice(WORDS) for _ in range(100)]
    prep_module._init_worker(tok.model_proto, "<u2", None, tok.splits_on_spaces, tok.space_ids)
    flat, lengths = prep_module._encode_chunk(texts)
    expected = tok.sp.encode(texts)
    assert lengths.tolist() == [len(ids) for ids in expected]
    assert flat.tolist() == [i for ids in expected for i in ids]
    small = WordCache(tok.sp, tok.space_ids, max_words=60)  # cleared again and again
    for start in range(0, len(texts), 50):
        ids, lengths = small.encode(texts[start : start + 50])
        assert ids.tolist() == [i for ids in expected[start : start + 50] for i in ids]
    assert len(small.index) < len({w for t in texts for w in t.split(" ")})  # it was cleared


def test_foreign_model_maps_specials(tmp_path):
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(make_texts(200)), model_writer=buffer, vocab_size=120,
        user_defined_symbols=["<mask>"], minloglevel=2,
    )
    path = tmp_path / "foreign.model"
    path.write_bytes(buffer.getvalue())
    tok = Tokenizer.load(path)
    # sentencepiece defaults: unk=0, bos=1, eos=2, no pad; <mask> found by name
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, None)
    assert tok.mask_id == 3 and tok.cls_id is None
    assert tok.newline_id is None  # no "\n" piece: NSP falls back to token cuts
    assert tok.special[3] and tok.word_start[3]  # a user-defined <mask> is still never masked
    with pytest.raises(ValueError, match="no CLS token"):
        tok.require("cls")
    assert tok.sentinel_ids[0] == tok.vocab_size - 1  # documented fallback: top of the vocab


def test_vocab_too_large_is_clear_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size=5000 is larger than the corpus supports"):
        Tokenizer.train(["tiny corpus", "of two lines"], tmp_path / "big", vocab_size=5000)
    assert list(tmp_path.iterdir()) == []


def test_vocab_too_small_for_the_characters(tmp_path):
    chinese = "".join(chr(0x4E00 + i) for i in range(600))
    with pytest.raises(ValueError, match="vocab_size=400 cannot hold the corpus's distinct characters"):
        Tokenizer.train([chinese], tmp_path / "t", vocab_size=400, character_coverage=1.0)
    assert list(tmp_path.iterdir()) == []


def test_empty_corpus_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="corpus is empty"):
        Tokenizer.train(["", "   \n"], tmp_path / "t", vocab_size=400)
    with pytest.raises(ValueError, match="model_type"):
        Tokenizer.train(["x"], tmp_path / "t", vocab_size=400, model_type="wordpiece")
    with pytest.raises(ValueError, match="vocab_size=100 leaves no room"):
        Tokenizer.train(["x"], tmp_path / "t", vocab_size=100)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer.load(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model is not a sentencepiece model"):
        Tokenizer.load(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.model"]


GOOD_LINES = "".join(f'{{"text": "document {i}: the model reads a file"}}\n' for i in range(40))


@pytest.mark.parametrize("name, data, error", [
    ("b.jsonl", (GOOD_LINES + "not json\n").encode(), r"b.jsonl:41: not valid JSON"),
    ("b.jsonl", (GOOD_LINES + '{"body": "no text field"}\n').encode(), r"b.jsonl:41: no field 'text'"),
    ("b.txt", b"fine words, then \xff", r"b.txt: invalid UTF-8 at byte offset 17"),
], ids=["not-json", "no-field", "invalid-utf8"])
def test_bad_input_met_while_training_raises_the_readers_error(tmp_path, name, data, error):
    """A reader error raised while sentencepiece consumes the lines (not on the first line) is
    the reader's own ValueError, not sentencepiece's ``RuntimeError: INTERNAL``."""
    from minillm.data.corpus import Corpus

    (tmp_path / "a.jsonl").write_text(GOOD_LINES, encoding="utf-8")
    (tmp_path / name).write_bytes(data)
    corpus = Corpus([tmp_path / "a.jsonl", tmp_path / name])
    with pytest.raises(ValueError, match=error) as reading:
        list(corpus)
    with pytest.raises(ValueError, match=error) as training:
        Tokenizer.train(corpus, tmp_path / "out" / "tok", vocab_size=320)
    assert str(training.value) == str(reading.value)
    assert not (tmp_path / "out").exists()


def test_word_start_table_shape(tok):
    assert tok.word_start.dtype == np.bool_ and tok.word_start.shape == (tok.vocab_size,)
