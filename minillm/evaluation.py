"""Evaluation: a model's loss and its task's metrics over held-out batches, and per character.

One free function, :func:`evaluate`, serves the trainer (every ``eval_every`` steps), the report
at the end of a run and ``minillm evaluate``. It sums the loss terms and their target counts over
all batches (and all ranks under DDP) before dividing, so the figures are exact means over the
whole set, however it is split into batches or processes; what else is counted (correct tokens,
a confusion matrix) is the task's tally (:mod:`minillm.tasks`).

Per-character figures (:func:`evaluate_text`, causal language models). A loss per token depends
on the tokenizer: a bigger vocabulary puts more text in each token. Dividing the total
cross-entropy by the length of the text those tokens encode does not:

    nats per character = (sum over the scored tokens of -ln p(token | context)) / characters
    bits per byte      = (the same sum / ln 2) / UTF-8 bytes

so runs with different tokenizers, and character- or byte-level models of other tools, compare.
What is scored, exactly: every token of the text, once. The prepared stream of a split is its
documents, each followed by EOS; one EOS is put in front as the context of the first token (a
document start always follows an EOS in training), and :class:`CoveringWindows` cut the stream
into windows of ``seq_len`` tokens that overlap by one, so each token is predicted once from up to
``seq_len - 1`` tokens of context (the last window, shifted back to stay full, scores only its
new tokens). The EOS tokens are scored too (predicting where a document ends is part of modelling
the text), and each counts as one character and one byte: it stands for the separator between
documents (the newline of ``text_split="lines"``). The characters of a document are those of
its decoded tokens: for a tokenizer trained by minillm (identity normalisation), its text exactly.

Not covered: ``document_mask=True`` (the first token of each document is then never predicted,
so part of the text would go unscored), and masked or span-corruption objectives (their loss is
not a likelihood of the whole text).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

from minillm import distributed
from minillm.batches import eval_batches, to_device
from minillm.data import TokenShards
from minillm.data.collate import IGNORE_INDEX, to_tensors
from minillm.tasks import Task, get_task


@torch.no_grad()
def evaluate(model, task: Task | str, batches: Iterable[dict], *, dtype: torch.dtype = torch.float32,
             max_batches: int = 0) -> dict[str, float]:
    """{"val_loss", ...the task's metrics} of ``model`` over ``batches`` (the first ``max_batches``
    when > 0), for ``task`` (a Task or its name). The model runs on its own device, in eval mode,
    and is put back as it was; ``dtype`` is the autocast precision (fp32: none)."""
    if isinstance(task, str):
        task = get_task(task, "task")
    if not isinstance(task, Task):
        raise TypeError(f"task: expected a minillm.tasks.Task or a task name, got {type(task).__name__}")
    task.check_model(model)
    if not isinstance(max_batches, int) or max_batches < 0:
        raise ValueError(f"max_batches: expected an integer >= 0 (0 = every batch), got {max_batches!r}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = {term: torch.zeros((), device=device, dtype=torch.float64) for term in task.loss_terms}
    counts = {term: torch.zeros((), device=device, dtype=torch.float64) for term in task.loss_terms}
    tally = {key: value.to(device) for key, value in task.new_tally(model).items()}
    try:
        for i, batch in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            batch = to_device(batch, device)
            with distributed.autocast(device, dtype):
                out, terms = task.forward(model, batch)
            for term, n in task.target_counts(batch).items():
                sums[term] += terms[term].double()
                counts[term] += n
            for key, value in task.tally(out, batch).items():
                tally[key] += value.to(tally[key].dtype)
    finally:
        model.train(was_training)
    distributed.sum_tensors({**{f"sum:{k}": v for k, v in sums.items()}, **{f"n:{k}": v for k, v in counts.items()},
                             **tally})
    if counts[task.loss_terms[0]] == 0:
        raise ValueError("evaluate: the evaluation data gave no batch with targets")
    losses = {term: (sums[term] / counts[term].clamp(min=1)).item() for term in task.loss_terms}
    return task.scores(losses, tally)


# =============================================================================================
# Per character: every token of a text scored once
# =============================================================================================


class CoveringWindows(torch.utils.data.Dataset):
    """Windows that score every token of ``tokens`` exactly once (module docstring).

    The stream is ``[EOS] + tokens`` (M = n + 1 positions); window k nominally starts at
    s_k = k (T - 1) and predicts stream positions s_k + 1 .. s_k + T - 1. The last window starts at
    M - T instead, so it stays full, and its labels are IGNORE_INDEX where an earlier window
    already scored the position. A stream shorter than ``seq_len`` is one window of its length.
    Items: ``input_ids`` (T,) and ``labels`` (T,), batched by :class:`CoveringCollator`.
    """

    def __init__(self, tokens: np.ndarray, eos_id: int | None, seq_len: int):
        if eos_id is None:
            raise ValueError("CoveringWindows: the shards have no EOS (prepared with append_eos=False); scoring every "
                             "token needs EOS as the first token's context and as the document separator")
        if not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"CoveringWindows: seq_len must be an integer >= 2, got {seq_len!r}")
        if len(tokens) == 0:
            raise ValueError("CoveringWindows: no tokens to score")
        self.stream = np.concatenate([np.array([eos_id], dtype=np.int64), np.asarray(tokens, dtype=np.int64)])  # (M,)
        self.seq_len = min(seq_len, len(self.stream))
        self.n_scored = len(tokens)
        self.windows = math.ceil(self.n_scored / (self.seq_len - 1))

    def __len__(self) -> int:
        return self.windows

    def scored_end(self, windows: int) -> int:
        """How many tokens (of ``tokens``, from the start) the first ``windows`` windows score."""
        return min(self.n_scored, windows * (self.seq_len - 1))

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        if not 0 <= k < self.windows:
            raise IndexError(f"CoveringWindows: window {k} out of range ({self.windows} windows)")
        T = self.seq_len
        nominal = k * (T - 1)
        start = min(nominal, len(self.stream) - T)
        input_ids = self.stream[start : start + T]  # (T,)
        labels = input_ids.copy()  # position t predicts labels[t + 1] (the model shifts)
        labels[: nominal - start + 1] = IGNORE_INDEX  # scored by the window before, or no prediction (t = 0)
        return {"input_ids": input_ids, "labels": labels}


class CoveringCollator:
    """Stack :class:`CoveringWindows` items: ``input_ids``, ``labels``, ``attention_mask`` (B, T)."""

    def __call__(self, samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        input_ids = np.stack([s["input_ids"] for s in samples])  # (B, T)
        return to_tensors({"input_ids": input_ids, "attention_mask": np.ones_like(input_ids),
                           "labels": np.stack([s["labels"] for s in samples])})


def text_size(tokens: np.ndarray, eos_id: int, tokenizer) -> tuple[int, int]:
    """(characters, UTF-8 bytes) of the text ``tokens`` encode: each run between EOS tokens decoded
    (a document, or the start of one when ``tokens`` stops inside it), each EOS one of each."""
    tokens = np.asarray(tokens)
    eos_at = np.flatnonzero(tokens == eos_id)
    pieces = [piece for piece in np.split(tokens, eos_at) if len(piece)]  # each but the first starts with an EOS
    texts = tokenizer.decode_batch([piece[piece != eos_id].tolist() for piece in pieces])
    chars = sum(len(text) for text in texts) + len(eos_at)
    n_bytes = sum(len(text.encode("utf-8")) for text in texts) + len(eos_at)
    return chars, n_bytes


@torch.no_grad()
def evaluate_text(model, shards: TokenShards, tokenizer, *, seq_len: int, batch_size: int = 16, max_batches: int = 0,
                  dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """A causal LM's figures on every token of a prepared split (module docstring): ``val_loss``
    (nats per token), ``val_ppl``, ``token_accuracy``, ``nats_per_char``, ``bits_per_byte``, and
    what was scored: ``scored_tokens``, ``scored_chars``, ``scored_bytes``, ``scored_documents``.
    With ``max_batches`` > 0 only the start of the split is scored, and the figures are that
    start's (its tokens, its characters)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    if not isinstance(max_batches, int) or max_batches < 0:
        raise ValueError(f"max_batches: expected an integer >= 0 (0 = every batch), got {max_batches!r}")
    windows = CoveringWindows(shards.tokens, shards.eos_id, seq_len)
    metrics = evaluate(model, "causal-lm", eval_batches(windows, CoveringCollator(), batch_size=batch_size, seed=0,
                                                        rank=0, world=1), dtype=dtype, max_batches=max_batches)
    n_scored = windows.scored_end(max_batches * batch_size) if max_batches else windows.n_scored
    tokens = shards.tokens[:n_scored]
    chars, n_bytes = text_size(tokens, shards.eos_id, tokenizer)
    nats = metrics["val_loss"] * n_scored
    return {**metrics, "nats_per_char": nats / chars, "bits_per_byte": nats / math.log(2) / n_bytes,
            "scored_tokens": n_scored, "scored_chars": chars, "scored_bytes": n_bytes,
            "scored_documents": int(np.count_nonzero(np.asarray(tokens) == shards.eos_id))}
