"""Tokenizers that leave and enter minillm: Hugging Face ``tokenizer.json`` in both directions.

Three things live here:

- :func:`export_tokenizer` writes a minillm sentencepiece :class:`~minillm.tokenizer.Tokenizer` as
  a Hugging Face tokenizer folder (``tokenizer.json``, ``tokenizer_config.json``,
  ``special_tokens_map.json``) that ``transformers.AutoTokenizer.from_pretrained(folder)`` reads
  alone and that gives exactly minillm's ids and text.
- :class:`HFTokenizer` reads a Hugging Face tokenizer folder with the ``tokenizers`` library alone
  (``tokenizer.json``; or GPT-2's ``vocab.json`` + ``merges.txt``; or BERT's ``vocab.txt``) and
  offers the interface of minillm's ``Tokenizer``, so the rest of minillm can use either.
- :func:`load_tokenizer` picks one of the two for a path.

How a sentencepiece model maps onto ``tokenizers``
--------------------------------------------------
sentencepiece normalises the text (identity here; spaces become ``"▁"``, and a ``"▁"`` is put in
front: the dummy prefix), then segments the *whole* normalised string: BPE merges the adjacent pair
whose merged piece scores highest; unigram takes the Viterbi path through the lattice of pieces.
User-defined pieces (minillm's ``"\\n"``) are cut out first; characters no piece covers become
unknown and, with byte fallback, their UTF-8 bytes ``<0xNN>``. Control pieces (``[CLS]``, ``[MASK]``,
sentinels), byte pieces and ``[UNK]`` are never matched in text. The export mirrors each step:

=================  ===========================================================================
sentencepiece      ``tokenizers``
=================  ===========================================================================
identity + spaces  normalizer ``Replace(" ", "▁")``, then ``Prepend("▁")`` (the dummy prefix); in the
                   normalizer, not the pre-tokenizer, so ``"\\nb"`` gives ``▁ \\n b`` as in sentencepiece
user-defined       one-character pieces only (minillm's ``"\\n"``): a plain vocabulary entry no merge
                   touches, so it stays one token; not an added token, which would be cut out before
                   the dummy prefix is added
control / unknown  special added tokens. Template "gpt": ``split_special_tokens=True`` in
                   ``tokenizer_config.json``, so the text ``"[MASK]"`` is characters, as minillm's
                   ``encode`` makes it. Template "bert": the text of a special token is that token
                   (Hugging Face's convention; ``pipeline("fill-mask")`` and minillm's fill-mask both
                   read ``"[MASK]"`` in a prompt as the mask), and the mask token eats the spaces
                   around it, so ``"a [MASK] b"`` gives ``▁a [MASK] ▁b``, as minillm frames it
BPE                ``models.BPE`` with merges derived from the vocabulary: every split of a normal
                   piece into two normal pieces is a merge, ranked by the merged piece's score
                   (sentencepiece merges the best-scoring piece first). No pre-tokenizer: like
                   sentencepiece, BPE runs over the whole string
unigram            ``models.Unigram`` with sentencepiece's scores; the pieces sentencepiece never
                   matches get a score no path would choose, and a pre-tokenizer isolates every
                   character no piece covers (sentencepiece makes it one unknown node anyway), so
                   such a piece can never stand in for an unknown character either
byte fallback      ``byte_fallback=True`` in the model; decoder ``ByteFallback``
decoding           decoder ``Metaspace`` ("▁" to spaces, the first piece's leading space dropped),
                   ``ByteFallback``, ``Fuse``; control pieces dropped by ``skip_special_tokens=True``
=================  ===========================================================================

Templates: ``"bert"`` adds ``[CLS] A [SEP]`` and ``[CLS] A [SEP] B [SEP]`` (token types 0 then 1),
as minillm's MLM, NSP and classification data do; ``"t5"`` ends a source with ``[EOS]``, as minillm's
seq2seq data and generation do; ``"gpt"`` adds nothing, as minillm's generation
feeds the prompt's ids alone.

Supported: minillm's own tokenizers (BPE or unigram), and any sentencepiece model with the same
features. Refused with a ``ValueError`` naming the feature, never written approximately: a
normalisation rule other than identity, ``remove_extra_whitespaces``, ``escape_whitespaces=False``,
``treat_whitespace_as_suffix``, ``allow_whitespace_only_pieces``, no byte fallback, model types
other than BPE and unigram, unused pieces, a single-character control piece, and a BPE model whose
normal pieces share a score (sentencepiece and ``tokenizers`` break such ties differently).

Decoding with the ``"gpt"`` template keeps the space of every ``"▁"``, the first piece's included:
transformers' ``pipeline("text-generation")`` decodes the new tokens on their own and appends them
to the prompt, and the first new piece of ``"the red cat"`` + ``"▁sat"`` must give ``" sat"``. So
``decode(encode("hello"))`` is ``" hello"`` there: the dummy prefix's space, which sentencepiece drops
from the first piece of a text. The ``"bert"`` template decodes exactly as sentencepiece does.

Known differences, both in ``decode`` of ids that no text encodes to (``tokenizers`` has no decoder
that could reproduce them): the ``[UNK]`` id, which sentencepiece writes as ``" ⁇ "`` and Hugging Face
drops with ``skip_special_tokens=True`` (a minillm tokenizer never produces ``[UNK]``: byte fallback);
and a run of byte pieces that is not valid UTF-8, where sentencepiece keeps the valid characters and
writes U+FFFD for each bad byte, while ``ByteFallback`` writes U+FFFD for every byte of the run.
With template "bert", text that spells a special token (``"[SEP]"``) is that token, where minillm's
``encode`` gives characters: the one difference in ids, and the convention of every BERT tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors

from minillm.files import write_atomic
from minillm.tokenizer import WORD_START, Tokenizer, TokenizerInterface, _fields, _piece_types

TEMPLATES = ("bert", "gpt", "t5")

# sentencepiece_model.proto: field numbers and proto2 defaults of the settings the export reads.
_MODEL_PIECES, _MODEL_TRAINER, _MODEL_NORMALIZER, _MODEL_DENORMALIZER = 1, 2, 3, 5
_PIECE_SCORE = 2
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_TRAINER_DEFAULTS = {  # field number: (name, default)
    3: ("model_type", 1),  # 1 unigram, 2 BPE, 3 word, 4 char
    24: ("treat_whitespace_as_suffix", 0),
    26: ("allow_whitespace_only_pieces", 0),
    35: ("byte_fallback", 0),
}
_NORMALIZER_DEFAULTS = {
    1: ("name", b""),
    2: ("precompiled_charsmap", b""),
    3: ("add_dummy_prefix", 1),
    4: ("remove_extra_whitespaces", 1),
    5: ("escape_whitespaces", 1),
    6: ("normalization_rule_tsv", b""),
}
_UNIGRAM, _BPE = 1, 2

# A score no Viterbi path takes: far below any sum of real piece scores (float32 log-probabilities).
_NEVER = -1e10


def _settings(message: bytes, defaults: dict) -> dict:
    """The fields of a nested spec message by name, with proto2 defaults for absent ones."""
    found = {name: default for name, default in defaults.values()}
    for field, value in _fields(message):
        if field in defaults:
            found[defaults[field][0]] = value
    return found


def _read_model(model_proto: bytes) -> tuple[dict, dict, list[float]]:
    """Trainer spec, normalizer spec and piece scores of a serialised sentencepiece ModelProto."""
    trainer, normalizer, scores, denormalizer = b"", b"", [], b""
    for field, value in _fields(model_proto):
        if field == _MODEL_PIECES:
            raw = next((v for f, v in _fields(value) if f == _PIECE_SCORE), b"\0\0\0\0")
            scores.append(float(np.frombuffer(raw, dtype="<f4")[0]))
        elif field == _MODEL_TRAINER:
            trainer = value
        elif field == _MODEL_NORMALIZER:
            normalizer = value
        elif field == _MODEL_DENORMALIZER:
            denormalizer = value
    spec = _settings(normalizer, _NORMALIZER_DEFAULTS)
    spec["denormalizer_charsmap"] = _settings(denormalizer, _NORMALIZER_DEFAULTS)["precompiled_charsmap"]
    return _settings(trainer, _TRAINER_DEFAULTS), spec, scores


def _refuse_inexpressible(tokenizer: Tokenizer, trainer: dict, normalizer: dict, types: list[int], scores: list[float]):
    """Raise a ValueError naming the first sentencepiece feature the export cannot reproduce exactly."""
    where = f"export_tokenizer: {tokenizer.path or 'this sentencepiece model'}"
    refusals = [
        (trainer["model_type"] not in (_UNIGRAM, _BPE),
         f"model_type {trainer['model_type']} (only unigram=1 and BPE=2 map onto tokenizers)"),
        (normalizer["precompiled_charsmap"] or normalizer["normalization_rule_tsv"] or normalizer["denormalizer_charsmap"],
         f"normalization rule {normalizer['name'].decode() or 'custom'!r} (only 'identity' is exported exactly)"),
        (normalizer["remove_extra_whitespaces"], "remove_extra_whitespaces=True"),
        (not normalizer["escape_whitespaces"], "escape_whitespaces=False"),
        (trainer["treat_whitespace_as_suffix"], "treat_whitespace_as_suffix=True"),
        (trainer["allow_whitespace_only_pieces"], "allow_whitespace_only_pieces=True"),
        (not trainer["byte_fallback"], "byte_fallback=False (unknown characters would differ)"),
        (_UNUSED in types, "unused pieces"),
        (any(kind == _USER_DEFINED and len(tokenizer.id_to_piece(i)) > 1 for i, kind in enumerate(types)),
         "user-defined pieces longer than one character"),
    ]
    for refused, feature in refusals:
        if refused:
            raise ValueError(f"{where}: sentencepiece feature {feature} cannot be expressed exactly; not exported")
    for i, kind in enumerate(types):
        if kind in (_CONTROL, _UNKNOWN) and len(tokenizer.id_to_piece(i)) == 1:
            raise ValueError(
                f"{where}: single-character control piece {tokenizer.id_to_piece(i)!r} (id {i}) would be "
                f"matched in text by tokenizers; not exported"
            )
    if trainer["model_type"] == _BPE:
        merged = [scores[i] for i, kind in enumerate(types) if kind == _NORMAL and len(tokenizer.id_to_piece(i)) > 1]
        if len(set(merged)) != len(merged):
            raise ValueError(
                f"{where}: BPE pieces with equal scores (sentencepiece and tokenizers break ties differently); not exported"
            )


def bpe_merges(pieces: Sequence[str], scores: Sequence[float], normal: Sequence[bool]) -> list[tuple[str, str]]:
    """Merges for ``tokenizers.models.BPE`` from a sentencepiece BPE vocabulary.

    sentencepiece BPE keeps no merge list: it merges the adjacent pair whose concatenation is the
    best-scoring normal piece. So every way of writing a normal piece as two normal pieces is a
    merge, ranked by the merged piece's score (highest first, then its id), which makes
    ``tokenizers`` pick the same pair at every step.
    """
    normal_ids = {piece: i for i, piece in enumerate(pieces) if normal[i]}
    ranked = []
    for piece, i in normal_ids.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal_ids and right in normal_ids:
                ranked.append((-scores[i], i, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _build_tokenizer_json(tokenizer: Tokenizer, template: str) -> tokenizers.Tokenizer:
    trainer, normalizer, scores = _read_model(tokenizer.model_proto)
    types = _piece_types(tokenizer.model_proto)
    _refuse_inexpressible(tokenizer, trainer, normalizer, types, scores)
    pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    normal = [kind == _NORMAL for kind in types]

    if trainer["model_type"] == _BPE:
        vocab = {piece: i for i, piece in enumerate(pieces)}
        model = models.BPE(vocab, bpe_merges(pieces, scores, normal), unk_token=pieces[tokenizer.unk_id],
                           byte_fallback=True, fuse_unk=False)
        pre_tokenizer = None
    else:
        matched = [kind in (_NORMAL, _USER_DEFINED) for kind in types]
        scored = [(piece, score if matched[i] else _NEVER) for i, (piece, score) in enumerate(zip(pieces, scores))]
        model = models.Unigram(scored, unk_id=tokenizer.unk_id, byte_fallback=True)
        covered = sorted({piece for i, piece in enumerate(pieces) if types[i] in (_NORMAL, _USER_DEFINED) and len(piece) == 1})
        uncovered = "[^" + "".join(re.escape(c) for c in covered) + "]"
        pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(uncovered), behavior="isolated")

    hf = tokenizers.Tokenizer(model)
    steps = [normalizers.Replace(" ", WORD_START)]
    if normalizer["add_dummy_prefix"]:
        steps.append(normalizers.Prepend(WORD_START))
    hf.normalizer = normalizers.Sequence(steps)
    if pre_tokenizer is not None:
        hf.pre_tokenizer = pre_tokenizer
    # Metaspace turns "▁" into spaces and drops the dummy prefix's space from the first piece only,
    # before ByteFallback: a leading <0x20> byte piece keeps its space, as in sentencepiece. Not for
    # "gpt": generation pipelines decode the new tokens alone and append them to the prompt, so
    # the first new piece ("▁cat") must keep its space (see the module docstring).
    prepend = "always" if normalizer["add_dummy_prefix"] and template in ("bert", "t5") else "never"
    hf.decoder = decoders.Sequence([decoders.Metaspace(WORD_START, prepend_scheme=prepend), decoders.ByteFallback(), decoders.Fuse()])

    # Already in the model's vocabulary, so their ids stay sentencepiece's. BERT's mask eats the
    # spaces around it, and each side then gets its own dummy prefix: "a [MASK] b" is ▁a [MASK] ▁b,
    # the framing of minillm's fill-mask (generation._fill_masks) and of MLM training.
    mask = tokenizer.mask_id if template == "bert" else None
    hf.add_tokens([AddedToken(pieces[i], special=True, normalized=False, lstrip=i == mask, rstrip=i == mask)
                   for i, kind in enumerate(types) if kind in (_CONTROL, _UNKNOWN)])

    if template == "bert":
        cls, sep = tokenizer.require("cls"), tokenizer.require("sep")
        hf.post_processor = processors.TemplateProcessing(
            single=f"{pieces[cls]}:0 $A:0 {pieces[sep]}:0",
            pair=f"{pieces[cls]}:0 $A:0 {pieces[sep]}:0 $B:1 {pieces[sep]}:1",
            special_tokens=[(pieces[cls], cls), (pieces[sep], sep)],
        )
    elif template == "t5":  # a source ends with EOS, as minillm's seq2seq data and generation end it
        eos = tokenizer.require("eos")
        hf.post_processor = processors.TemplateProcessing(
            single=f"$A:0 {pieces[eos]}:0", pair=f"$A:0 {pieces[eos]}:0 $B:1 {pieces[eos]}:1",
            special_tokens=[(pieces[eos], eos)],
        )
    else:
        hf.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    return hf


def export_tokenizer(tokenizer: Tokenizer, out_dir: str | os.PathLike, *, template: str, model_max_length: int) -> list[Path]:
    """Write ``tokenizer`` as a Hugging Face tokenizer folder and return the files written.

    ``AutoTokenizer.from_pretrained(out_dir)`` then encodes every text to ``tokenizer.encode(text)``
    (``add_special_tokens=False``; with the default ``True``, the template's specials around it) and
    ``decode(ids, skip_special_tokens=True)`` gives ``tokenizer.decode(ids)``. See the module
    docstring for the mapping, what is refused and the one known difference.

    Args:
        tokenizer: a minillm sentencepiece tokenizer.
        out_dir: the folder (created if needed); files are written atomically.
        template: ``"bert"`` (``[CLS] A [SEP]``, pairs ``[CLS] A [SEP] B [SEP]``), ``"gpt"`` (nothing
            added) or ``"t5"`` (``A [EOS]``: an encoder-decoder's source; decoding as ``"bert"``).
        model_max_length: the model's context length, recorded for truncation.
    """
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"export_tokenizer: tokenizer must be a minillm sentencepiece Tokenizer, got {type(tokenizer).__name__}")
    if template not in TEMPLATES:
        raise ValueError(f"export_tokenizer: template must be one of {TEMPLATES}, got {template!r}")
    if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 1:
        raise ValueError(f"export_tokenizer: model_max_length must be a positive int, got {model_max_length!r}")
    hf = _build_tokenizer_json(tokenizer, template)

    names = {"pad": "pad_token", "unk": "unk_token", "cls": "cls_token", "sep": "sep_token",
             "mask": "mask_token", "bos": "bos_token", "eos": "eos_token"}
    special_map = {key: tokenizer.id_to_piece(getattr(tokenizer, f"{name}_id"))
                   for name, key in names.items() if getattr(tokenizer, f"{name}_id") is not None}
    sentinels = [tokenizer.id_to_piece(i) for i in tokenizer._sentinel_ids]
    if sentinels:
        special_map["additional_special_tokens"] = sentinels
    if template in ("gpt", "t5") and "eos_token" not in special_map:
        raise ValueError("export_tokenizer: template 'gpt' needs an EOS token to stop generation; this tokenizer has none")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,  # its clean-up would change the decoded text
        # gpt: "[MASK]" in text is characters, as minillm encodes it. bert: the text "[MASK]" is the
        # mask token, Hugging Face's convention, which pipeline("fill-mask") and minillm generate need.
        "split_special_tokens": template != "bert",
        "padding_side": "left" if template == "gpt" else "right",  # left: batched generation
        "model_input_names": ["input_ids", "attention_mask"] + (["token_type_ids"] if template == "bert" else []),
        "add_bos_token": False,
        "add_eos_token": False,
        **special_map,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "tokenizer.json": hf.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
        "special_tokens_map.json": json.dumps(special_map, indent=2, ensure_ascii=False),
    }
    written = []
    for name, text in files.items():
        write_atomic(out_dir / name, (text + "\n").encode("utf-8"))
        written.append(out_dir / name)
    return written


# ---------------------------------------------------------------------- Hugging Face folders in minillm

_SPECIAL_NAMES = ("pad", "unk", "cls", "sep", "mask", "bos", "eos")
# A format's convention, for the special tokens its folder's config does not name.
_DEFAULT_SPECIALS = {
    "wordpiece": {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"},
    "byte_level": {"unk": "<|endoftext|>", "bos": "<|endoftext|>", "eos": "<|endoftext|>"},
}
_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def _token_text(value) -> str | None:
    """A special token as written in a config: a string, or a dict with its ``content``."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _special_pieces(config: dict, kind: str) -> dict[str, str | None]:
    """The piece of each named special token: the config's (None when it says null), else the format's."""
    defaults = _DEFAULT_SPECIALS.get(kind, {})
    return {name: _token_text(config[f"{name}_token"]) if f"{name}_token" in config else defaults.get(name)
            for name in _SPECIAL_NAMES}


class HFTokenizer(TokenizerInterface):
    """A Hugging Face tokenizer folder, read with the ``tokenizers`` library alone, behind minillm's
    ``Tokenizer`` interface.

    Formats, first found wins: ``tokenizer.json`` (any model ``tokenizers`` reads); GPT-2's
    ``vocab.json`` + ``merges.txt`` (byte-level BPE, ``add_prefix_space`` from the config, default
    False); BERT's ``vocab.txt`` (WordPiece with BERT's normaliser and pre-tokenizer;
    ``do_lower_case`` default True, ``strip_accents`` and ``tokenize_chinese_chars`` from the config).

    Special ids come from ``tokenizer_config.json`` / ``special_tokens_map.json`` (``pad_token``,
    ``unk_token``, ... by name); a name neither file mentions takes its format's convention (BERT: ``[PAD]``
    ``[UNK]`` ``[CLS]`` ``[SEP]`` ``[MASK]``, no BOS/EOS; GPT-2: BOS = EOS = UNK = ``<|endoftext|>``, no
    PAD). An id the vocabulary lacks is None, as in ``Tokenizer``. ``newline_id`` is the piece ``"\\n"``,
    or ``"Ċ"`` in byte-level BPE (None for WordPiece, whose pre-tokenizer drops newlines). ``split_special_tokens`` in the
    config decides whether special-token text in the input is matched (False, Hugging Face's default)
    or read as characters (True, as minillm's exported tokenizers ask).

    Word starts (whole-word masking): a WordPiece piece not starting with ``##``; a byte-level BPE
    piece starting with ``Ġ`` (an encoded space); otherwise a piece starting with ``▁``. Special tokens
    and the newline are stand-alone: they start a word, and so does the piece after them. ``sentinel_ids`` are the tokens named ``<extra_id_k>`` or
    ``<sentinel_k>`` (T5), else, as for a foreign sentencepiece model, the top ids of the vocabulary
    (ambiguous: a documented limit). ``splits_on_spaces`` is False: minillm's word cache is never used.
    """

    KIND = "this Hugging Face tokenizer"

    def __init__(self, tokenizer: tokenizers.Tokenizer, files: dict[str, bytes], config: dict, path: Path | None = None):
        self.tokenizer = tokenizer
        self.files = dict(files)
        """The bytes of every file the tokenizer was read from, by name (what ``save`` writes)."""
        self.path = path
        tokenizer.encode_special_tokens = bool(config.get("split_special_tokens", False))
        n = tokenizer.get_vocab_size(with_added_tokens=True)
        self.kind = self._kind(tokenizer)

        def known(piece: str | None) -> int | None:
            return None if piece is None else tokenizer.token_to_id(piece)

        for name, piece in _special_pieces(config, self.kind).items():
            setattr(self, f"{name}_id", known(piece))
        # The piece "\n" (sentencepiece style), or byte-level BPE's "Ċ" (the newline byte); WordPiece has none.
        self.newline_id = known("\n") if known("\n") is not None else known("\u010a") if self.kind == "byte_level" else None

        pieces = [tokenizer.id_to_token(i) or "" for i in range(n)]
        added_special = [i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special]
        named = [getattr(self, f"{name}_id") for name in _SPECIAL_NAMES]
        self.special = np.zeros(n, dtype=bool)
        """``special[id]``: never chosen for masking or random replacement (special tokens)."""
        self.special[added_special + [i for i in named if i is not None]] = True
        self.standalone = self.special.copy()
        if self.newline_id is not None:  # a line's first word has no space before it
            self.standalone[self.newline_id] = True
        """``standalone[id]``: a special token or the newline; the piece after it starts a word."""
        if self.kind == "wordpiece":
            starts = [not p.startswith("##") for p in pieces]
        elif self.kind == "byte_level":
            starts = [p.startswith("\u0120") for p in pieces]  # "Ġ": byte-level BPE's encoded space
        else:
            starts = [p.startswith(WORD_START) for p in pieces]
        self.word_start = np.array(starts, dtype=bool) | self.standalone
        """``word_start[id]``: the piece begins a new word (whole-word masking)."""

        self._sentinel_ids = []
        for k in range(n):
            i = known(f"<extra_id_{k}>")
            i = known(f"<sentinel_{k}>") if i is None else i
            if i is None:
                break
            self._sentinel_ids.append(i)

    @staticmethod
    def _kind(tokenizer: tokenizers.Tokenizer) -> str:
        """``"wordpiece"``, ``"byte_level"`` or ``"other"``: how a piece marks the start of a word."""
        description = json.loads(tokenizer.to_str())
        if description["model"]["type"] == "WordPiece":
            return "wordpiece"
        if "ByteLevel" in json.dumps([description.get("pre_tokenizer"), description.get("decoder")]):
            return "byte_level"
        return "other"

    # ------------------------------------------------------------------ construction

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HFTokenizer":
        """Read a Hugging Face tokenizer folder (see the class docstring for the formats)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"HFTokenizer.load: {path} is not a folder (a Hugging Face tokenizer is a folder)")
        files = {name: (path / name).read_bytes() for name in _CONFIG_FILES if (path / name).is_file()}
        config: dict = {}
        for name in _CONFIG_FILES:  # special_tokens_map.json last: it names the special tokens
            if name in files:
                try:
                    config.update(json.loads(files[name]))
                except json.JSONDecodeError as err:
                    raise ValueError(f"HFTokenizer.load: {path / name} is not valid JSON ({err})") from None
        try:
            if (path / "tokenizer.json").is_file():
                files["tokenizer.json"] = (path / "tokenizer.json").read_bytes()
                tokenizer = tokenizers.Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
            elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
                files.update({name: (path / name).read_bytes() for name in ("vocab.json", "merges.txt")})
                tokenizer = cls._byte_level_bpe(path, config)
            elif (path / "vocab.txt").is_file():
                files["vocab.txt"] = (path / "vocab.txt").read_bytes()
                tokenizer = cls._wordpiece(path, config)
            else:
                raise FileNotFoundError(
                    f"HFTokenizer.load: {path} has no tokenizer.json, vocab.json + merges.txt, or vocab.txt"
                )
        except Exception as err:  # tokenizers raises a bare Exception for unreadable files
            if isinstance(err, FileNotFoundError):
                raise
            raise ValueError(f"HFTokenizer.load: {path} could not be read by tokenizers ({err})") from None
        return cls(tokenizer, files, config, path)

    @staticmethod
    def _byte_level_bpe(path: Path, config: dict) -> tokenizers.Tokenizer:
        """GPT-2's slow files as a fast tokenizer: byte-level BPE, its regex pre-tokenizer and decoder."""
        tokenizer = tokenizers.Tokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
        add_prefix_space = bool(config.get("add_prefix_space", False))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
        tokenizer.decoder = decoders.ByteLevel()
        HFTokenizer._add_special_tokens(tokenizer, config, "byte_level")
        return tokenizer

    @staticmethod
    def _wordpiece(path: Path, config: dict) -> tokenizers.Tokenizer:
        """BERT's slow vocabulary as a fast tokenizer: WordPiece, BERT's normaliser and pre-tokenizer."""
        unk = _token_text(config.get("unk_token")) or "[UNK]"
        tokenizer = tokenizers.Tokenizer(models.WordPiece.from_file(str(path / "vocab.txt"), unk_token=unk))
        tokenizer.normalizer = normalizers.BertNormalizer(
            clean_text=True,
            handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
            strip_accents=config.get("strip_accents"),
            lowercase=bool(config.get("do_lower_case", True)),
        )
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece(prefix="##")
        HFTokenizer._add_special_tokens(tokenizer, config, "wordpiece")
        return tokenizer

    @staticmethod
    def _add_special_tokens(tokenizer: tokenizers.Tokenizer, config: dict, kind: str) -> None:
        """Register the named special tokens the vocabulary holds (matched whole, dropped by decode)."""
        names = set(_special_pieces(config, kind).values())
        names |= {_token_text(t) for t in config.get("additional_special_tokens", [])}
        present = sorted(name for name in names if name is not None and tokenizer.token_to_id(name) is not None)
        tokenizer.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in present])

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the files the tokenizer was read from into ``directory`` (each atomically); return it."""
        directory = Path(directory)
        for name, data in self.files.items():
            write_atomic(directory / name, data)
        return directory

    # ------------------------------------------------------------------ encode / decode

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included; model embeddings need exactly this many rows."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """SHA-256 hex digest of the files read (names and bytes): equal for the same tokenizer folder."""
        digest = hashlib.sha256()
        for name in sorted(self.files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(self.files[name]).digest())
        return digest.hexdigest()

    @property
    def splits_on_spaces(self) -> bool:
        """Always False: documents are encoded whole (minillm's word cache assumes sentencepiece)."""
        return False

    @property
    def space_ids(self) -> list[int]:
        """Ids of a lone space (not used while ``splits_on_spaces`` is False)."""
        return self.encode(" ")

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no special tokens added."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """Token ids of many texts: on all cores (``num_threads=-1``, tokenizers' thread pool) or one (1)."""
        if num_threads == 1:
            return [self.encode(text) for text in texts]
        if num_threads != -1:
            raise ValueError(f"HFTokenizer.encode_batch: num_threads must be -1 (all cores) or 1, got {num_threads!r}")
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens decode to nothing."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def decode_batch(self, batch: Iterable[Iterable[int]], num_threads: int = -1) -> list[str]:
        """Texts of many id lists (``num_threads`` as in ``encode_batch``)."""
        lists = [[int(i) for i in ids] for ids in batch]
        if num_threads == 1:
            return [self.decode(ids) for ids in lists]
        if num_threads != -1:
            raise ValueError(f"HFTokenizer.decode_batch: num_threads must be -1 (all cores) or 1, got {num_threads!r}")
        return self.tokenizer.decode_batch(lists, skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self.tokenizer.id_to_token(int(i))

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, path={str(self.path)!r})"


def load_tokenizer(path: str | os.PathLike) -> Tokenizer | HFTokenizer:
    """minillm's ``Tokenizer`` for a ``.model`` file or a folder holding ``tokenizer.model``; an
    :class:`HFTokenizer` for a folder holding ``tokenizer.json``, ``vocab.json`` + ``merges.txt`` or
    ``vocab.txt``. Anything else is a ``FileNotFoundError`` naming the path and what was looked for."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".model":
            return Tokenizer.load(path)
        raise ValueError(
            f"load_tokenizer: {path} is a file but not a sentencepiece .model; pass a .model file or a folder"
        )
    if path.is_dir():
        if (path / "tokenizer.model").is_file():
            return Tokenizer.load(path)
        if any((path / name).is_file() for name in ("tokenizer.json", "vocab.txt")) or all(
            (path / name).is_file() for name in ("vocab.json", "merges.txt")
        ):
            return HFTokenizer.load(path)
    raise FileNotFoundError(
        f"load_tokenizer: no tokenizer at {path} (looked for a .model file, or a folder with tokenizer.model, "
        f"tokenizer.json, vocab.json + merges.txt, or vocab.txt)"
    )
