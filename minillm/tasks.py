"""Tasks: what a model is trained to do, each defined once.

A task is one object that owns everything depending on *what* is learnt, so the CLI, the
recipes, the trainer, checkpoints and evaluation ask the task instead of comparing its name:

* the model it builds (a task model of :mod:`minillm.model`) and the architectures it accepts;
* its data: the datasets and the collator it builds from a DataConfig and a tokenizer, and which
  DataConfig fields it reads (a field set for another task is refused, not ignored);
* its loss: the summed loss terms of a batch and the number of targets of each term (the trainer
  divides by the count over the whole accumulated, all-rank batch);
* its evaluation: what is tallied over held-out batches and the metrics computed from it;
* its report: the lines printed at the end of a run, next to a baseline.

=================  ==========================  ============================================
task               model                       batches
=================  ==========================  ============================================
causal-lm          CausalLM (decoder)          windows of the prepared corpus
mlm                MaskedLM (encoder)          masked ``[CLS] piece [SEP]`` sequences
mlm-nsp            MaskedLM with an NSP head   masked sentence pairs (BERT's pretraining)
span-corruption    Seq2SeqLM                   T5 span corruption of the corpus
permutation-lm     XLNetLM                     windows of the corpus, one random order each
seq2seq            Seq2SeqLM                   (source, target) pairs from files
classification     SequenceClassifier          labelled texts, encoder or decoder body
                   (XLNetClassifier for xlnet)
=================  ==========================  ============================================

Adding a task is one class here with ``@register``; nothing else compares task names.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from minillm.config import ModelConfig
from minillm.data import (
    CausalLMCollator,
    CausalLMDataset,
    ClassificationCollator,
    ClassificationDataset,
    DataConfig,
    MLMCollator,
    MLMDataset,
    NSPDataset,
    PermutationLMCollator,
    PermutationLMDataset,
    Seq2SeqCollator,
    Seq2SeqPairDataset,
    SpanCorruptionDataset,
    TokenShards,
    classification_examples,
    read_seq2seq_pairs,
    stdlib_seq2seq_task,
)
from minillm.data.cloze import ClozeCollator, ClozeDataset, check_pattern, parse_verbalizer
from minillm.generation import generate_seq2seq
from minillm.lora import unwrap_model
from minillm.metrics import IGNORE_INDEX, classification_metrics, confusion_matrix, perplexity, text_scores
from minillm.model import (CausalLM, MaskedLM, Model, ModelOutput, Seq2SeqLM, SequenceClassifier, XLNetClassifier,
                           XLNetLM)
from minillm.tokenizer import Tokenizer

# DataConfig fields every task reads, and those read when the corpus is (pretraining tasks
# always; the others only to train a tokenizer when neither a checkpoint nor data.tokenizer gives one).
COMMON_DATA_FIELDS = frozenset({"seq_len", "seed", "encoding_errors", "tokenizer"})
CORPUS_DATA_FIELDS = frozenset({"inputs", "input_format", "text_field", "text_split", "prepared_dir", "vocab_size",
                                "model_type", "val_fraction", "num_workers"})


@dataclass
class TaskData:
    """What a run of a task trains, selects and reports on."""

    train: torch.utils.data.Dataset
    validation: torch.utils.data.Dataset | None  # evaluated during training; picks the best checkpoint
    test: torch.utils.data.Dataset | None  # held out from every choice; None: the report reads validation
    collate: Callable
    summary: str  # one line describing the data, printed before training
    baselines: dict[str, float] = field(default_factory=dict)  # what the report compares against
    labels: list[str] | None = None  # classification: label names in id order
    pairs: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # seq2seq: raw text per split

    @property
    def report_split(self) -> str:
        """The split whose figures the report gives: "test" when there is one."""
        return "test" if self.test is not None else "validation"


# =============================================================================================
# The base class and the registry
# =============================================================================================


class Task:
    """One training objective. Subclasses set the class attributes and override the methods."""

    name: ClassVar[str]
    model_class: ClassVar[type[Model]]  # the task model of minillm.model it trains
    architectures: ClassVar[tuple[str, ...]]  # ModelConfig.arch values this task trains
    metrics: ClassVar[tuple[str, ...]]  # what evaluate() reports; early stopping may watch any
    data_fields: ClassVar[frozenset[str]] = frozenset()  # DataConfig fields read beyond the common ones
    from_corpus: ClassVar[bool] = True  # batches come from the prepared corpus (data.inputs)
    new_head: ClassVar[bool] = False  # fine-tuning starts the head from scratch (LP-FT's probe applies)
    keep_best: ClassVar[bool] = False  # the report evaluates the best checkpoint, not the last
    sample_prompts: ClassVar[tuple[str, ...]] = ()  # shown after training, when the model generates
    loss_terms: ClassVar[tuple[str, ...]] = ("loss",)  # the summed terms forward() returns
    tally_keys: ClassVar[tuple[str, ...]] = ("correct", "predicted")  # what tally() counts
    scores_text: ClassVar[bool] = False  # the loss is a likelihood of every token: per-character figures apply

    # ------------------------------------------------------------------ model

    def build_model(self, config: ModelConfig) -> Model:
        return self.model_class(config)

    def check_model(self, model) -> None:
        """TypeError when ``model`` is not the kind of model this task trains (a peft-wrapped one is unwrapped)."""
        model = unwrap_model(model)
        if not isinstance(model, self.model_class):
            raise TypeError(f"model: task {self.name!r} trains a {self.model_class.__name__}, got {type(model).__name__}")

    def check(self, model: ModelConfig, data: DataConfig) -> None:
        """ValueError naming the field when the model or the data cannot serve this task."""
        if model.arch not in self.architectures:
            allowed = " or ".join(repr(a) for a in self.architectures)
            raise ValueError(f"ModelConfig.arch: task {self.name!r} trains arch {allowed}, got {model.arch!r}")
        if data.seq_len > model.max_seq_len:
            raise ValueError(
                f"DataConfig.seq_len: got {data.seq_len}, longer than ModelConfig.max_seq_len={model.max_seq_len}; "
                f"lower --data.seq_len or raise --model.max_seq_len"
            )

    def configure_model(self, config: ModelConfig, data: TaskData) -> ModelConfig:
        """The model config with what the data fixes (classification: the number of labels)."""
        return config

    def data_fields_read(self, data: DataConfig, tokenizer_from_corpus: bool) -> frozenset[str]:
        """The DataConfig fields this run reads (``tokenizer_from_corpus``: a tokenizer is trained here)."""
        fields = COMMON_DATA_FIELDS | self.data_fields
        return fields | CORPUS_DATA_FIELDS if self.from_corpus or tokenizer_from_corpus else fields

    # ------------------------------------------------------------------ data

    def datasets(self, data: DataConfig, tokenizer: Tokenizer, model: ModelConfig, samples: int) -> TaskData:
        """Train/validation/test datasets and the collator. ``samples``: how many training samples
        the run draws, so randomly sampled datasets can be made large enough never to repeat one."""
        raise NotImplementedError

    # ------------------------------------------------------------------ loss

    def forward(self, model, batch: dict) -> tuple[object, dict[str, torch.Tensor]]:
        """(model output, {term: summed loss}) for one batch."""
        out = model(**batch, loss_reduction="sum")
        return out, {"loss": out.loss}

    def target_counts(self, batch: dict) -> dict[str, torch.Tensor]:
        """Number of targets of each loss term (the denominators of the mean loss)."""
        return {"loss": (batch["labels"] != IGNORE_INDEX).sum()}

    def tokens(self, batch: dict) -> int:
        """Token positions the model processes for a batch (throughput counts these)."""
        return batch["input_ids"].numel()

    # ------------------------------------------------------------------ evaluation

    def new_tally(self, model) -> dict[str, torch.Tensor]:
        """Zeroed evaluation counts: every rank holds the same keys and shapes for the all-reduce."""
        return {key: torch.zeros((), dtype=torch.float64) for key in self.tally_keys}

    def tally(self, out, batch: dict) -> dict[str, torch.Tensor]:
        """This batch's contribution to the evaluation counts (summed over batches and ranks)."""
        return {}

    def scores(self, losses: dict[str, float], tally: dict[str, torch.Tensor]) -> dict[str, float]:
        """Metrics from the mean loss of each term and the summed tallies."""
        val_loss = sum(losses.values())
        return {"val_loss": val_loss, "val_ppl": perplexity(val_loss)}

    # ------------------------------------------------------------------ report

    def report(self, metrics: dict, data: TaskData, split: str) -> list[str]:
        """Lines summing up the run's figures on ``split``."""
        return [f"{split} loss {metrics['val_loss']:.3f}"]

    def final_metrics(self, model, data: TaskData, tokenizer: Tokenizer, summary: dict, evaluate) -> dict:
        """Figures for the report on ``data.report_split``: ``summary`` is Trainer.fit's, and
        ``evaluate()`` runs the standard evaluation on that split. A pretraining task reports the
        trainer's last evaluation, the figure its metrics log ends with."""
        return {k: v for k, v in (summary["final"] or {}).items() if k != "step"}


TASKS: dict[str, Task] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: make the task available under ``cls.name``."""
    TASKS[cls.name] = cls()
    return cls


def get_task(name: str, where: str = "TrainConfig.task") -> Task:
    """The task called ``name``; ValueError naming ``where`` and the choices otherwise."""
    if name not in TASKS:
        raise ValueError(f"{where}: got {name!r}, expected one of {tuple(TASKS)}")
    return TASKS[name]


def upgrade_saved_configs(saved: dict) -> dict:
    """A checkpoint's config.json in today's terms. Older minillm saved ``data.objective`` (now
    the task decides the batches) and named span corruption "seq2seq" (now "span-corruption";
    "seq2seq" is the supervised task on pairs)."""
    saved = {key: dict(value) if isinstance(value, dict) else value for key, value in saved.items()}
    objective = (saved.get("data") or {}).pop("objective", None)
    if objective == "seq2seq" and saved["data"].get("train_file") is None:
        saved["task"] = SpanCorruptionTask.name
        if isinstance(saved.get("train"), dict):
            saved["train"]["task"] = SpanCorruptionTask.name
    return saved


def task_of(model: Model) -> str:
    """The task a model is saved under when nobody says: the one task that trains its class (for a
    MaskedLM, "mlm-nsp" when it has an NSP head); for a Seq2SeqLM, which both span corruption and
    supervised seq2seq train, "seq2seq"."""
    if isinstance(model, MaskedLM):
        return "mlm-nsp" if model.nsp_head is not None else "mlm"
    if isinstance(model, Seq2SeqLM):
        return "seq2seq"
    if isinstance(model, XLNetClassifier):
        return "classification"
    for name, task in TASKS.items():
        if type(model) is task.model_class:
            return name
    raise TypeError(f"model: expected a minillm task model ({sorted({t.model_class.__name__ for t in TASKS.values()})}), "
                    f"got {type(model).__name__}")


def build_model(config: ModelConfig, task: str) -> Model:
    """The model a task trains: ``build_model(preset("tiny"), "causal-lm")``."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config: expected a ModelConfig, got {type(config).__name__}")
    return get_task(task, "task").build_model(config)


# =============================================================================================
# Pretraining on the corpus
# =============================================================================================


def corpus_splits(data: DataConfig) -> tuple[TokenShards, TokenShards]:
    """The prepared train and validation shards; pretraining reports a validation figure, so an
    empty validation split is an error."""
    train, val = TokenShards(data.prepared_dir, "train"), TokenShards(data.prepared_dir, "val")
    if len(val) == 0:
        raise ValueError(f"DataConfig.val_fraction: got {data.val_fraction}, which left no validation document; "
                         f"pretraining reports a validation loss (use e.g. 0.05)")
    return train, val


def unigram_entropy(shards: TokenShards) -> float:
    """Entropy in nats of the token unigram distribution of a prepared split (EOS included).

    A model that ignores context and predicts each token's overall frequency has this expected
    loss; a language model must get clearly below it to have learnt anything from context.
    """
    counts = np.bincount(np.asarray(shards.tokens), minlength=shards.vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def corpus_data(data: DataConfig, tokenizer: Tokenizer) -> tuple[TokenShards, TokenShards, str, dict[str, float]]:
    """(train shards, validation shards, a line describing them, {"unigram_entropy": nats}): what
    every corpus task starts from."""
    train, val = corpus_splits(data)
    entropy = unigram_entropy(train)
    summary = (f"data: {len(train)} train / {len(val)} validation documents, {train.n_tokens:,} / {val.n_tokens:,} "
               f"tokens, vocabulary {tokenizer.vocab_size} ({train.out_dir}); unigram entropy of the train split "
               f"{entropy:.3f} nats")
    return train, val, summary, {"unigram_entropy": entropy}


# Prompts for the samples a generating model shows after training on the default (docstring) corpus.
TEXT_PROMPTS = ("Return the", "This module provides", "If the file")


def _token_hits(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Correct argmax predictions and predicted positions, over targets that are not ignored."""
    keep = targets != IGNORE_INDEX
    return {"correct": (logits.argmax(-1)[keep] == targets[keep]).sum(), "predicted": keep.sum()}


def _accuracy(tally: dict[str, torch.Tensor], correct: str = "correct", total: str = "predicted") -> float:
    return float(tally[correct] / tally[total].clamp(min=1))


def text_figures(metrics: dict) -> str:
    """The per-character figures of :func:`minillm.evaluation.evaluate_text` as one phrase."""
    return (f"{metrics['nats_per_char']:.4f} nats/char, {metrics['bits_per_byte']:.4f} bits/byte "
            f"({metrics['text_loss']:.4f} nats/token over {metrics['scored_tokens']:,} tokens = "
            f"{metrics['scored_chars']:,} characters, {metrics['scored_bytes']:,} UTF-8 bytes, "
            f"{metrics['scored_documents']:,} document{'' if metrics['scored_documents'] == 1 else 's'}; each EOS "
            f"counted as one character and one byte)")


@register
class CausalLMTask(Task):
    """GPT: predict every next token of windows of the corpus."""

    name = "causal-lm"
    model_class = CausalLM
    architectures = ("decoder",)
    metrics = ("val_loss", "val_ppl", "token_accuracy")
    data_fields = frozenset({"causal_mode", "document_mask"})
    sample_prompts = TEXT_PROMPTS
    scores_text = True

    def datasets(self, data, tokenizer, model, samples):
        train, val, summary, baselines = corpus_data(data, tokenizer)
        windows = train.n_tokens // data.seq_len
        # random windows are a function of their index: at least `samples` of them never repeat one
        n = max(windows, samples) if data.causal_mode == "random" else None
        return TaskData(
            CausalLMDataset(train, data.seq_len, data.causal_mode, data.seed, n, data.document_mask),
            CausalLMDataset(val, data.seq_len, "sequential", data.seed, document_mask=data.document_mask),
            None, CausalLMCollator(), summary, baselines,
        )

    def target_counts(self, batch):
        return {"loss": (batch["labels"][:, 1:] != IGNORE_INDEX).sum()}  # position t predicts t + 1

    def tally(self, out, batch):
        return _token_hits(out.logits[:, :-1], batch["labels"][:, 1:])

    def scores(self, losses, tally):
        return {**super().scores(losses, tally), "token_accuracy": _accuracy(tally)}

    def report(self, metrics, data, split):
        baseline = data.baselines["unigram_entropy"]
        verdict = "below" if metrics["val_loss"] < baseline else "NOT below"
        lines = [f"{split} loss {metrics['val_loss']:.3f} nats (perplexity {metrics['val_ppl']:.1f}), {verdict} the "
                 f"unigram-entropy baseline {baseline:.3f} nats; next-token accuracy {metrics['token_accuracy']:.1%}"]
        if "nats_per_char" in metrics:
            lines.append(f"{split} text, every token scored once: {text_figures(metrics)}")
        elif getattr(data.validation, "document_mask", False):
            lines.append("no per-character figures: with document_mask the first token of each document is never "
                         "predicted, so part of the text would go unscored")
        return lines


@register
class MaskedLMTask(Task):
    """BERT's masked language modelling: predict the hidden tokens of ``[CLS] piece [SEP]``."""

    name = "mlm"
    model_class = MaskedLM
    architectures = ("encoder",)
    metrics = ("val_loss", "val_ppl", "mlm_accuracy")
    data_fields = frozenset({"mlm_probability", "whole_word_mask", "mask_ratio", "random_ratio"})
    sample_prompts = (
        "Return a new [MASK] with the same items.",
        "Raise a ValueError if the [MASK] is not found.",
        "This module provides [MASK] for working with files.",
    )

    def build_model(self, config):
        return MaskedLM(config, nsp=False)

    def masking(self, data: DataConfig, tokenizer: Tokenizer) -> MLMCollator:
        return MLMCollator(tokenizer, data.mlm_probability, data.whole_word_mask, data.mask_ratio, data.random_ratio,
                           seed=data.seed)

    def datasets(self, data, tokenizer, model, samples):
        train, val, summary, baselines = corpus_data(data, tokenizer)
        return TaskData(MLMDataset(train, tokenizer, data.seq_len), MLMDataset(val, tokenizer, data.seq_len), None,
                        self.masking(data, tokenizer), summary, baselines)

    def forward(self, model, batch):
        # MLM: the head runs on the masked positions only; logits (N, V) in row-major order
        out = model(**batch, loss_reduction="sum", masked_logits_only=True)
        return out, {"loss": out.loss}

    def tally(self, out, batch):
        labels = batch["labels"]
        return _token_hits(out.logits, labels[labels != IGNORE_INDEX])

    def scores(self, losses, tally):
        return {**super().scores(losses, tally), "mlm_accuracy": _accuracy(tally)}

    def report(self, metrics, data, split):
        return [f"{split} MLM loss {metrics['val_loss']:.3f}, MLM accuracy "
                f"{metrics['mlm_accuracy']:.1%}; unigram entropy {data.baselines['unigram_entropy']:.3f} nats"]


@register
class MaskedLMNextSentenceTask(MaskedLMTask):
    """BERT's pretraining: MLM on sentence pairs, plus next-sentence prediction from [CLS].

    Two loss terms with their own denominators, ``mlm_sum / n_masked + nsp_sum / n_pairs``: the
    two means of the model's default loss."""

    name = "mlm-nsp"
    metrics = ("val_loss", "val_ppl", "mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy")
    loss_terms = ("mlm", "nsp")
    tally_keys = ("correct", "predicted", "nsp_correct", "nsp_predicted")
    data_fields = MaskedLMTask.data_fields | {"nsp_random_probability"}

    def build_model(self, config):
        return MaskedLM(config, nsp=True)

    def check_model(self, model):
        super().check_model(model)
        if model.nsp_head is None:
            raise TypeError("model: task 'mlm-nsp' needs a MaskedLM with an NSP head (MaskedLM(config, nsp=True))")

    def datasets(self, data, tokenizer, model, samples):
        train, val, summary, baselines = corpus_data(data, tokenizer)
        # pairs are a function of their index: `samples` of them never repeat a pair within the run
        return TaskData(
            NSPDataset(train, tokenizer, data.seq_len, data.nsp_random_probability, data.seed, max(samples, len(train))),
            NSPDataset(val, tokenizer, data.seq_len, data.nsp_random_probability, data.seed + 1, max(4 * len(val), 256)),
            None, self.masking(data, tokenizer), summary, baselines,
        )

    def forward(self, model, batch):
        inputs = {k: v for k, v in batch.items() if k != "next_sentence_label"}
        out = model(**inputs, loss_reduction="sum", masked_logits_only=True)
        nsp = F.cross_entropy(out.nsp_logits.float(), batch["next_sentence_label"], ignore_index=IGNORE_INDEX,
                              reduction="sum")
        return out, {"mlm": out.loss, "nsp": nsp}

    def target_counts(self, batch):
        return {"mlm": (batch["labels"] != IGNORE_INDEX).sum(),
                "nsp": (batch["next_sentence_label"] != IGNORE_INDEX).sum()}

    def tally(self, out, batch):
        nsp = _token_hits(out.nsp_logits, batch["next_sentence_label"])
        return {**super().tally(out, batch), "nsp_correct": nsp["correct"], "nsp_predicted": nsp["predicted"]}

    def scores(self, losses, tally):
        return {"val_loss": losses["mlm"] + losses["nsp"], "val_ppl": perplexity(losses["mlm"]),
                "mlm_loss": losses["mlm"], "nsp_loss": losses["nsp"], "mlm_accuracy": _accuracy(tally),
                "nsp_accuracy": _accuracy(tally, "nsp_correct", "nsp_predicted")}

    def report(self, metrics, data, split):
        return [f"{split} MLM loss {metrics['mlm_loss']:.3f}, MLM accuracy {metrics['mlm_accuracy']:.1%}, NSP loss "
                f"{metrics['nsp_loss']:.3f}, NSP accuracy {metrics['nsp_accuracy']:.1%} (chance 50%); unigram entropy "
                f"{data.baselines['unigram_entropy']:.3f} nats"]


@register
class PermutationLMTask(Task):
    """XLNet's pretraining: in a random order of each window, predict the last 1 in K tokens (K = 6)
    from the ones before them in that order, wherever they sit (see minillm.data.permutation)."""

    name = "permutation-lm"
    model_class = XLNetLM
    architectures = ("xlnet",)
    metrics = ("val_loss", "val_ppl", "token_accuracy")
    predict_one_in: ClassVar[int] = 6  # K: XLNet-Large's partial prediction (section 2.3, appendix A.3)

    def datasets(self, data, tokenizer, model, samples):
        train, val, summary, baselines = corpus_data(data, tokenizer)
        # random windows and orders are a function of their index: `samples` of them never repeat one
        windows = CausalLMDataset(train, data.seq_len, "random", data.seed, max(train.n_tokens // data.seq_len, samples))
        return TaskData(
            PermutationLMDataset(windows, data.seed),
            PermutationLMDataset(CausalLMDataset(val, data.seq_len, "sequential", data.seed), data.seed + 1),
            None, PermutationLMCollator(self.predict_one_in), summary, baselines,
        )

    def tally(self, out, batch):
        return _token_hits(out.logits, batch["labels"])

    def scores(self, losses, tally):
        return {**super().scores(losses, tally), "token_accuracy": _accuracy(tally)}

    def report(self, metrics, data, split):
        baseline = data.baselines["unigram_entropy"]
        verdict = "below" if metrics["val_loss"] < baseline else "NOT below"
        return [f"{split} loss {metrics['val_loss']:.3f} nats on the predicted tokens (the last 1 in "
                f"{self.predict_one_in} of each order), {verdict} the unigram-entropy baseline {baseline:.3f} nats; "
                f"accuracy {metrics['token_accuracy']:.1%}"]


class _EncoderDecoderTask(Task):
    """What span corruption and supervised seq2seq share: the model, its loss and token accuracy."""

    model_class = Seq2SeqLM
    architectures = ("encoder-decoder",)
    metrics = ("val_loss", "val_ppl", "token_accuracy")

    def tokens(self, batch):
        return batch["input_ids"].numel() + batch["labels"].numel()  # encoder + decoder positions

    def tally(self, out, batch):
        return _token_hits(out.logits, batch["labels"])

    def scores(self, losses, tally):
        return {**super().scores(losses, tally), "token_accuracy": _accuracy(tally)}


@register
class SpanCorruptionTask(_EncoderDecoderTask):
    """T5's pretraining: rebuild the spans removed from a piece of the corpus (sentinel, span, ...)."""

    name = "span-corruption"
    data_fields = frozenset({"noise_density", "mean_span_length"})
    sample_prompts = TEXT_PROMPTS

    def datasets(self, data, tokenizer, model, samples):
        train, val, summary, baselines = corpus_data(data, tokenizer)

        def spans(shards: TokenShards) -> SpanCorruptionDataset:
            return SpanCorruptionDataset(shards, tokenizer, data.seq_len, data.noise_density, data.mean_span_length,
                                         data.seed)

        return TaskData(spans(train), spans(val), None, Seq2SeqCollator(tokenizer), summary, baselines)

    def report(self, metrics, data, split):
        return [f"{split} loss {metrics['val_loss']:.3f} nats on the corrupted spans, token accuracy "
                f"{metrics['token_accuracy']:.1%}"]


# =============================================================================================
# Supervised tasks on labelled files
# =============================================================================================


def _split_sizes(sets: dict) -> str:
    """The sizes every supervised task's summary opens with: "data: N train / M validation (/ K test)"."""
    return (f"data: {len(sets['train'])} train / {len(sets['validation'])} validation"
            + (f" / {len(sets['test'])} test" if "test" in sets else ""))


def _majority_baseline(splits: dict) -> float:
    """Accuracy of always answering the training split's most frequent label, on the split a run
    reports (test, else validation)."""
    held_out = splits["test"] if splits["test"] is not None else splits["validation"]
    majority = Counter(splits["train"].labels).most_common(1)[0][0]
    return sum(label == majority for label in held_out.labels) / len(held_out.labels)


def _supervised_files(data: DataConfig, task: str, default_ok: bool) -> None:
    """Refuse a supervised run without its files, naming the field."""
    if data.train_file is None:
        hint = " or 'default' (the embedded stdlib task)" if default_ok else ""
        raise ValueError(f"DataConfig.train_file: task {task!r} trains on a file of examples; got none (a CSV, TSV or "
                         f"JSONL path{hint})")
    if data.train_file != "default" and data.validation_file is None:
        raise ValueError(f"DataConfig.validation_file: required with train_file={data.train_file!r}: it picks the "
                         f"best checkpoint (add data.test_file for a figure no choice has seen)")


@register
class Seq2SeqTask(_EncoderDecoderTask):
    """Supervised sequence to sequence on (source, target) pairs: ``text_field`` -> ``target_field``
    of the train/validation/test files, or (``train_file="default"``) the embedded stdlib task
    (:func:`minillm.data.default_corpus.stdlib_seq2seq_task`).

    The report decodes the test split (or validation, without a test file) greedily and scores the
    outputs against the references with BLEU and chrF (sacrebleu), next to the same scores of
    copying each source unchanged: a model that only learnt to copy does not beat that baseline."""

    name = "seq2seq"
    from_corpus = False
    keep_best = True
    data_fields = frozenset({"train_file", "validation_file", "test_file", "text_field", "target_field"})

    def datasets(self, data, tokenizer, model, samples):
        _supervised_files(data, self.name, default_ok=True)
        if data.train_file == "default":  # the embedded task: docstring first lines, said backwards
            task = stdlib_seq2seq_task()
            pairs = {"train": task.train, "validation": task.validation, "test": task.test}
        else:
            files = {"train": data.train_file, "validation": data.validation_file, "test": data.test_file}
            pairs = {split: read_seq2seq_pairs(path, data.text_field, data.target_field, data.encoding_errors)
                     for split, path in files.items() if path is not None}
        sets = {split: Seq2SeqPairDataset(p, tokenizer, data.seq_len, data.seq_len) for split, p in pairs.items()}
        summary = _split_sizes(sets) + " (source, target) pairs"
        return TaskData(sets["train"], sets["validation"], sets.get("test"), Seq2SeqCollator(tokenizer), summary,
                        pairs=pairs)

    def final_metrics(self, model, data, tokenizer, summary, evaluate):
        """The standard metrics, BLEU and chrF of greedy outputs; the copy baselines join data.baselines."""
        split = data.report_split
        dataset = data.test if data.test is not None else data.validation
        sources, references = [s for s, _ in data.pairs[split]], [t for _, t in data.pairs[split]]
        eos, device = tokenizer.require("eos"), next(model.parameters()).device
        outputs = []
        for lo in range(0, len(dataset), 32):  # greedy, 32 sources at a time, as the dataset encoded them
            batch = data.collate([dataset[i] for i in range(lo, min(lo + 32, len(dataset)))])
            out = generate_seq2seq(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                   max_new_tokens=model.config.max_seq_len - 1, eos_token_id=eos)  # (B, 1 + new)
            outputs += [tokenizer.decode([t for t in row[1:].tolist() if t not in (eos, tokenizer.pad_id)])
                        for row in out]
        model_scores, copy_scores = text_scores(outputs, references), text_scores(sources, references)
        data.baselines.update({f"copy_{k}": v for k, v in copy_scores.items()})
        return {**evaluate(), **model_scores, "examples": list(zip(sources[:3], outputs[:3], references[:3]))}

    def report(self, metrics, data, split):
        return [f"{split} BLEU {metrics['bleu']:.1f}, chrF {metrics['chrf']:.1f} (greedy decoding) vs copying the "
                f"source: BLEU {data.baselines['copy_bleu']:.1f}, chrF {data.baselines['copy_chrf']:.1f}; {split} loss "
                f"{metrics['val_loss']:.3f}, token accuracy {metrics['token_accuracy']:.1%}",
                *(f"  {s!r} -> {o!r} (reference {r!r})" for s, o, r in metrics["examples"])]


@register
class ClassificationTask(Task):
    """A label for each text (or text pair), read from the body's hidden states (see
    SequenceClassifier): BERT's fine-tuning, or a GPT's, which reads the last real token."""

    name = "classification"
    model_class = SequenceClassifier
    architectures = ("encoder", "decoder", "xlnet")
    metrics = ("val_loss", "accuracy", "macro_f1", "f1", "mcc")
    from_corpus = False
    new_head = True
    keep_best = True
    data_fields = frozenset({"train_file", "validation_file", "test_file", "text_field", "label_field",
                             "text_pair_field", "glue_task", "train_examples"})

    def build_model(self, config):
        return XLNetClassifier(config) if config.arch == "xlnet" else SequenceClassifier(config)

    def check_model(self, model):
        if isinstance(unwrap_model(model), XLNetClassifier):
            return
        super().check_model(model)

    def data_fields_read(self, data, tokenizer_from_corpus):
        fields = super().data_fields_read(data, tokenizer_from_corpus)
        return fields | {"stdlib_classes"} if data.train_file == "default" else fields

    def configure_model(self, config, data):
        return dataclasses.replace(config, num_labels=len(data.labels))

    def datasets(self, data, tokenizer, model, samples):
        _supervised_files(data, self.name, default_ok=True)
        splits = classification_examples(data)
        sets = {name: ClassificationDataset(examples, tokenizer, data.seq_len)
                for name, examples in splits.items() if examples is not None}
        labels = splits["train"].label_map.names
        summary = _split_sizes(sets) + f" examples, {len(labels)} labels {labels}"
        return TaskData(
            sets["train"], sets["validation"], sets.get("test"),
            # segment ids only for a body that has segment embeddings (BERT's); a GPT reads [SEP]
            ClassificationCollator(tokenizer, segments=model.type_vocab_size > 0), summary,
            {"majority_baseline": _majority_baseline(splits)}, labels,
        )

    def target_counts(self, batch):
        labels = batch["labels"]
        if labels.is_floating_point():  # regression: one target per example
            return {"loss": torch.tensor(labels.numel(), device=labels.device)}
        return {"loss": (labels != IGNORE_INDEX).sum()}

    def new_tally(self, model):
        k = model.config.num_labels
        return {} if k == 1 else {"confusion": torch.zeros(k, k, dtype=torch.float64)}  # 1 label: regression

    def tally(self, out, batch):
        labels = batch["labels"]
        if labels.is_floating_point():
            return {}
        return {"confusion": confusion_matrix(out.logits.argmax(-1), labels, out.logits.shape[-1])}

    def scores(self, losses, tally):
        metrics = {"val_loss": losses["loss"]}
        if "confusion" in tally:
            metrics.update(classification_metrics(tally["confusion"].long().cpu()))
        return metrics

    def final_metrics(self, model, data, tokenizer, summary, evaluate):
        return evaluate()

    def report(self, metrics, data, split):
        if "accuracy" not in metrics:  # regression
            return [f"{split} mean squared error {metrics['val_loss']:.4f}"]
        why = "" if split == "test" else " (no data.test_file: this split also picked the best checkpoint)"
        return [f"{split} accuracy {metrics['accuracy']:.1%} (macro-F1 {metrics['macro_f1']:.3f}, MCC "
                f"{metrics['mcc']:.3f}) vs majority-class baseline {data.baselines['majority_baseline']:.1%}{why}"]


@register
class ClozeTask(ClassificationTask):
    """PET-style cloze classification (Schick & Schütze, 2021; :mod:`minillm.data.cloze`): a masked
    LM fills the [MASK] of ``data.cloze_pattern``, and the class scores are its MLM head's logits
    for the verbalizer's words (``data.cloze_verbalizer``). The classification data, metrics and
    report; the model is the masked LM itself (its head is pretrained: no new head, no probe), with
    num_labels set to the verbalizer's K for the confusion matrix."""

    name = "cloze"
    model_class = MaskedLM
    architectures = ("encoder",)
    new_head = False
    data_fields = ClassificationTask.data_fields | {"cloze_pattern", "cloze_verbalizer"}

    def build_model(self, config):
        return MaskedLM(config, nsp=False)

    def check_model(self, model):
        Task.check_model(self, model)

    def check(self, model, data):
        super().check(model, data)
        check_pattern(data.cloze_pattern)

    def datasets(self, data, tokenizer, model, samples):
        _supervised_files(data, self.name, default_ok=True)
        splits = classification_examples(data)
        labels = splits["train"].label_map.names
        words = parse_verbalizer(data.cloze_verbalizer, labels)
        sets = {name: ClozeDataset(examples, tokenizer, data.seq_len, data.cloze_pattern, words)
                for name, examples in splits.items() if examples is not None}
        summary = (_split_sizes(sets) + f" examples as cloze questions {data.cloze_pattern!r}, "
                   f"words {dict(zip(labels, words))}")
        return TaskData(
            sets["train"], sets["validation"], sets.get("test"), ClozeCollator(tokenizer, sets["train"].verbalizer),
            summary, {"majority_baseline": _majority_baseline(splits)}, labels,
        )

    def forward(self, model, batch):
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"],
                    labels=batch["mlm_labels"], loss_reduction="sum", masked_logits_only=True)  # (B, V): the masks
        label_logits = out.logits[:, batch["verbalizer_ids"]]  # (B, K): the verbalizer's words
        loss = F.cross_entropy(label_logits.float(), batch["labels"], reduction="sum")
        return ModelOutput(logits=label_logits, loss=loss), {"loss": loss}
