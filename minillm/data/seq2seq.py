"""Encoder-decoder batches: T5 span corruption, and source/target pairs read from files.

Shape legend: B batch, S source (encoder) length, T target (decoder) length.

Span corruption (Raffel et al. 2020, "Exploring the Limits of Transfer Learning", §3.1.4):
``round(noise_density * L)`` tokens of a piece of L tokens are removed in
``round(noise / mean_span_length)`` spans. The input keeps the other tokens with the k-th span
replaced by sentinel k; the target lists sentinel k followed by span k, for every span::

    tokens : The cute dog walks in the park
    input  : The <s0> walks in <s1> park [EOS]
    target : <s0> cute dog <s1> the [EOS]

Sentinels are ``Tokenizer.sentinel_ids``: the control pieces ``<sentinel_0>`` ... reserved at
ids 7.. by ``Tokenizer.train`` (16 by default), ``<extra_id_k>`` of a T5 model, or, for other
foreign models, the top ids of the vocabulary. The number of spans is capped by the number of
sentinels.

Batch keys (:class:`Seq2SeqCollator`): ``input_ids`` (B, S) and ``attention_mask`` (B, S) for the
encoder; ``decoder_input_ids`` (B, T) = ``[BOS] target[:-1]`` (teacher forcing, BOS is the
decoder start token; padded with PAD); ``labels`` (B, T) = ``target`` (ending in EOS), -100 at
padding. The decoder input is already shifted here; the model does not shift seq2seq labels.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from minillm.data.collate import IGNORE_INDEX, pad_2d, to_tensors
from minillm.data.corpus import column_index, detect_format, read_json_records, read_table
from minillm.data.shards import TokenShards
from minillm.tokenizer import Tokenizer


def _random_partition(n: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """``parts`` positive integers summing to ``n`` (uniform over compositions)."""
    cuts = np.sort(rng.choice(np.arange(1, n), size=parts - 1, replace=False)) if parts > 1 else np.array([], int)
    return np.diff(np.concatenate([[0], cuts, [n]]))


def span_corruption(
    tokens: np.ndarray,
    sentinel_ids: list[int],
    rng: np.random.Generator,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(corrupted input, target) of ``tokens`` without EOS (see module docstring)."""
    L = len(tokens)
    if L < 2:
        raise ValueError(f"span_corruption: need at least 2 tokens, got {L}")
    noise = min(max(int(round(L * noise_density)), 1), L - 1)
    spans = min(max(int(round(noise / mean_span_length)), 1), noise, L - noise, len(sentinel_ids))
    noise_lengths = _random_partition(noise, spans, rng)
    keep_lengths = _random_partition(L - noise, spans, rng)
    inputs, targets = [], []
    pos = 0
    for k in range(spans):  # keep span k, then noise span k
        inputs.append(tokens[pos : pos + keep_lengths[k]])
        pos += keep_lengths[k]
        inputs.append([sentinel_ids[k]])
        targets.append([sentinel_ids[k]])
        targets.append(tokens[pos : pos + noise_lengths[k]])
        pos += noise_lengths[k]
    return np.concatenate(inputs).astype(np.int64), np.concatenate(targets).astype(np.int64)


class SpanCorruptionDataset(torch.utils.data.Dataset):
    """T5 pretraining samples from prepared shards: pieces of at most ``input_len - 1`` tokens
    of one document, corrupted; input and target end in EOS.

    The spans of sample ``index`` are a pure function of ``(seed, index)``: a run that passes over
    the data more than once sees each piece corrupted the same way every time."""

    def __init__(
        self,
        shards: TokenShards,
        tokenizer: Tokenizer,
        input_len: int,
        noise_density: float = 0.15,
        mean_span_length: float = 3.0,
        seed: int = 0,
    ):
        if input_len < 4:
            raise ValueError(f"SpanCorruptionDataset: input_len must be >= 4, got {input_len}")
        if not 0.0 < noise_density < 1.0:
            raise ValueError(f"SpanCorruptionDataset: noise_density must be in (0, 1), got {noise_density}")
        if mean_span_length < 1.0:
            raise ValueError(f"SpanCorruptionDataset: mean_span_length must be >= 1, got {mean_span_length}")
        self.shards, self.seed = shards, seed
        self.noise_density, self.mean_span_length = noise_density, mean_span_length
        self.eos_id = tokenizer.require("eos")
        self.sentinel_ids = tokenizer.sentinel_ids
        width = input_len - 1  # corrupted input is never longer than its piece; +1 for EOS
        lengths = np.diff(shards.offsets) - (1 if shards.eos_id is not None else 0)
        pieces = np.where(lengths >= 2, -(-lengths // width), 0)
        self.doc = np.repeat(np.arange(len(lengths)), pieces)
        first = np.repeat(np.cumsum(pieces) - pieces, pieces)
        self.begin = (np.arange(len(self.doc)) - first) * width
        self.width = width
        if len(self.doc) == 0:
            raise ValueError(f"SpanCorruptionDataset: the {shards.split} split of {shards.out_dir} has no document of 2+ tokens")

    def __len__(self) -> int:
        return len(self.doc)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        doc = self.shards.document(int(self.doc[index]))
        begin = int(self.begin[index])
        piece = np.asarray(doc[begin : begin + self.width], dtype=np.int64)
        if len(piece) < 2:  # a last piece of 1 token: take the two tokens before it as well
            piece = np.asarray(doc[max(0, begin - 2) : begin + 1], dtype=np.int64)
        rng = np.random.default_rng([self.seed, index])
        source, target = span_corruption(piece, self.sentinel_ids, rng, self.noise_density, self.mean_span_length)
        return {"input_ids": np.append(source, self.eos_id), "target_ids": np.append(target, self.eos_id)}


def read_seq2seq_pairs(
    path: str | os.PathLike, source_field: str = "source", target_field: str = "target", errors: str = "strict"
) -> list[tuple[str, str]]:
    """(source, target) pairs from a CSV/TSV (header row) or JSONL file."""
    path = Path(path)
    if detect_format(path) == "jsonl":
        fields = (source_field, target_field)
        pairs = [(str(r[source_field]), str(r[target_field])) for _, r in read_json_records(path, fields, errors)]
    else:
        header, rows = read_table(path, errors=errors)
        s, t = column_index(header, source_field, path), column_index(header, target_field, path)
        pairs = []
        for number, row in enumerate(rows, start=2):
            if max(s, t) >= len(row):
                raise ValueError(f"{path}:{number}: row has {len(row)} columns, expected {len(header)}")
            pairs.append((row[s], row[t]))
    if not pairs:
        raise ValueError(f"{path}: no (source, target) pair")
    return pairs


class Seq2SeqPairDataset(torch.utils.data.Dataset):
    """Tokenised (source, target) pairs, each truncated to its length and ended with EOS."""

    def __init__(self, pairs: list[tuple[str, str]], tokenizer: Tokenizer, max_source_len: int, max_target_len: int):
        if max_source_len < 2 or max_target_len < 2:
            raise ValueError(
                f"Seq2SeqPairDataset: max_source_len and max_target_len must be >= 2, got "
                f"{max_source_len} and {max_target_len}"
            )
        eos = tokenizer.require("eos")
        sources = tokenizer.encode_batch([s for s, _ in pairs])
        targets = tokenizer.encode_batch([t for _, t in pairs])
        self.items = [
            {"input_ids": np.array(s[: max_source_len - 1] + [eos]), "target_ids": np.array(t[: max_target_len - 1] + [eos])}
            for s, t in zip(sources, targets)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.items[index]


class Seq2SeqCollator:
    """Pad encoder inputs and build teacher-forced decoder inputs (see module docstring)."""

    def __init__(self, tokenizer: Tokenizer, pad_to_multiple_of: int | None = None):
        self.pad_id, self.bos_id = tokenizer.require("pad"), tokenizer.require("bos")
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        m = self.pad_to_multiple_of
        input_ids = pad_2d([s["input_ids"] for s in samples], self.pad_id, m)  # (B, S)
        source_len = np.array([len(s["input_ids"]) for s in samples])
        targets = [np.asarray(s["target_ids"]) for s in samples]
        labels = pad_2d(targets, IGNORE_INDEX, m)  # (B, T)
        decoder_input_ids = pad_2d([np.concatenate([[self.bos_id], t[:-1]]) for t in targets], self.pad_id, m)
        return to_tensors({
            "input_ids": input_ids,
            "attention_mask": (np.arange(input_ids.shape[1])[None, :] < source_len[:, None]).astype(np.int64),
            "decoder_input_ids": decoder_input_ids,
            "labels": labels,
        })
