"""Recipes: the library API behind the ``minillm`` command line.

Each command of the CLI is one function here, so a notebook runs exactly what the command runs::

    from minillm.config import preset
    from minillm.data import DataConfig
    from minillm.train_config import TrainConfig
    from minillm import recipes

    result = recipes.pretrain(preset("tiny"), DataConfig(vocab_size=4096), TrainConfig(max_steps=300))
    result["val_loss"], result["unigram_entropy"], result["checkpoint"]

==================  ===========================================================================
``prepare_data``    corpus -> tokenizer + token shards (cached; see minillm.data.prepare)
``pretrain``        prepare, build the model for the task, train, compare the validation loss
                    with the corpus's unigram entropy, show samples, return the figures
``finetune``        sequence classification from a checkpoint (or scratch), test accuracy next to
                    the majority-class baseline
``evaluate``        a checkpoint's metrics on held-out data
``sample``          text from a checkpoint: continuations (GPT, encoder-decoder) or filled
                    ``[MASK]`` tokens (BERT)
==================  ===========================================================================

Conventions. The task (``TrainConfig.task``) chooses the batches: causal-lm -> causal windows,
mlm -> masked sequences, mlm-nsp -> masked sentence pairs, seq2seq -> T5 span corruption,
classification -> labelled texts. The model's vocabulary and special ids are set to the
tokenizer's. ``DataConfig.train_file = "default"`` (the fine-tuning default) is the embedded
stdlib classification task (:func:`minillm.data.stdlib_classification_task`), as
``inputs = ["default"]`` is the embedded corpus. Output goes through ``echo`` (``print`` by
default) so callers can silence it.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from minillm import checkpoint as ckpt
from minillm.config import ModelConfig
from minillm.data import (
    ClassificationCollator,
    ClassificationDataset,
    CausalLMCollator,
    CausalLMDataset,
    DataConfig,
    MLMCollator,
    MLMDataset,
    NSPDataset,
    Seq2SeqCollator,
    SpanCorruptionDataset,
    TokenShards,
    classification_examples,
    prepare_from_config,
)
from minillm.generation import generate, generate_seq2seq
from minillm.metrics import classification_metrics, confusion_matrix
from minillm.model import CausalLM, MaskedLM, Seq2SeqLM, build_model
from minillm.tokenizer import Tokenizer
from minillm.train_config import TrainConfig
from minillm.trainer import Trainer, seed_everything

DEFAULT_TASK_FILE = "default"  # DataConfig.train_file naming the embedded classification task
MASK_TEXT = "[MASK]"  # where `sample` puts a mask token in a BERT prompt
# Prompts for the samples printed after pretraining on the default (stdlib docstring) corpus.
DEFAULT_PROMPTS = ("Return the", "This module provides", "If the file")
DEFAULT_MASK_PROMPTS = (
    "Return a new [MASK] with the same items.",
    "Raise a ValueError if the [MASK] is not found.",
    "This module provides [MASK] for working with files.",
)


def _say(echo, *lines: str) -> None:
    if echo is not None:
        for line in lines:
            echo(line)


# =============================================================================================
# Data
# =============================================================================================


def prepare_data(data: DataConfig, progress: bool = True) -> tuple[Tokenizer, dict]:
    """Tokenizer and token shards for ``data`` (cached: a rerun with the same inputs is instant).

    Returns (tokenizer, summary) with summary = {prepared_dir, skipped, seconds, documents and
    tokens per split, vocab_size}.
    """
    tokenizer, result = prepare_from_config(data, progress=progress)
    splits = result.manifest["splits"]
    return tokenizer, {
        "prepared_dir": str(result.out_dir), "skipped": result.skipped, "seconds": result.seconds,
        "vocab_size": tokenizer.vocab_size, "tokenizer": str(tokenizer.path),
        **{f"{split}_{key}": value for split, info in splits.items() for key, value in info.items()},
    }


def unigram_entropy(prepared_dir: str | Path, split: str = "train") -> float:
    """Entropy in nats of the token unigram distribution of a prepared split (EOS included).

    A model that ignores context and predicts each token's overall frequency has this expected
    loss; a language model must get clearly below it to have learnt anything from context.
    """
    shards = TokenShards(prepared_dir, split)
    counts = np.bincount(np.asarray(shards.tokens), minlength=shards.vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _check_lengths(model: ModelConfig, data: DataConfig) -> None:
    if data.seq_len > model.max_seq_len:
        raise ValueError(
            f"DataConfig.seq_len: got {data.seq_len}, longer than ModelConfig.max_seq_len={model.max_seq_len}; "
            f"lower --data.seq_len or raise --model.max_seq_len"
        )


def pretraining_data(task: str, data: DataConfig, tokenizer: Tokenizer, train: TrainConfig):
    """(train dataset, validation dataset, collator) for a pretraining task on prepared shards."""
    train_shards, val_shards = TokenShards(data.prepared_dir, "train"), TokenShards(data.prepared_dir, "val")
    if len(val_shards) == 0:
        raise ValueError("DataConfig.val_fraction: got 0, but pretraining reports a validation loss; use e.g. 0.05")
    # Samples the run will draw: random windows and NSP pairs are functions of their index, so
    # at least this many indices means no sample repeats within the run.
    n_train = train.max_steps * train.batch_size * train.grad_accum_steps
    if task == "causal-lm":
        windows = train_shards.n_tokens // data.seq_len
        samples = max(windows, n_train) if data.causal_mode == "random" else None
        return (
            CausalLMDataset(train_shards, data.seq_len, data.causal_mode, data.seed, samples, data.document_mask),
            CausalLMDataset(val_shards, data.seq_len, "sequential", data.seed, document_mask=data.document_mask),
            CausalLMCollator(),
        )
    masking = MLMCollator(tokenizer, data.mlm_probability, data.whole_word_mask, data.mask_ratio,
                          data.random_ratio, seed=data.seed)
    if task == "mlm":
        return MLMDataset(train_shards, tokenizer, data.seq_len), MLMDataset(val_shards, tokenizer, data.seq_len), masking
    if task == "mlm-nsp":
        n_val = max(4 * len(val_shards), 256)
        return (
            NSPDataset(train_shards, tokenizer, data.seq_len, data.nsp_random_probability, data.seed,
                       max(n_train, len(train_shards))),
            NSPDataset(val_shards, tokenizer, data.seq_len, data.nsp_random_probability, data.seed + 1, n_val),
            masking,
        )
    if task == "seq2seq":
        def spans(shards):
            return SpanCorruptionDataset(shards, tokenizer, data.seq_len, data.noise_density, data.mean_span_length, data.seed)

        return spans(train_shards), spans(val_shards), Seq2SeqCollator(tokenizer)
    raise ValueError(f"TrainConfig.task: {task!r} is not a pretraining task (causal-lm, mlm, mlm-nsp, seq2seq)")


def _fit_to_tokenizer(model: ModelConfig, tokenizer: Tokenizer) -> ModelConfig:
    """The model config with the tokenizer's vocabulary size and special ids."""
    return dataclasses.replace(
        model, vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.require("pad"),
        bos_token_id=tokenizer.require("bos"), eos_token_id=tokenizer.require("eos"),
    )


# =============================================================================================
# Pretraining
# =============================================================================================


def pretrain(model: ModelConfig, data: DataConfig, train: TrainConfig, *, echo=print, hooks=None,
             num_samples: int = 3, before_fit=None) -> dict:
    """Prepare the data, train ``model`` on ``train.task``, report against the unigram baseline.

    ``hooks`` go to the Trainer; ``before_fit()`` is called once the Trainer has accepted
    ``train.out_dir`` (the CLI saves the resolved config there).

    Returns {"val_loss", "unigram_entropy", "metrics" (final evaluation), "summary" (Trainer.fit),
    "checkpoint", "out_dir", "samples", "seconds", "model_config", "parameters"}.
    """
    if train.task == "classification":
        raise ValueError("TrainConfig.task: 'classification' is fine-tuning; use finetune() / `minillm finetune`")
    start = time.perf_counter()
    tokenizer, prepared = prepare_data(data, progress=train.progress)
    model = _fit_to_tokenizer(model, tokenizer)
    _check_lengths(model, data)
    baseline = unigram_entropy(data.prepared_dir)
    _say(echo, f"data: {prepared['train_documents']} train / {prepared['val_documents']} validation documents, "
               f"{prepared['train_tokens']:,} / {prepared['val_tokens']:,} tokens, vocabulary {tokenizer.vocab_size} "
               f"({prepared['prepared_dir']}); unigram entropy of the train split {baseline:.3f} nats")

    train_set, val_set, collate = pretraining_data(train.task, data, tokenizer, train)
    seed_everything(train.seed)  # the initial weights are the seed's (every rank builds the same model)
    net = build_model(model, train.task)
    _say(echo, f"model: {type(net).__name__} ({model.arch}), {net.num_parameters():,} parameters; task {train.task}")
    trainer = Trainer(net, train, train_set, val_set, collate_fn=collate, configs_to_save={"data": data},
                      tokenizer=tokenizer, hooks=hooks)
    if before_fit is not None:
        before_fit()
    summary = trainer.fit()
    metrics = summary["final"] or {}
    result = {
        "val_loss": metrics.get("val_loss"), "unigram_entropy": baseline, "metrics": metrics, "summary": summary,
        "out_dir": str(trainer.out_dir), "checkpoint": str(ckpt.latest_checkpoint(trainer.out_dir)),
        "model_config": model, "parameters": net.num_parameters(), "prepare": prepared,
    }
    _say(echo, _pretrain_report(train.task, result))
    result["samples"] = _show_samples(trainer.raw_model, tokenizer, num_samples, train.seed, echo)
    result["seconds"] = time.perf_counter() - start
    _say(echo, f"checkpoint: {result['checkpoint']}  metrics: {trainer.out_dir / 'metrics.jsonl'}  "
               f"plot: {trainer.out_dir / 'metrics.png'}  ({result['seconds']:.0f} s in all)")
    return result


def _pretrain_report(task: str, result: dict) -> str:
    m, s = result["metrics"], result["summary"]
    lines = [f"trained {s['steps']} steps ({s['stopped']}), {s['tokens']:,} tokens in {s['elapsed_s']:.0f} s, "
             f"{s['tokens_per_s']:,.0f} tokens/s"]
    if task == "causal-lm":
        verdict = "below" if m["val_loss"] < result["unigram_entropy"] else "NOT below"
        lines.append(f"validation loss {m['val_loss']:.3f} nats (perplexity {m['val_ppl']:.1f}), {verdict} the "
                     f"unigram-entropy baseline {result['unigram_entropy']:.3f} nats; next-token accuracy "
                     f"{m['token_accuracy']:.1%}")
    elif task in ("mlm", "mlm-nsp"):
        line = f"validation MLM loss {m.get('mlm_loss', m['val_loss']):.3f}, MLM accuracy {m['mlm_accuracy']:.1%}"
        if task == "mlm-nsp":
            line += f", NSP loss {m['nsp_loss']:.3f}, NSP accuracy {m['nsp_accuracy']:.1%} (chance 50%)"
        lines.append(line + f"; unigram entropy {result['unigram_entropy']:.3f} nats")
    else:
        lines.append(f"validation loss {m['val_loss']:.3f} nats, token accuracy {m['token_accuracy']:.1%}")
    return "\n".join(lines)


def _show_samples(model, tokenizer: Tokenizer, n: int, seed: int, echo) -> list[str]:
    if n <= 0:
        return []
    if isinstance(model, MaskedLM):
        prompts, kind = list(DEFAULT_MASK_PROMPTS[:n]), "MLM predictions"
    else:
        prompts, kind = list(DEFAULT_PROMPTS[:n]), "samples"
    outputs = sample(model, tokenizer, prompts, max_new_tokens=40, seed=seed)
    _say(echo, f"{kind}:", *(f"  {p!r} -> {o!r}" for p, o in zip(prompts, outputs)))
    return outputs


# =============================================================================================
# Sampling
# =============================================================================================


@torch.no_grad()
def sample(model, tokenizer: Tokenizer, prompts: list[str], *, max_new_tokens: int = 50, temperature: float = 0.8,
           top_k: int | None = 40, top_p: float | None = None, greedy: bool = False, seed: int = 0) -> list[str]:
    """Text for each prompt: the continuation (CausalLM), the output (Seq2SeqLM, greedy) or the
    prompt with every ``[MASK]`` replaced by the model's top token (MaskedLM)."""
    device = next(model.parameters()).device
    if isinstance(model, MaskedLM):
        return [_fill_masks(model, tokenizer, p, device) for p in prompts]
    if isinstance(model, Seq2SeqLM):
        eos = tokenizer.require("eos")
        outs = []
        for prompt in prompts:
            ids = torch.tensor([tokenizer.encode(prompt) + [eos]], device=device)
            out = generate_seq2seq(model, ids, max_new_tokens=min(max_new_tokens, model.config.max_seq_len - 1),
                                   eos_token_id=eos)
            outs.append(tokenizer.decode(out[0, 1:].tolist()))
        return outs
    if not isinstance(model, CausalLM):
        raise ValueError(f"sample: a {type(model).__name__} does not generate text (use a GPT, BERT or seq2seq checkpoint)")
    generator = torch.Generator(device=device).manual_seed(seed)
    outs = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt) or [tokenizer.require("eos")]
        room = model.config.max_seq_len - len(ids)
        if room < 1:
            raise ValueError(f"sample: the prompt has {len(ids)} tokens, max_seq_len is {model.config.max_seq_len}")
        out = generate(model, torch.tensor([ids], device=device), max_new_tokens=min(max_new_tokens, room),
                       do_sample=not greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                       eos_token_id=tokenizer.eos_id, generator=generator)
        new = [t for t in out[0, len(ids):].tolist() if t != tokenizer.eos_id and t != tokenizer.pad_id]
        # decoded with the prompt: a piece's leading space ("▁the") survives only inside a sequence
        outs.append(tokenizer.decode(ids + new)[len(tokenizer.decode(ids)):])
    return outs


def _fill_masks(model: MaskedLM, tokenizer: Tokenizer, prompt: str, device) -> str:
    parts = prompt.split(MASK_TEXT)
    if len(parts) == 1:
        raise ValueError(f"sample: a BERT prompt needs at least one {MASK_TEXT} to fill, got {prompt!r}")
    mask_id = tokenizer.require("mask")
    ids, masked = [tokenizer.require("cls")], []
    for k, part in enumerate(parts):
        # Strip the spaces around a mask: the dummy prefix gives each part its leading "▁", and a
        # masked word carries its own, so "a [MASK] b" reads as it did in training, not "a ▁ [MASK]".
        ids += tokenizer.encode(part.strip()) if part.strip() else []
        if k < len(parts) - 1:
            masked.append(len(ids))
            ids.append(mask_id)
    ids.append(tokenizer.require("sep"))
    logits = model(torch.tensor([ids], device=device)).logits[0]  # (T, V)
    logits[:, torch.from_numpy(tokenizer.special).to(device)] = float("-inf")  # predict words, not specials
    for position in masked:
        ids[position] = int(logits[position].argmax())
    def shown(i: int) -> str:  # the word, or the piece itself for whitespace ("▁", newline)
        return tokenizer.decode([i]).strip() or repr(tokenizer.id_to_piece(i))

    return "".join(parts[k] + (f"[{shown(ids[masked[k]])}]" if k < len(masked) else "") for k in range(len(parts)))


# =============================================================================================
# Fine-tuning (sequence classification)
# =============================================================================================


def classification_data(data: DataConfig, tokenizer: Tokenizer) -> dict:
    """{"labels", "train", "validation", "test"} as ClassificationDatasets.

    ``data.train_file == "default"``: the embedded stdlib task (its own test split). Otherwise the
    train/validation files (CSV/TSV/JSONL or a GLUE layout); the validation file is also the test.
    """
    if data.train_file not in (None, DEFAULT_TASK_FILE) and data.validation_file is None:
        raise ValueError("DataConfig.validation_file: required with a train_file (it is the held-out set)")
    splits = classification_examples(dataclasses.replace(data, train_file=data.train_file or DEFAULT_TASK_FILE))
    out = {name: ClassificationDataset(examples, tokenizer, data.seq_len) for name, examples in splits.items()}
    out["labels"] = splits["train"].label_map.names
    out["label_ids"] = {name: examples.labels for name, examples in splits.items()}
    return out


def majority_baseline(train_labels: list[int], test_labels: list[int]) -> float:
    """Accuracy on the test labels of always predicting the most frequent training label."""
    majority = Counter(train_labels).most_common(1)[0][0]
    return sum(label == majority for label in test_labels) / len(test_labels)


def _is_hf_directory(path: Path) -> bool:
    return path.is_dir() and not (path / ckpt.WEIGHTS).is_file() and ckpt._is_hf_directory(path)


def _finetune_start(model: ModelConfig, data: DataConfig, train: TrainConfig, progress: bool):
    """(model config, tokenizer, where the weights come from) for fine-tuning."""
    if train.init_from is None:
        tokenizer = Tokenizer.load(data.tokenizer) if data.tokenizer else prepare_data(data, progress)[0]
        return _fit_to_tokenizer(model, tokenizer), tokenizer, "scratch (random initialisation)"
    source = Path(train.init_from)
    if _is_hf_directory(source):
        import json

        from minillm.convert import config_from_hf

        if data.tokenizer is None:
            raise ValueError(
                f"DataConfig.tokenizer: fine-tuning the Hugging Face model {source} needs a sentencepiece .model "
                f"with its vocabulary (WordPiece/BPE vocab files are not supported)"
            )
        hf = json.loads((source / "config.json").read_text())
        config = dataclasses.replace(config_from_hf(hf, "classification"), classifier_pooling=model.classifier_pooling)
        tokenizer = Tokenizer.load(data.tokenizer)
        return config, tokenizer, f"Hugging Face checkpoint {source}"
    try:
        checkpoint = ckpt.resolve_checkpoint(source)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"TrainConfig.init_from: {err}") from None
    # dropouts, backends and the classifier's pooling come from this run's config, the rest from the checkpoint
    config = ckpt.saved_architecture(checkpoint, model)
    if not (checkpoint / ckpt.TOKENIZER).is_file():
        raise ValueError(f"TrainConfig.init_from: {checkpoint} has no {ckpt.TOKENIZER}; it cannot be fine-tuned here")
    return config, Tokenizer.load(checkpoint / ckpt.TOKENIZER), f"checkpoint {checkpoint}"


def finetune(model: ModelConfig, data: DataConfig, train: TrainConfig, *, echo=print, hooks=None,
             before_fit=None) -> dict:
    """Fine-tune a sequence classifier and report test accuracy next to the majority baseline.

    Weights come from ``train.init_from`` (a minillm checkpoint or run directory, whose architecture
    and tokenizer are used; or a Hugging Face GPT-2/BERT directory with ``data.tokenizer``), or
    from scratch when it is None (``model`` then gives the architecture). The best checkpoint by
    ``train.early_stopping_metric`` on the validation split is evaluated on the test split.

    Returns {"test": metrics, "majority_baseline", "labels", "start", "n_train" (training examples),
    "summary", "out_dir", ...}.
    """
    if train.task != "classification":
        raise ValueError(f"TrainConfig.task: fine-tuning trains 'classification', got {train.task!r}")
    config, tokenizer, start = _finetune_start(model, data, train, train.progress)
    splits = classification_data(data, tokenizer)
    config = dataclasses.replace(config, num_labels=len(splits["labels"]))
    _check_lengths(config, data)
    majority = majority_baseline(splits["label_ids"]["train"], splits["label_ids"]["test"])
    _say(echo, f"data: {len(splits['train'])} train / {len(splits['validation'])} validation / "
               f"{len(splits['test'])} test examples, {len(splits['labels'])} labels {splits['labels']}",
         f"start: {start}")
    seed_everything(train.seed)  # the initial weights (from scratch, or the new head) are the seed's
    net = build_model(config, "classification")
    collate = ClassificationCollator(tokenizer)
    saved = {"data": data, "labels": splits["labels"]}
    if train.probe_steps and train.init_from is not None and not train.resume:
        ckpt.run_to_resume(train.out_dir, resume=False, overwrite=train.overwrite)  # a taken out_dir fails now, not after the probe
        _probe_head(net, train, splits, collate, saved, tokenizer, echo)
    trainer = Trainer(net, train, splits["train"], splits["validation"], collate_fn=collate,
                      configs_to_save=saved, tokenizer=tokenizer, hooks=hooks)
    if before_fit is not None:
        before_fit()
    summary = trainer.fit()
    best = trainer.out_dir / ckpt.BEST
    if best.exists():
        ckpt.load_weights(trainer.raw_model, best)
    test = classification_metrics(_confusion(trainer.raw_model, splits["test"], collate, len(splits["labels"]),
                                             train.batch_size))
    _say(echo, f"trained {summary['steps']} steps ({summary['stopped']}) in {summary['elapsed_s']:.0f} s; "
               f"best {summary['best_metric']} {summary['best_value']:.4f} at step {summary['best_step']}",
         f"test accuracy {test['accuracy']:.1%} (macro-F1 {test['macro_f1']:.3f}, MCC {test['mcc']:.3f}) vs "
         f"majority-class baseline {majority:.1%}; started from {start}")
    return {"test": test, "majority_baseline": majority, "labels": splits["labels"], "start": start,
            "n_train": len(splits["train"]),
            "summary": summary, "out_dir": str(trainer.out_dir), "checkpoint": str(best if best.exists() else
                                                                                ckpt.latest_checkpoint(trainer.out_dir))}


def _probe_head(net, train: TrainConfig, splits: dict, collate, saved: dict, tokenizer, echo) -> None:
    """LP-FT's first stage (TrainConfig.probe_steps): train only the new head of `net`, on the
    frozen pretrained weights, in out_dir/probe. The fine-tuning Trainer built next re-applies
    train.finetune_mode, so what trains after the probe is exactly what train asks for."""
    probe = dataclasses.replace(
        train, finetune_mode="freeze", freeze_layers=net.config.n_layers, lr=train.probe_lr,
        max_steps=train.probe_steps, warmup_steps=min(train.warmup_steps, train.probe_steps), probe_steps=0,
        early_stopping_patience=0, resume=False, overwrite=True, out_dir=str(Path(train.out_dir) / "probe"),
    )
    summary = Trainer(net, probe, splits["train"], splits["validation"], collate_fn=collate,
                      configs_to_save=saved, tokenizer=tokenizer).fit()
    final = summary["final"] or {}
    _say(echo, f"probe: the head alone ({summary['trainable_parameters']:,} parameters) trained "
               f"{summary['steps']} steps at lr {train.probe_lr:g}; validation {train.early_stopping_metric} "
               f"{final.get(train.early_stopping_metric, float('nan')):.4f}; fine-tuning ({train.finetune_mode}) starts from it")


@torch.no_grad()
def _confusion(model, dataset, collate, num_labels: int, batch_size: int) -> torch.Tensor:
    """Confusion matrix of `model` over a whole labelled dataset."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    matrix = torch.zeros(num_labels, num_labels, dtype=torch.long)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        predictions = model(**batch).logits.argmax(-1)
        matrix += confusion_matrix(predictions.cpu(), labels.cpu(), num_labels)
    model.train(was_training)
    return matrix


# =============================================================================================
# Evaluation of a saved checkpoint
# =============================================================================================


def evaluate(checkpoint: str | Path, *, data: DataConfig | None = None, batch_size: int = 16, max_batches: int = 0,
             device: str = "auto", echo=print) -> dict:
    """Metrics of a checkpoint on held-out data: the validation split of its pretraining data, or
    the test split of its classification task. ``data`` replaces the checkpoint's saved DataConfig."""
    model, configs, tokenizer = ckpt.load_model(checkpoint)
    task = configs["task"]
    if tokenizer is None:
        raise ValueError(f"evaluate: {checkpoint} has no tokenizer.model; evaluate a minillm checkpoint")
    if data is None:
        saved = configs.get("data")
        if saved is None:
            raise ValueError(f"evaluate: {checkpoint} saved no data config; pass one")
        data = DataConfig.from_dict(saved)
    if task == "classification":
        splits = classification_data(data, tokenizer)
        eval_set, collate = splits["test"], ClassificationCollator(tokenizer)
    else:
        # the checkpoint's tokenizer: the shards are rebuilt only if they are missing
        data = dataclasses.replace(data, tokenizer=str(ckpt.resolve_checkpoint(checkpoint) / ckpt.TOKENIZER))
        prepare_data(data, progress=False)
        steps = TrainConfig(task=task, max_steps=1, warmup_steps=0)
        _, eval_set, collate = pretraining_data(task, data, tokenizer, steps)
    with tempfile.TemporaryDirectory(prefix="minillm-evaluate-") as scratch:  # the Trainer's unused log
        config = TrainConfig(task=task, out_dir=scratch, batch_size=batch_size, eval_batches=max_batches,
                             device=device, progress=False, warmup_steps=0)
        metrics = Trainer(model, config, [], eval_set, collate_fn=collate, tokenizer=tokenizer).evaluate()
    _say(echo, f"{ckpt.resolve_checkpoint(checkpoint)} ({task}): " +
         ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)))
    return {"task": task, **metrics}
