"""Hugging Face tokenizers in and out of minillm, checked against transformers itself.

Export: a BPE and a unigram tokenizer trained here, written with ``export_tokenizer`` and read back
by ``transformers.AutoTokenizer`` from the folder alone, must give minillm's ids and text for
tricky and random strings, and the templates must frame inputs as minillm's collators do.
Import: ``HFTokenizer`` on a GPT-2-style and a BERT-style folder must give AutoTokenizer's ids.
"""

import io
import json
import random
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

transformers = pytest.importorskip("transformers")
from tokenizers import ByteLevelBPETokenizer  # noqa: E402

from minillm.data.collate import pair_with_specials  # noqa: E402
from minillm.hf_tokenizer import HFTokenizer, export_tokenizer, load_tokenizer  # noqa: E402
from minillm.tokenizer import Tokenizer  # noqa: E402

WORDS = "the of and to in is that for it as with was on be by this function return value module class naïve café 日本語".split()


def corpus(n_docs: int = 200, seed: int = 0) -> list[str]:
    """Lines of words, no "[" "]" "<" ">": so the literal "[MASK]" needs byte fallback."""
    rng = random.Random(seed)
    return [
        "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) + "." for _ in range(rng.randint(1, 4)))
        for _ in range(n_docs)
    ]


TRICKY = [
    "plain words here",
    "  leading and trailing spaces  ",
    "multiple    inner   spaces",
    "tabs\tand\nnewlines\n\nblank lines\n",
    "\nstarts with a newline",
    "Ünïcödé, 日本語, emoji 😀 and symbols ∑≠√ ẞ",
    "digits 12345 and 3.14159",
    "[MASK] [CLS] [UNK] <sentinel_0> <0x41> look like specials but are text",
    "a[MASK]b",
    "▁ the marker itself",
    "\r\n\x00\x7f control characters",
    "",
    " ",
    "\n",
]


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcdefthe  \n\t0123456789[]<>MASKCLS_x▁éü日😀"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(n)]
    texts += ["".join(chr(rng.randint(1, 0x2FFF)) for _ in range(rng.randint(0, 12))) for _ in range(n // 4)]
    return texts


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def exported(request, tmp_path_factory):
    """(minillm tokenizer, exported folder with the bert template)."""
    root = tmp_path_factory.mktemp(request.param)
    tok = Tokenizer.train(corpus(), root / "tok", vocab_size={"bpe": 360, "unigram": 310}[request.param],
                          model_type=request.param, n_sentinels=4)
    assert tok.encode("[MASK]") != [tok.mask_id] and len(tok.encode("[MASK]")) > 2  # characters, bytes for "[" "]"
    export_tokenizer(tok, root / "hf", template="bert", model_max_length=64)
    return tok, root / "hf"


def test_export_gives_minillm_ids_and_text(exported):
    tok, folder = exported
    # split_special_tokens: "[MASK]" as characters, as minillm encodes it (the gpt template's default)
    hf = transformers.AutoTokenizer.from_pretrained(folder, split_special_tokens=True)
    for text in TRICKY + random_texts(400, seed=1):
        ids = tok.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids), text
    assert hf.decode([tok.cls_id, *tok.encode("x y"), tok.sentinel_ids[0], tok.sep_id], skip_special_tokens=True) == "x y"


def byte_runs(pieces: list[str]) -> list[bytes]:
    """The bytes of each run of consecutive byte pieces ``<0xNN>``."""
    runs, run = [], b""
    for piece in pieces + [""]:
        if piece.startswith("<0x") and len(piece) == 6:
            run += bytes([int(piece[3:5], 16)])
        elif run:
            runs, run = runs + [run], b""
    return runs


def test_export_decodes_random_ids_like_minillm(exported):
    """Any ids, except [UNK] and byte runs that are not UTF-8 (the module docstring's two exceptions)."""
    tok, folder = exported
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    rng = random.Random(2)
    checked = 0
    for _ in range(2000):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 8))]
        pieces = [tok.id_to_piece(i) for i in ids]
        if tok.unk_id in ids or not all(_utf8(run) for run in byte_runs(pieces)):
            continue
        checked += 1
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids), pieces
    assert checked > 200


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_export_loads_in_a_fresh_process(exported):
    tok, folder = exported
    texts = TRICKY + random_texts(40, seed=3)
    script = (
        "import json, sys\nfrom transformers import AutoTokenizer\n"
        "hf = AutoTokenizer.from_pretrained(sys.argv[1], split_special_tokens=True)\ntexts = json.loads(sys.stdin.read())\n"
        "print(json.dumps([hf(t, add_special_tokens=False)['input_ids'] for t in texts]))"
    )
    out = subprocess.run([sys.executable, "-c", script, str(folder)], input=json.dumps(texts),
                         capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [tok.encode(t) for t in texts]


def test_bert_template_frames_like_minillm_collators(exported):
    tok, folder = exported
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    a, b = "the module returns a value", "  naïve café 日本語\n"
    single = hf(a)
    assert single["input_ids"] == pair_with_specials(tok.encode(a), None, tok.cls_id, tok.sep_id)[0]
    ids, types = pair_with_specials(tok.encode(a), tok.encode(b), tok.cls_id, tok.sep_id)
    pair = hf(a, b)
    assert pair["input_ids"] == ids and pair["token_type_ids"] == types
    assert (hf.cls_token_id, hf.sep_token_id, hf.mask_token_id, hf.pad_token_id, hf.unk_token_id) == (
        tok.cls_id, tok.sep_id, tok.mask_id, tok.pad_id, tok.unk_id)
    assert hf.mask_token == "[MASK]" and hf.model_max_length == 64
    assert hf.decode(pair["input_ids"], skip_special_tokens=True) == tok.decode(ids)
    batch = hf([a, b], padding=True)
    assert batch["input_ids"][1][-1] == tok.pad_id and batch["attention_mask"][1][-1] == 0
    # Hugging Face's convention, which the fill-mask pipeline needs: the text "[MASK]" is the mask,
    # framed as minillm frames a fill-mask prompt (the spaces around it belong to no word).
    for prompt, parts in (("the [MASK] of", ("the", "of")), ("[MASK] starts", ("", "starts")),
                          ("ends [MASK]", ("ends", "")), ("tight[MASK]fit", ("tight", "fit"))):
        framed = [*(tok.encode(parts[0]) if parts[0] else []), tok.mask_id, *(tok.encode(parts[1]) if parts[1] else [])]
        assert hf(prompt, add_special_tokens=False)["input_ids"] == framed, prompt


def test_gpt_template_adds_nothing_and_names_eos(exported, tmp_path):
    tok, _ = exported
    written = export_tokenizer(tok, tmp_path, template="gpt", model_max_length=32)
    assert sorted(p.name for p in written) == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    prompt = "Return the value"
    assert hf(prompt)["input_ids"] == tok.encode(prompt)  # what generate_text feeds a causal LM
    assert (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id, hf.unk_token_id) == (tok.eos_id, tok.bos_id, tok.pad_id, tok.unk_id)
    batch = hf(["a", "the module returns"], padding=True)
    assert hf.padding_side == "left" and batch["input_ids"][0][0] == tok.pad_id


def test_export_refuses_what_it_cannot_express(tmp_path):
    buffer = io.BytesIO()  # sentencepiece's defaults: NFKC normalisation, extra spaces removed, no byte fallback
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus(50)), model_writer=buffer, vocab_size=120,
                                   model_type="bpe", minloglevel=2)
    foreign = Tokenizer(buffer.getvalue())
    with pytest.raises(ValueError, match="normalization rule 'nmt_nfkc'"):
        export_tokenizer(foreign, tmp_path, template="gpt", model_max_length=8)
    assert not any(tmp_path.iterdir())
    tok = Tokenizer.train(corpus(50), tmp_path / "t", vocab_size=340)
    with pytest.raises(ValueError, match="template must be one of"):
        export_tokenizer(tok, tmp_path / "x", template="xlnet", model_max_length=8)
    with pytest.raises(ValueError, match="model_max_length"):
        export_tokenizer(tok, tmp_path / "x", template="gpt", model_max_length=0)


# ---------------------------------------------------------------------- HFTokenizer

IMPORT_TEXTS = ["hello  world<|endoftext|>x", " naïve café 日本語 zzz\n", "", "The Quick, BROWN fox's 12 jumps!", "a\tb\n\nc"]


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """GPT-2-style folder: a tiny byte-level BPE as tokenizer.json, vocab.json, merges.txt and config."""
    folder = tmp_path_factory.mktemp("gpt2")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus(100), vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    end = "<|endoftext|>"
    transformers.GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=end, eos_token=end,
                                   unk_token=end).save_pretrained(folder)
    bpe.save_model(str(folder))  # transformers 5 writes no slow files: vocab.json + merges.txt from tokenizers
    return folder


def assert_same_as_transformers(ours: HFTokenizer, folder, texts):
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for text in texts:
        ids = theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    assert ours.encode_batch(texts) == ours.encode_batch(texts, num_threads=1) == [ours.encode(t) for t in texts]
    assert ours.decode_batch(ours.encode_batch(texts)) == [ours.decode(ours.encode(t)) for t in texts]


def test_hf_tokenizer_reads_gpt2_files(gpt2_folder, tmp_path):
    ours = HFTokenizer.load(gpt2_folder)
    assert_same_as_transformers(ours, gpt2_folder, IMPORT_TEXTS + random_texts(100, seed=4))
    end = ours.tokenizer.token_to_id("<|endoftext|>")
    assert (ours.eos_id, ours.bos_id, ours.unk_id, ours.pad_id) == (end, end, end, None)
    assert ours.special[end] and ours.special.sum() == 1 and ours.newline_id == ours.encode("\n")[0]
    with pytest.raises(ValueError, match="has no PAD token"):
        ours.require("pad")
    pieces = [ours.id_to_piece(i) for i in range(ours.vocab_size)]
    assert ours.word_start.tolist() == [p.startswith("Ġ") or i in (end, ours.newline_id) for i, p in enumerate(pieces)]

    slow = tmp_path / "slow"
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (slow / name).parent.mkdir(exist_ok=True)
        (slow / name).write_bytes((gpt2_folder / name).read_bytes())
    from_files = load_tokenizer(slow)  # no tokenizer.json: GPT-2's vocab.json + merges.txt
    assert isinstance(from_files, HFTokenizer) and "tokenizer.json" not in from_files.files
    assert_same_as_transformers(from_files, slow, IMPORT_TEXTS)
    assert [from_files.encode(t) for t in IMPORT_TEXTS] == [ours.encode(t) for t in IMPORT_TEXTS]
    assert from_files.fingerprint != ours.fingerprint

    copy = from_files.save(tmp_path / "copy")
    assert sorted(p.name for p in copy.iterdir()) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    assert HFTokenizer.load(copy).fingerprint == from_files.fingerprint


def test_hf_tokenizer_reads_bert_vocab(tmp_path):
    words = "the quick brown fox jump ##s ##ed over lazy dog naive cafe , . ' ! 1 2 ##2 a b c d e f ##e 日 本".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    ours = load_tokenizer(tmp_path)
    assert isinstance(ours, HFTokenizer)
    assert_same_as_transformers(ours, tmp_path, ["The quick brown fox jumps over the LAZY dog!", "Naïve café 12 日本",
                                                "[MASK] the [CLS] fox", "unknownword , zz", ""])
    assert (ours.pad_id, ours.unk_id, ours.cls_id, ours.sep_id, ours.mask_id, ours.bos_id, ours.eos_id) == (
        0, 1, 2, 3, 4, None, None)
    assert ours.special[:5].all() and not ours.special[5:].any()
    assert ours.word_start.tolist() == [not p.startswith("##") for p in vocab]
    assert ours.newline_id is None and not ours.splits_on_spaces
    assert ours.encode("the [MASK]")[-1] == 4  # Hugging Face's default: special-token text is matched


def test_load_tokenizer_picks_the_format(exported, tmp_path):
    tok, folder = exported
    assert isinstance(load_tokenizer(tok.path), Tokenizer)
    tok.save(tmp_path / "run")
    assert isinstance(load_tokenizer(tmp_path / "run"), Tokenizer)
    exported_back = load_tokenizer(folder)  # minillm's own export, read back through tokenizers
    assert isinstance(exported_back, HFTokenizer)
    specials = [tok.id_to_piece(i) for i in np.flatnonzero(tok.special)]
    plain = [t for t in TRICKY if not any(s in t for s in specials)]  # the bert template reads specials' text as them
    assert len(plain) >= len(TRICKY) - 2
    assert [exported_back.encode(t) for t in plain] == [tok.encode(t) for t in plain]
    assert exported_back.encode("a [MASK] b") == [*tok.encode("a"), tok.mask_id, *tok.encode("b")]
    assert (exported_back.cls_id, exported_back.mask_id, exported_back.eos_id) == (tok.cls_id, tok.mask_id, tok.eos_id)
    assert exported_back.sentinel_ids == tok.sentinel_ids and exported_back.newline_id == tok.newline_id
    assert np.array_equal(exported_back.word_start, tok.word_start)
    assert np.array_equal(exported_back.standalone, tok.standalone)
    assert tok.fingerprint == Tokenizer.load(tok.path).fingerprint != Tokenizer.train(
        corpus(60), tmp_path / "other", vocab_size=340).fingerprint


def test_bad_tokenizer_paths_give_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    cases = [
        (tmp_path / "missing", FileNotFoundError, "no tokenizer at"),
        (tmp_path / "empty", FileNotFoundError, "tokenizer.json, vocab.json \\+ merges.txt, or vocab.txt"),
        (tmp_path / "notes.txt", ValueError, "not a sentencepiece .model"),
        (tmp_path / "broken", ValueError, "could not be read by tokenizers"),
    ]
    for path, error, message in cases:
        with pytest.raises(error, match=message) as caught:
            load_tokenizer(path)
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(FileNotFoundError, match="tokenizer.json, vocab.json"):
        HFTokenizer.load(tmp_path / "empty")
