"""Sentencepiece tokenizer with fixed special-token ids.

A minillm tokenizer is one sentencepiece ``.model`` file. Training one here lays out the
vocabulary the same way every time:

==========  ====  ===========  ==================================================
constant    id    piece        used by
==========  ====  ===========  ==================================================
PAD_ID      0     ``[PAD]``    padding in every collator (``attention_mask`` 0)
UNK_ID      1     ``[UNK]``    characters outside the vocabulary (rare: byte fallback)
CLS_ID      2     ``[CLS]``    first token of MLM / NSP / classification inputs
SEP_ID      3     ``[SEP]``    end of each segment in MLM / NSP / classification
MASK_ID     4     ``[MASK]``   masked positions in MLM
BOS_ID      5     ``[BOS]``    decoder start token (seq2seq)
EOS_ID      6     ``[EOS]``    end of every document in token shards, end of targets
7 ..        ...   ``<sentinel_i>``  T5 span-corruption sentinels (``n_sentinels``, default 16)
next        ...   ``"\\n"``     a newline is one piece, so line structure survives
==========  ====  ===========  ==================================================

then 256 byte pieces ``<0x00>`` .. ``<0xFF>`` (byte fallback: any UTF-8 text encodes without
``[UNK]``) and the learned pieces. ``[CLS]``, ``[SEP]``, ``[MASK]`` and the sentinels are
*control* pieces: text that happens to contain the string ``"[MASK]"`` is tokenised as ordinary
characters, never as the mask token, and ``decode`` drops control pieces.

Normalisation is the identity (no NFKC, whitespace kept as is), so for a tokenizer trained
here ``decode(encode(text)) == text`` for every string, with one exception inherited from
sentencepiece: the character U+2581 ("▁") itself stands for a space and decodes as one.

Foreign models. ``Tokenizer.load`` accepts any sentencepiece ``.model``. Its pad/unk/bos/eos
ids come from the model itself; CLS/SEP/MASK are looked up by piece name (``[CLS]``/``<cls>``,
``[SEP]``/``<sep>``, ``[MASK]``/``<mask>``), and so is the newline piece ``"\\n"``
(``newline_id``; NSP cuts at blank lines with it). An id the model lacks is ``None`` on the instance
(``tok.mask_id is None``) and an objective that needs it raises a ``ValueError`` naming the
token. Sentinels are the pieces named ``<sentinel_i>`` or ``<extra_id_i>`` (T5); a model with
neither uses the top ``n`` ids of its vocabulary (those pieces become ambiguous: documented
limit).

Whole-word masking uses sentencepiece's word-start marker ``"▁"`` (U+2581):
``word_start[id]`` is True for pieces beginning with it and for stand-alone pieces (control,
user-defined such as the newline, unknown); ``standalone[id]`` marks the latter, after which
the next piece also starts a word. This works for any sentencepiece vocabulary.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from minillm.files import write_atomic

PAD_ID = 0
UNK_ID = 1
CLS_ID = 2
SEP_ID = 3
MASK_ID = 4
BOS_ID = 5
EOS_ID = 6

SPECIAL_PIECES = {
    PAD_ID: "[PAD]",
    UNK_ID: "[UNK]",
    CLS_ID: "[CLS]",
    SEP_ID: "[SEP]",
    MASK_ID: "[MASK]",
    BOS_ID: "[BOS]",
    EOS_ID: "[EOS]",
}

WORD_START = "\u2581"  # sentencepiece's "▁": the piece begins a new whitespace-separated word

# Training lines are cut to this many characters (at most 4 * 1024 UTF-8 bytes, the
# max_sentence_length passed to sentencepiece, which silently skips longer sentences).
_MAX_LINE_CHARS = 1024


def _training_sentences(texts_or_files: Iterable, stats: dict) -> Iterator[str]:
    """Yield non-empty lines (cut to sentencepiece's limit) from texts, Documents or files.

    ``str`` items are text; ``pathlib.Path`` items are read as UTF-8 text files; objects with a
    ``.text`` attribute (``minillm.data.corpus.Document``) give their text.
    """
    from minillm.data.corpus import read_text_file  # local: keeps tokenizer importable alone

    for item in texts_or_files:
        if isinstance(item, Path):
            texts: Iterable[str] = (doc.text for doc in read_text_file(item))
        elif isinstance(item, str):
            texts = (item,)
        elif hasattr(item, "text"):
            texts = (item.text,)
        else:
            raise TypeError(
                f"Tokenizer.train: texts_or_files items must be str, pathlib.Path or Document, "
                f"got {type(item).__name__}"
            )
        for text in texts:
            for line in text.split("\n"):
                if not line.strip():
                    continue
                stats["bytes"] += len(line.encode("utf-8"))
                for start in range(0, len(line), _MAX_LINE_CHARS):
                    stats["sentences"] += 1
                    yield line[start : start + _MAX_LINE_CHARS]


# sentencepiece_model.proto, SentencePiece.Type
_UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED = 2, 3, 4, 5


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _fields(message: bytes):
    """(field number, value) of each field of a serialised protobuf message, in order.

    The wire type says how the value is stored: 0 varint (an int), 1 and 5 fixed 8 and 4 bytes,
    2 length-delimited (bytes: a string or a nested message).
    """
    pos = 0
    while pos < len(message):
        key, pos = _varint(message, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(message, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = message[pos : pos + size], pos + size
        elif wire == 2:
            length, pos = _varint(message, pos)
            value, pos = message[pos : pos + length], pos + length
        else:
            raise ValueError(f"unexpected protobuf wire type {wire} in sentencepiece model")
        yield field, value


def _piece_types(model_proto: bytes) -> list[int]:
    """The type of every piece, read from the serialised ModelProto with a minimal wire parser.

    ModelProto field 1 is ``repeated SentencePiece pieces``; in each, field 3 is the type
    (NORMAL=1, UNKNOWN=2, CONTROL=3, USER_DEFINED=4, UNUSED=5, BYTE=6; absent means NORMAL).
    sentencepiece's Python API has is_control / is_unknown / is_unused but no is_user_defined.
    """
    return [
        next((value for sub_field, value in _fields(piece) if sub_field == 3), 1)
        for field, piece in _fields(model_proto)
        if field == 1
    ]


class TokenizerInterface:
    """What minillm asks of a tokenizer, and the parts both kinds share. `Tokenizer` (sentencepiece,
    below) and `minillm.hf_tokenizer.HFTokenizer` (a Hugging Face folder) implement it: ids
    ``pad_id unk_id cls_id sep_id mask_id bos_id eos_id newline_id`` (None when absent), the tables
    ``special``, ``standalone``, ``word_start``, ``vocab_size``, ``encode(_batch)``, ``decode(_batch)``,
    ``id_to_piece``, ``splits_on_spaces``, ``space_ids``, ``fingerprint``, ``save`` and ``path``."""

    KIND = "this tokenizer"  # how an error names a tokenizer that has no path
    _sentinel_ids: list[int]

    @property
    def sentinel_ids(self) -> list[int]:
        """Span-corruption sentinel ids, ``sentinel_ids[0]`` first: the pieces named as sentinels, else
        the top 100 ids of the vocabulary (see the module docstring)."""
        if self._sentinel_ids:
            return list(self._sentinel_ids)
        return list(range(self.vocab_size - 1, max(self.vocab_size - 101, 0), -1))

    def is_word_start(self, i: int) -> bool:
        """True when piece ``i`` starts a new word (see ``word_start``)."""
        return bool(self.word_start[i])

    def require(self, name: str) -> int:
        """The id of special token ``name`` ("pad", "cls", ...), or a ValueError naming it."""
        value = getattr(self, f"{name}_id")
        if value is None:
            raise ValueError(f"{self.path or self.KIND} has no {name.upper()} token; it is needed here")
        return value


class Tokenizer(TokenizerInterface):
    """A sentencepiece model plus the special-token ids and word-start tables minillm needs.

    Build one with :meth:`train` or :meth:`load`; the constructor takes the serialised model.
    """

    KIND = "this sentencepiece model"

    def __init__(self, model_proto: bytes, path: Path | None = None):
        self.model_proto = model_proto
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        sp = self.sp
        n = sp.get_piece_size()

        def piece_id(*names: str) -> int | None:
            for name in names:
                i = sp.piece_to_id(name)
                if i != sp.unk_id() or name == sp.id_to_piece(sp.unk_id()):
                    return i
            return None

        def sp_id(i: int) -> int | None:
            return None if i < 0 else i

        self.pad_id = sp_id(sp.pad_id())
        self.unk_id = sp_id(sp.unk_id())
        self.bos_id = sp_id(sp.bos_id())
        self.eos_id = sp_id(sp.eos_id())
        self.cls_id = piece_id("[CLS]", "<cls>")
        self.sep_id = piece_id("[SEP]", "<sep>")
        self.mask_id = piece_id("[MASK]", "<mask>")
        self.newline_id = piece_id("\n")

        pieces = [sp.id_to_piece(i) for i in range(n)]
        types = np.array(_piece_types(model_proto))  # (V,) sentencepiece piece types
        if len(types) != n:
            raise ValueError(f"sentencepiece model {path}: read {len(types)} piece types for {n} pieces")
        self.special = np.isin(types, (_UNKNOWN, _CONTROL))
        """``special[id]``: never chosen for masking or random replacement (control, unknown, and
        the special tokens found by name, which a foreign model may keep as user-defined pieces)."""
        named = [self.pad_id, self.cls_id, self.sep_id, self.mask_id, self.bos_id, self.eos_id]
        self.special[[i for i in named if i is not None]] = True
        self.standalone = np.isin(types, (_UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED))
        """``standalone[id]``: control/unknown/user-defined piece; the piece after it starts a word."""
        self.word_start = np.array([p.startswith(WORD_START) for p in pieces], dtype=bool) | self.standalone
        """``word_start[id]``: the piece begins a new word (whole-word masking)."""

        found: list[int] = []
        for k in range(n):  # <sentinel_0>, <sentinel_1>, ... until the first one missing
            i = piece_id(f"<sentinel_{k}>", f"<extra_id_{k}>")
            if i is None:
                break
            found.append(i)
        self._sentinel_ids = found

    # ------------------------------------------------------------------ construction

    @classmethod
    def train(
        cls,
        texts_or_files: Iterable,
        path: str | os.PathLike,
        vocab_size: int,
        model_type: str = "bpe",
        *,
        n_sentinels: int = 16,
        character_coverage: float = 0.9995,
        max_sentences: int = 2_000_000,
        num_threads: int | None = None,
        seed: int = 0,
    ) -> "Tokenizer":
        """Train a sentencepiece model and write it atomically to ``path`` (``.model`` added).

        Args:
            texts_or_files: iterable of ``str`` (text), ``pathlib.Path`` (UTF-8 text file) or
                ``Document``. It is streamed to sentencepiece; no temporary text file is written.
                An error raised while reading it (a bad JSONL line, invalid UTF-8) is raised as is.
            path: where to write the ``.model`` file.
            vocab_size: total pieces, specials and the 256 byte pieces included (so at least
                ~300 + ``n_sentinels``). Too large for the corpus is a ``ValueError`` that says
                the largest size the corpus supports.
            model_type: ``"bpe"`` or ``"unigram"``.
            n_sentinels: T5 sentinel pieces reserved after the specials (0 for none).
            character_coverage: fraction of characters covered by pieces; the rest use bytes.
            max_sentences: sentencepiece samples at most this many lines (memory bound).
            num_threads: trainer threads (default: all cores).
            seed: seed for sentencepiece's sampling of training lines.
        """
        if model_type not in ("bpe", "unigram"):
            raise ValueError(f"Tokenizer.train: model_type must be 'bpe' or 'unigram', got {model_type!r}")
        if not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"Tokenizer.train: vocab_size must be a positive int, got {vocab_size!r}")
        if n_sentinels < 0:
            raise ValueError(f"Tokenizer.train: n_sentinels must be >= 0, got {n_sentinels}")
        path = Path(path)
        if path.suffix != ".model":
            path = path.with_name(path.name + ".model")
        control = ["[CLS]", "[SEP]", "[MASK]"] + [f"<sentinel_{k}>" for k in range(n_sentinels)]
        minimum = len(control) + 4 + 1 + 256
        if vocab_size <= minimum:
            raise ValueError(
                f"Tokenizer.train: vocab_size={vocab_size} leaves no room for learned pieces: "
                f"{minimum} ids are taken by specials, sentinels, the newline and 256 byte pieces"
            )

        stats = {"bytes": 0, "sentences": 0}
        sentences = _training_sentences(texts_or_files, stats)
        first = next(sentences, None)
        if first is None:
            raise ValueError("Tokenizer.train: the corpus is empty (no non-blank line in texts_or_files)")

        reader_errors: list[BaseException] = []

        def all_sentences() -> Iterator[str]:
            """The sentences, keeping any error the reader raises: sentencepiece would turn it into
            ``RuntimeError("INTERNAL: ...")``, losing the reader's one-line ValueError that names the
            file and the line (JSONL) or byte offset (invalid UTF-8)."""
            try:
                yield first
                yield from sentences
            except (Exception, KeyboardInterrupt) as err:
                reader_errors.append(err)
                raise

        buffer = io.BytesIO()
        spm.set_random_generator_seed(seed)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=all_sentences(),
                model_writer=buffer,
                vocab_size=vocab_size,
                model_type=model_type,
                pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
                pad_piece="[PAD]", unk_piece="[UNK]", bos_piece="[BOS]", eos_piece="[EOS]",
                control_symbols=control,
                user_defined_symbols=["\n"],
                byte_fallback=True,
                normalization_rule_name="identity",  # exact round trip
                remove_extra_whitespaces=False,
                add_dummy_prefix=True,
                split_digits=True,  # numbers as digits: a small vocabulary need not learn them
                character_coverage=character_coverage,
                input_sentence_size=max_sentences,
                shuffle_input_sentence=True,
                max_sentence_length=4 * _MAX_LINE_CHARS,
                num_threads=num_threads or os.cpu_count() or 1,
                minloglevel=2,
            )
        except RuntimeError as err:
            if reader_errors:
                raise reader_errors[0] from None
            message = str(err)
            said = message.split("]")[-1].strip()
            if "smaller than required_chars" in message:
                raise ValueError(
                    f"Tokenizer.train: vocab_size={vocab_size} cannot hold the corpus's distinct characters; "
                    f"raise vocab_size or lower character_coverage ({character_coverage}); sentencepiece says: {said}"
                ) from None
            if "Vocabulary size" in message:
                raise ValueError(
                    f"Tokenizer.train: vocab_size={vocab_size} is larger than the corpus supports "
                    f"({stats['sentences']} lines, {stats['bytes']} bytes); sentencepiece says: {said}"
                ) from None
            raise
        tok = cls(buffer.getvalue(), path)
        write_atomic(path, tok.model_proto)
        return tok

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load any sentencepiece ``.model`` file (or a directory holding ``tokenizer.model``)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(f"Tokenizer.load: no sentencepiece model at {path}")
        data = path.read_bytes()
        try:
            return cls(data, path)
        except RuntimeError as err:
            raise ValueError(f"Tokenizer.load: {path} is not a sentencepiece model ({err})") from None

    def save(self, directory: str | os.PathLike) -> Path:
        """Copy the model into ``directory/tokenizer.model`` (atomic) and return that path.

        Every run directory and checkpoint carries its tokenizer this way.
        """
        target = Path(directory) / "tokenizer.model"
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, self.model_proto)
        return target

    # ------------------------------------------------------------------ encode / decode

    @property
    def vocab_size(self) -> int:
        """Number of pieces; model embeddings need exactly this many rows."""
        return self.sp.get_piece_size()

    @property
    def fingerprint(self) -> str:
        """SHA-256 hex digest of the serialised model: equal exactly when two tokenizers are the same model."""
        return hashlib.sha256(self.model_proto).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no specials added)."""
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """Token ids of many texts at once; sentencepiece encodes them in C++ threads."""
        return self.sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; control pieces (specials, sentinels) decode to nothing."""
        return self.sp.decode([int(i) for i in ids])

    def decode_batch(self, batch: Iterable[Iterable[int]], num_threads: int = -1) -> list[str]:
        """Texts of many id lists at once."""
        return self.sp.decode([[int(i) for i in ids] for ids in batch], num_threads=num_threads)

    @property
    def splits_on_spaces(self) -> bool:
        """True when ``encode(text)`` equals the concatenation of ``encode(w)`` over
        ``text.split(" ")`` (an empty ``w`` standing for a lone ``"▁"``).

        Holds for tokenizers trained here (identity normalisation, dummy prefix, no piece with
        ``"▁"`` inside); prepare then encodes each distinct word once and reuses it, which is
        faster than sentencepiece on whole documents. Only claimed for models with minillm's
        special-piece layout, then checked on the vocabulary and on probes; a foreign model
        (whose normaliser may, say, collapse whitespace) is always encoded whole.
        """
        if not hasattr(self, "_splits_on_spaces"):
            pieces = [self.sp.id_to_piece(i) for i in range(self.vocab_size)]
            ours = pieces[: len(SPECIAL_PIECES)] == [SPECIAL_PIECES[i] for i in range(len(SPECIAL_PIECES))]
            inner_marker = any(WORD_START in p[1:] for p in pieces)
            probes = ["a  b", " x", "x ", "two words\nline", "  "]
            space = self.space_ids
            ok = ours and not inner_marker and all(
                self.sp.encode(text) == [i for w in text.split(" ") for i in (self.sp.encode(w) if w else space)]
                for text in probes
            )
            self._splits_on_spaces = ok
        return self._splits_on_spaces

    @property
    def space_ids(self) -> list[int]:
        """Ids of a lone ``"▁"`` (what one space between two spaces encodes to)."""
        ids = self.sp.encode(" ")  # the dummy prefix plus the space: "▁▁", two equal halves
        return ids[: len(ids) // 2]

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, path={str(self.path)!r})"

