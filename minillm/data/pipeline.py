"""From a DataConfig to datasets and a collator: the one call a training script needs.

    bundle = build_data(DataConfig(objective="mlm", seq_len=128))
    loader = DataLoader(bundle.train, batch_size=32, shuffle=True, collate_fn=bundle.collator)

What each objective gets:

==============  =======================================  ==================================
objective       datasets (train / validation)            collator
==============  =======================================  ==================================
causal          CausalLMDataset (causal_mode / always    CausalLMCollator
                sequential for validation)
mlm             MLMDataset                               MLMCollator
nsp             NSPDataset                               MLMCollator (BERT: MLM + NSP keys)
seq2seq         Seq2SeqPairDataset when train_file is    Seq2SeqCollator
                set, else SpanCorruptionDataset
classification  ClassificationDataset from train_file /  ClassificationCollator
                validation_file (GLUE layout with
                glue_task; "default": the stdlib task)
==============  =======================================  ==================================

Pretraining objectives prepare the corpus first (``prepare_from_config``: cached, skipped
when up to date). Fine-tuning (classification, seq2seq pairs) needs ``config.tokenizer``: the
pretrained model's tokenizer. ``validation`` is None when the validation split is too small
for the objective (e.g. fewer tokens than ``seq_len``), or when no validation file is given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from minillm.data.causal import CausalLMCollator, CausalLMDataset
from minillm.data.classification import (
    ClassificationCollator,
    ClassificationDataset,
    ClassificationExamples,
    LabelMap,
    examples_from_pairs,
    read_classification,
    read_glue,
    sample_examples,
)
from minillm.data.config import DataConfig
from minillm.data.mlm import MLMCollator, MLMDataset
from minillm.data.nsp import NSPDataset
from minillm.data.prepare import PrepareResult, prepare_from_config
from minillm.data.seq2seq import Seq2SeqCollator, Seq2SeqPairDataset, SpanCorruptionDataset, read_seq2seq_pairs
from minillm.data.shards import TokenShards
from minillm.tokenizer import Tokenizer


@dataclass
class DataBundle:
    """Everything a run needs from the data side."""

    tokenizer: Tokenizer
    train: torch.utils.data.Dataset
    validation: torch.utils.data.Dataset | None
    collator: Callable
    label_map: LabelMap | None = None
    prepared: PrepareResult | None = None


def _require_tokenizer(config: DataConfig) -> Tokenizer:
    if config.tokenizer is None:
        raise ValueError(
            f"DataConfig.tokenizer: objective={config.objective!r} with a train_file fine-tunes a pretrained "
            f"model and needs its tokenizer (.model path); got None"
        )
    return Tokenizer.load(config.tokenizer)


def classification_examples(config: DataConfig) -> dict[str, ClassificationExamples | None]:
    """{"train", "validation", "test"} examples of a classification config.

    ``train_file="default"``: the embedded stdlib-package task with ``config.stdlib_classes``
    named packages, and its own test split. Otherwise the train and validation files (GLUE layout
    with ``glue_task``); the validation file is also the test set, and both are None without one.
    ``train_examples > 0`` keeps that many training examples, sampled with ``seed``.
    """
    if config.train_file == "default":  # the embedded stdlib-package task
        from minillm.data.default_corpus import stdlib_classification_task

        task = stdlib_classification_task(config.stdlib_classes)
        splits = {name: examples_from_pairs(getattr(task, name), task.labels, f"stdlib:{name}")
                  for name in ("train", "validation", "test")}
    else:
        if config.glue_task is not None:
            train = read_glue(config.glue_task, config.train_file, errors=config.encoding_errors)
            validation = read_glue(config.glue_task, config.validation_file, errors=config.encoding_errors) \
                if config.validation_file else None
        else:
            read = dict(text_field=config.text_field, label_field=config.label_field,
                        text_pair_field=config.text_pair_field, errors=config.encoding_errors)
            train = read_classification(config.train_file, **read)
            validation = read_classification(config.validation_file, label_map=train.label_map, **read) \
                if config.validation_file else None
        splits = {"train": train, "validation": validation, "test": validation}
    if config.train_examples:
        splits["train"] = sample_examples(splits["train"], config.train_examples, config.seed)
    return splits


def _classification(config: DataConfig) -> DataBundle:
    tok = _require_tokenizer(config)
    splits = classification_examples(config)
    return DataBundle(
        tok,
        ClassificationDataset(splits["train"], tok, config.seq_len),
        ClassificationDataset(splits["validation"], tok, config.seq_len) if splits["validation"] is not None else None,
        ClassificationCollator(tok),
        label_map=splits["train"].label_map,
    )


def build_data(config: DataConfig, progress: bool = True) -> DataBundle:
    """Datasets and collator for ``config.objective`` (see the module docstring)."""
    if config.objective == "classification":
        return _classification(config)
    if config.objective == "seq2seq" and config.train_file is not None:
        tok = _require_tokenizer(config)
        train = read_seq2seq_pairs(config.train_file, config.text_field, config.target_field, config.encoding_errors)
        val = read_seq2seq_pairs(config.validation_file, config.text_field, config.target_field,
                                 config.encoding_errors) if config.validation_file else None
        make = lambda pairs: Seq2SeqPairDataset(pairs, tok, config.seq_len, config.seq_len)  # noqa: E731
        return DataBundle(tok, make(train), make(val) if val else None, Seq2SeqCollator(tok))

    tok, prepared = prepare_from_config(config, progress=progress)
    train_shards = TokenShards(config.prepared_dir, "train")
    val_shards = TokenShards(config.prepared_dir, "val")

    def build(shards: TokenShards, training: bool) -> torch.utils.data.Dataset:
        if config.objective == "causal":
            mode = config.causal_mode if training else "sequential"
            return CausalLMDataset(shards, config.seq_len, mode, config.seed, document_mask=config.document_mask)
        if config.objective == "mlm":
            return MLMDataset(shards, tok, config.seq_len)
        if config.objective == "nsp":
            return NSPDataset(shards, tok, config.seq_len, config.nsp_random_probability,
                              config.seed if training else config.seed + 1)
        return SpanCorruptionDataset(shards, tok, config.seq_len, config.noise_density, config.mean_span_length,
                                     config.seed)

    train = build(train_shards, True)
    try:
        validation = build(val_shards, False) if len(val_shards) else None
    except ValueError:  # validation split too small for this objective
        validation = None
    if config.objective == "causal":
        collator: Callable = CausalLMCollator()
    elif config.objective in ("mlm", "nsp"):
        collator = MLMCollator(tok, config.mlm_probability, config.whole_word_mask, config.mask_ratio,
                               config.random_ratio, config.seed)
    else:
        collator = Seq2SeqCollator(tok)
    return DataBundle(tok, train, validation, collator, prepared=prepared)
