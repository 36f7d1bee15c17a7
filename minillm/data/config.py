"""DataConfig: every data setting of a run, flat, typed and validated on construction.

The trainer loads it from TOML and command-line overrides, so every field is a plain scalar
or list. ``DataConfig(**fields)`` raises ``ValueError`` naming the field on a bad value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from minillm.config import config_from_dict
from minillm.data.corpus import ERRORS, FORMATS, TEXT_SPLITS

MODEL_TYPES = ("bpe", "unigram")
CAUSAL_MODES = ("random", "sequential")


@dataclass
class DataConfig:
    """Data settings; see :mod:`minillm.data` for how they are used."""

    inputs: list[str] = field(default_factory=lambda: ["default"])
    """Corpus: files, directories, globs; ``["default"]`` is the embedded stdlib corpus. Each file
    is read once however often it is named, and each distinct text once (repeats are dropped and
    counted)."""
    input_format: str = "auto"
    """``auto`` (by suffix), ``text``, ``jsonl``, ``csv`` or ``tsv``."""
    text_field: str = "text"
    """JSONL field / CSV-TSV column holding the text."""
    text_split: str = "auto"
    """Plain text: ``file`` (one document per file), ``blank_lines`` (a document per paragraph),
    ``lines``, or ``auto``: ``file`` for several files, ``blank_lines`` for a single file."""
    encoding_errors: str = "strict"
    """``strict``: invalid UTF-8 is an error naming file and byte offset; ``replace``: U+FFFD."""
    prepared_dir: str = "data/prepared"
    """Where prepare writes shards, manifest and the tokenizer copy."""
    tokenizer: str | None = None
    """Existing sentencepiece ``.model``; None trains one (vocab_size, model_type) on the inputs."""
    vocab_size: int = 8000
    """Size of a tokenizer trained here (specials, sentinels, 256 bytes included)."""
    model_type: str = "bpe"
    """Tokenizer algorithm when training one: ``bpe`` or ``unigram``."""
    seq_len: int = 256
    """Tokens per sequence (encoder input length for seq2seq)."""
    val_fraction: float = 0.01
    """Fraction of documents held out for validation (split by document)."""
    seed: int = 0
    """Seed of the split, the windows and the masks."""
    num_workers: int = 0
    """Prepare processes; 0 means all cores."""
    causal_mode: str = "random"
    """Causal windows: ``random`` starts (training) or ``sequential`` (validation)."""
    document_mask: bool = False
    """Causal: add ``position_ids`` reset per document and ``document_ids`` to batches, so that
    attention stays inside each document of a packed window."""
    mlm_probability: float = 0.15
    """MLM: expected fraction of non-special tokens chosen for prediction."""
    whole_word_mask: bool = False
    """MLM: choose whole words (sentencepiece ``▁`` marker) instead of single tokens."""
    mask_ratio: float = 0.8
    """MLM: share of chosen tokens replaced by [MASK]."""
    random_ratio: float = 0.1
    """MLM: share of chosen tokens replaced by a random token (the rest stay unchanged)."""
    nsp_random_probability: float = 0.5
    """NSP: probability that segment B comes from another document (label 1)."""
    noise_density: float = 0.15
    """Seq2seq span corruption: fraction of tokens removed into spans (T5: 0.15)."""
    mean_span_length: float = 3.0
    """Seq2seq span corruption: mean length of a corrupted span (T5: 3)."""
    train_file: str | None = None
    """Classification / seq2seq pairs: training file (CSV/TSV/JSONL, or a GLUE TSV);
    ``"default"`` is the built-in stdlib-package task (classification only, with its own test split)."""
    stdlib_classes: int = 8
    """Classification on ``train_file="default"``: number of named packages (plus "other")."""
    train_examples: int = 0
    """Classification: train on this many examples, a random sample (``seed``) of the training
    split, to see how a model fares with few labels; 0 keeps them all."""
    cloze_pattern: str = "{text} This is about [MASK]."
    """Task "cloze" (PET, see :mod:`minillm.data.cloze`): the question a masked LM answers, with
    {text} (and {text_pair} for text pairs) and one [MASK]."""
    cloze_verbalizer: str | None = None
    """Task "cloze": one single-token word per label, ``"label=word,label=word"``; None: the label
    names themselves."""
    validation_file: str | None = None
    """Classification / seq2seq pairs: validation file; it picks the best checkpoint."""
    test_file: str | None = None
    """Classification / seq2seq pairs: test file, held out from every choice made in training; the
    final figures are reported on it. Without one they are validation figures, and said to be."""
    label_field: str = "label"
    """Classification: label column / field."""
    text_pair_field: str | None = None
    """Classification: second text column for pair tasks (None: single texts)."""
    glue_task: str | None = None
    """Classification: read train/validation files with this GLUE layout (e.g. ``sst2``)."""
    target_field: str = "target"
    """Seq2seq pairs: target column / field (source is ``text_field``)."""

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"DataConfig.{name}: got {getattr(self, name)!r}, expected {allowed}")

        check(isinstance(self.inputs, list) and all(isinstance(x, str) for x in self.inputs) and len(self.inputs) > 0,
              "inputs", "a non-empty list of paths, globs or 'default'")
        check(self.input_format in FORMATS, "input_format", f"one of {FORMATS}")
        check(self.text_split in TEXT_SPLITS, "text_split", f"one of {TEXT_SPLITS}")
        check(self.encoding_errors in ERRORS, "encoding_errors", f"one of {ERRORS}")
        check(self.model_type in MODEL_TYPES, "model_type", f"one of {MODEL_TYPES}")
        check(isinstance(self.vocab_size, int) and 300 < self.vocab_size <= 2**32, "vocab_size",
              "an int above 300 (specials, sentinels and 256 byte pieces come first)")
        check(isinstance(self.seq_len, int) and self.seq_len >= 8, "seq_len", "an int >= 8")
        check(0.0 <= self.val_fraction < 1.0, "val_fraction", "a float in [0, 1)")
        check(isinstance(self.num_workers, int) and self.num_workers >= 0, "num_workers", "an int >= 0")
        check(self.causal_mode in CAUSAL_MODES, "causal_mode", f"one of {CAUSAL_MODES}")
        check(0.0 < self.mlm_probability < 1.0, "mlm_probability", "a float in (0, 1)")
        check(0.0 <= self.mask_ratio <= 1.0, "mask_ratio", "a float in [0, 1]")
        check(0.0 <= self.random_ratio <= 1.0 - self.mask_ratio, "random_ratio", "a float in [0, 1 - mask_ratio]")
        check(0.0 < self.nsp_random_probability < 1.0, "nsp_random_probability", "a float in (0, 1)")
        check(0.0 < self.noise_density < 1.0, "noise_density", "a float in (0, 1)")
        check(self.mean_span_length >= 1.0, "mean_span_length", "a float >= 1")
        check(isinstance(self.stdlib_classes, int) and self.stdlib_classes >= 1, "stdlib_classes", "an int >= 1")
        check(isinstance(self.train_examples, int) and self.train_examples >= 0, "train_examples",
              "an int >= 0 (0: every training example)")
        check(self.test_file is None or self.train_file not in (None, "default"), "test_file",
              "None unless train_file names a file (the embedded task has its own test split)")
        check(self.cloze_pattern.count("[MASK]") == 1 and self.cloze_pattern.count("{text}") == 1, "cloze_pattern",
              "a pattern with {text} once and [MASK] once, such as '{text} This is about [MASK].'")
        if self.glue_task is not None:
            from minillm.data.classification import GLUE_TASKS

            check(self.glue_task in GLUE_TASKS, "glue_task", f"one of {sorted(GLUE_TASKS)}")

    def to_dict(self) -> dict:
        """Plain dict (for saving beside a checkpoint)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "DataConfig":
        """Build from a dict (TOML table); unknown keys are a ValueError naming them."""
        return config_from_dict(cls, values)
