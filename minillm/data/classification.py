"""Sequence classification: single texts or text pairs with a label, from CSV/TSV/JSONL or GLUE.

Reading. :func:`read_classification` reads one file (format by suffix, see
:mod:`minillm.data.corpus`) with a text column, an optional second text column and a label
column. Labels are strings; the :class:`LabelMap` built from the *training* file (sorted
label strings, so the same file always gives the same ids) turns them into ids and is saved
as JSON beside the run. Reading the validation file with that map makes an unknown label an
error naming the file, line and label. A missing column is an error naming the file and the
column, and listing the columns that exist. A training file whose examples all have the same
label is refused as it is read (a classifier learns nothing from one class); a validation or
test file may hold a single class.

GLUE. :func:`read_glue` knows the TSV layouts of the GLUE tasks in :data:`GLUE_TASKS` (train
and dev files as distributed by the GLUE benchmark: CoLA without a header, the others with one)
and their label sets. STS-B is a regression task and is not supported. Test files (no labels)
are read with ``labelled=False``; the training file with ``training=True``, since the fixed
label set cannot tell a one-class training file from a dev file.

Batches (:class:`ClassificationDataset` + :class:`ClassificationCollator`): ``[CLS] a [SEP]``
or ``[CLS] a [SEP] b [SEP]`` truncated longest-first to ``max_len``; keys ``input_ids`` (B, T),
``attention_mask`` (B, T), ``token_type_ids`` (B, T) (1 on ``b [SEP]``), ``labels`` (B,) long.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minillm.data.collate import (pad_segment_pairs, pair_with_ends, pair_with_specials, to_tensors,
                                  truncate_longest_first)
from minillm.data.corpus import column_index, detect_format, read_json_records, read_table
from minillm.tokenizer import Tokenizer


class LabelMap:
    """Label strings <-> ids. ``names[i]`` is the label of id ``i``."""

    def __init__(self, names: list[str]):
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"LabelMap: names must be distinct and non-empty, got {names}")
        self.names = list(names)
        self._ids = {name: i for i, name in enumerate(self.names)}

    @classmethod
    def from_labels(cls, labels: list[str]) -> "LabelMap":
        """Map of the distinct labels, sorted (numerically when they all are integers)."""
        distinct = set(labels)
        if all(x.lstrip("-").isdigit() for x in distinct):
            return cls(sorted(distinct, key=int))
        return cls(sorted(distinct))

    def id(self, label: str, where: str = "") -> int:
        """Id of ``label``; unknown labels are a ValueError naming ``where`` (file:line)."""
        try:
            return self._ids[label]
        except KeyError:
            raise ValueError(
                f"{where}: unknown label {label!r}; the label map (from the training data) has {self.names}"
            ) from None

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"LabelMap({self.names})"

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``{"labels": [...]}`` atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"labels": self.names}, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LabelMap":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or "labels" not in data:
            raise ValueError(f"{path}: not a label map (expected {{\"labels\": [...]}})")
        return cls(data["labels"])


@dataclass
class ClassificationExamples:
    """Texts (and optional second texts) with label ids; ``label_map`` names the ids."""

    texts: list[str]
    text_pairs: list[str] | None
    labels: list[int] | None
    label_map: LabelMap | None
    source: str

    def __len__(self) -> int:
        return len(self.texts)


def _records(path: Path, fields: list[str], errors: str, header: list[str] | None = None):
    """Yield (where, {field: value}) for every row/line of a CSV/TSV/JSONL file."""
    if detect_format(path) == "jsonl":
        for number, record in read_json_records(path, fields, errors):
            yield f"{path}:{number}", {name: str(record[name]) for name in fields}
        return
    if header is None:
        header, rows = read_table(path, errors=errors)
        first_line = 2
    else:  # headerless file with known column names (CoLA): its first row is data
        first, rows = read_table(path, errors=errors)
        rows = [first] + rows
        first_line = 1
    index = {name: column_index(header, name, path) for name in fields}
    for number, row in enumerate(rows, start=first_line):
        if max(index.values()) >= len(row):
            raise ValueError(f"{path}:{number}: row has {len(row)} columns, expected {len(header)}")
        yield f"{path}:{number}", {name: row[i] for name, i in index.items()}


def require_two_classes(path: str | os.PathLike, labels: list[str], label_field: str) -> None:
    """Refuse training labels that are all the same: one line naming the file, the label and
    its column (CSV/TSV) or field (JSONL)."""
    if labels and len(set(labels)) == 1:
        kind = "field" if detect_format(Path(path)) == "jsonl" else "column"
        raise ValueError(
            f"{path}: every example has label {labels[0]!r} ({kind} {label_field!r}); "
            f"classification needs at least 2 classes"
        )


def read_classification(
    path: str | os.PathLike,
    text_field: str = "text",
    label_field: str | None = "label",
    text_pair_field: str | None = None,
    label_map: LabelMap | None = None,
    errors: str = "strict",
    columns: list[str] | None = None,
) -> ClassificationExamples:
    """Read one labelled (or, with ``label_field=None``, unlabelled) file.

    Args:
        path: CSV, TSV (by suffix, header row) or JSONL file.
        text_field / text_pair_field: the text column(s); pair absent for single texts.
        label_field: the label column; None reads texts only (test files).
        label_map: map to use (validation/test files); None builds one from this file, which is
            then the training file and must hold at least two distinct labels.
        errors: ``"strict"`` or ``"replace"`` for invalid UTF-8.
        columns: names of the columns of a file *without* a header row (CoLA).
    """
    path = Path(path)
    fields = [text_field] + ([text_pair_field] if text_pair_field else []) + ([label_field] if label_field else [])
    texts, pairs, raw_labels, wheres = [], [], [], []
    for where, record in _records(path, fields, errors, header=columns):
        texts.append(record[text_field])
        if text_pair_field:
            pairs.append(record[text_pair_field])
        if label_field:
            raw_labels.append(record[label_field].strip())
            wheres.append(where)
    if not texts:
        raise ValueError(f"{path}: no example")
    labels = None
    if label_field:
        if label_map is None:
            require_two_classes(path, raw_labels, label_field)
            label_map = LabelMap.from_labels(raw_labels)
        labels = [label_map.id(label, where) for label, where in zip(raw_labels, wheres)]
    return ClassificationExamples(texts, pairs if text_pair_field else None, labels, label_map, str(path))


def sample_examples(examples: ClassificationExamples, n: int, seed: int) -> ClassificationExamples:
    """``n`` of ``examples`` drawn at random without replacement (``seed``), in their original
    order; the label map is kept, so label ids do not change."""
    if not 0 < n <= len(examples):
        raise ValueError(f"DataConfig.train_examples: got {n}, expected 1..{len(examples)} ({examples.source} "
                         f"has {len(examples)} examples; 0 keeps them all)")
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return ClassificationExamples(
        [examples.texts[i] for i in keep],
        [examples.text_pairs[i] for i in keep] if examples.text_pairs is not None else None,
        [examples.labels[i] for i in keep] if examples.labels is not None else None,
        examples.label_map,
        f"{examples.source} ({n} sampled, seed {seed})",
    )


def examples_from_pairs(pairs: list[tuple[str, int]], label_names: list[str], source: str) -> ClassificationExamples:
    """Examples from in-memory ``(text, label_id)`` pairs, e.g. a split of
    :func:`minillm.data.default_corpus.stdlib_classification_task`."""
    return ClassificationExamples([t for t, _ in pairs], None, [y for _, y in pairs], LabelMap(label_names), source)


@dataclass(frozen=True)
class GlueLayout:
    """Where a GLUE task keeps its columns, and its label set (in id order)."""

    text: str
    pair: str | None
    label: str
    labels: tuple[str, ...]
    columns: tuple[str, ...] | None = None  # headerless train/dev files: the column names


GLUE_TASKS: dict[str, GlueLayout] = {
    "cola": GlueLayout("sentence", None, "label", ("0", "1"), ("source", "label", "original_label", "sentence")),
    "sst2": GlueLayout("sentence", None, "label", ("0", "1")),
    "mrpc": GlueLayout("#1 String", "#2 String", "Quality", ("0", "1")),
    "qqp": GlueLayout("question1", "question2", "is_duplicate", ("0", "1")),
    "mnli": GlueLayout("sentence1", "sentence2", "gold_label", ("contradiction", "entailment", "neutral")),
    "qnli": GlueLayout("question", "sentence", "label", ("entailment", "not_entailment")),
    "rte": GlueLayout("sentence1", "sentence2", "label", ("entailment", "not_entailment")),
    "wnli": GlueLayout("sentence1", "sentence2", "label", ("0", "1")),
}


def read_glue(
    task: str, path: str | os.PathLike, labelled: bool = True, errors: str = "strict", training: bool = False
) -> ClassificationExamples:
    """Read a GLUE ``train.tsv`` / ``dev.tsv`` (``labelled=False``: ``test.tsv``) of ``task``.

    ``training=True`` marks the training file: one whose examples all have the same label is
    refused (see :func:`require_two_classes`).
    """
    key = task.lower().replace("-", "")
    if key not in GLUE_TASKS:
        raise ValueError(f"read_glue: task must be one of {sorted(GLUE_TASKS)}, got {task!r} (STS-B is regression)")
    layout = GLUE_TASKS[key]
    columns = list(layout.columns) if layout.columns and labelled else None
    examples = read_classification(
        path, layout.text, layout.label if labelled else None, layout.pair,
        LabelMap(list(layout.labels)) if labelled else None, errors, columns,
    )
    if training and examples.labels is not None:
        require_two_classes(path, [layout.labels[i] for i in examples.labels], layout.label)
    return examples


def pad_id_of(tokenizer: Tokenizer) -> int:
    """The id padding is filled with: PAD, or EOS for a tokenizer without one (GPT-2's). Padding is
    masked out of attention and pooling, so any id serves; EOS is what GPT-2 recipes use."""
    if tokenizer.pad_id is None and tokenizer.eos_id is not None:
        return tokenizer.eos_id
    return tokenizer.require("pad")


class ClassificationDataset(torch.utils.data.Dataset):
    """Tokenised examples: ``[CLS] a [SEP] (b [SEP])`` truncated longest-first to ``max_len``.

    A tokenizer without [CLS] and [SEP] (GPT-2's byte-level BPE) frames them as GPT-2 does a
    document: ``a [EOS] (b [EOS])``; a decoder classifier reads the last token, which then sees it all.
    """

    def __init__(self, examples: ClassificationExamples, tokenizer: Tokenizer, max_len: int):
        if max_len < 4:
            raise ValueError(f"ClassificationDataset: max_len must be >= 4, got {max_len}")
        gpt_frame = tokenizer.cls_id is None and tokenizer.sep_id is None and tokenizer.eos_id is not None
        if not gpt_frame:
            cls_id, sep_id = tokenizer.require("cls"), tokenizer.require("sep")
        specials = 1 if gpt_frame else 2  # the tokens a one-part example adds
        first = tokenizer.encode_batch(examples.texts)
        second = tokenizer.encode_batch(examples.text_pairs) if examples.text_pairs is not None else None
        self.items = []
        for k, a in enumerate(first):
            if second is None:
                a, b = a[: max_len - specials], None
            else:
                a, b = truncate_longest_first(a, second[k], max_len - specials - 1)
            if gpt_frame:
                ids, types = pair_with_ends(a, b, tokenizer.eos_id)
            else:
                ids, types = pair_with_specials(a, b, cls_id, sep_id)
            item = {"input_ids": np.array(ids, dtype=np.int64), "token_type_ids": np.array(types, dtype=np.int64)}
            if examples.labels is not None:
                item["label"] = examples.labels[k]
            self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


class ClassificationCollator:
    """Pad examples: input_ids, attention_mask (B, T), token_type_ids (B, T) when ``segments``
    (a body with segment embeddings, BERT's; a GPT has none) and labels (B,) when labelled."""

    def __init__(self, tokenizer: Tokenizer, pad_to_multiple_of: int | None = None, segments: bool = True):
        self.pad_id = pad_id_of(tokenizer)
        self.pad_to_multiple_of, self.segments = pad_to_multiple_of, segments

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        batch = pad_segment_pairs(samples, self.pad_id, self.pad_to_multiple_of)
        if not self.segments:
            del batch["token_type_ids"]
        if "label" in samples[0]:
            batch["labels"] = np.array([s["label"] for s in samples], dtype=np.int64)
        return to_tensors(batch)
