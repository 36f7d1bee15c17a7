"""Masked language modelling batches (BERT): ``[CLS] tokens [SEP]`` with 15% of tokens hidden.

Shape legend: B batch, T sequence length.

Sequences (:class:`MLMDataset`): every document of a split is cut into pieces of at most
``seq_len - 2`` tokens, each wrapped as ``[CLS] piece [SEP]``. Documents are not packed
together, so every sequence is one document (shorter ones are padded by the collator).

Masking (:class:`MLMCollator`), per batch:

1. Candidates are all tokens except special ones (``Tokenizer.special``: PAD, UNK, CLS, SEP,
   MASK, BOS, EOS, sentinels, any control piece); those are never chosen.
2. Units are tokens, or with ``whole_word_mask=True`` whole words: a word starts at a piece
   with sentencepiece's ``"▁"`` marker (``Tokenizer.word_start``) or after a stand-alone
   piece, so it works with any sentencepiece vocabulary. Each unit is chosen independently
   with probability ``mlm_probability``, so the expected fraction of masked candidates is
   exactly ``mlm_probability`` in both modes (words are masked whole, never in part).
3. Each chosen token becomes ``[MASK]`` with probability ``mask_ratio`` (0.8), a uniformly
   random non-special token with ``random_ratio`` (0.1), and stays itself otherwise (0.1).

Batch keys: ``input_ids`` (B, T) long (after masking), ``attention_mask`` (B, T) long,
``token_type_ids`` (B, T) long (zeros, or the sample's own when it has them),
``labels`` (B, T) long: the original token at chosen positions, -100 elsewhere.
The collator also accepts samples from :class:`minillm.data.nsp.NSPDataset` and then passes
``token_type_ids`` and ``next_sentence_label`` through (BERT's MLM + NSP pretraining).
"""

from __future__ import annotations

import numpy as np
import torch

from minillm.data.collate import IGNORE_INDEX, WorkerRandom, pad_2d, to_tensors
from minillm.data.shards import TokenShards
from minillm.tokenizer import Tokenizer


class MLMDataset(torch.utils.data.Dataset):
    """``[CLS] piece [SEP]`` sequences, pieces of at most ``seq_len - 2`` tokens of one document."""

    def __init__(self, shards: TokenShards, tokenizer: Tokenizer, seq_len: int):
        if seq_len < 3:
            raise ValueError(f"MLMDataset: seq_len must be >= 3 ([CLS] token [SEP]), got {seq_len}")
        self.shards, self.seq_len = shards, seq_len
        self.cls_id, self.sep_id = tokenizer.require("cls"), tokenizer.require("sep")
        width = seq_len - 2
        lengths = np.diff(shards.offsets) - (1 if shards.eos_id is not None else 0)  # (n_docs,) content tokens
        pieces = -(-lengths // width)  # ceil; empty documents give no piece
        self.doc = np.repeat(np.arange(len(lengths)), pieces)
        first = np.repeat(np.cumsum(pieces) - pieces, pieces)
        self.begin = (np.arange(len(self.doc)) - first) * width  # offset inside the document
        if len(self.doc) == 0:
            raise ValueError(f"MLMDataset: the {shards.split} split of {shards.out_dir} has no tokens")

    def __len__(self) -> int:
        return len(self.doc)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        doc = self.shards.document(int(self.doc[index]))
        begin = int(self.begin[index])
        piece = np.asarray(doc[begin : begin + self.seq_len - 2], dtype=np.int64)
        return {"input_ids": np.concatenate([[self.cls_id], piece, [self.sep_id]])}


class MLMCollator:
    """Pad and mask a list of samples (see module docstring).

    Args:
        tokenizer: gives ``special``, ``word_start``, ``standalone``, PAD and MASK ids.
        mlm_probability: expected fraction of candidate tokens chosen (0.15 in BERT).
        whole_word_mask: choose whole words instead of single tokens.
        mask_ratio / random_ratio: of the chosen tokens, the share replaced by [MASK] / by a
            random token; the rest (1 - both) keep their value.
        seed: seed of the per-worker random generator.
        pad_to_multiple_of: round T up to a multiple of this.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        mlm_probability: float = 0.15,
        whole_word_mask: bool = False,
        mask_ratio: float = 0.8,
        random_ratio: float = 0.1,
        seed: int = 0,
        pad_to_multiple_of: int | None = None,
    ):
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"MLMCollator: mlm_probability must be in (0, 1), got {mlm_probability}")
        if mask_ratio < 0 or random_ratio < 0 or mask_ratio + random_ratio > 1:
            raise ValueError(
                f"MLMCollator: mask_ratio ({mask_ratio}) and random_ratio ({random_ratio}) must be >= 0 "
                f"and sum to at most 1"
            )
        self.pad_id, self.mask_id = tokenizer.require("pad"), tokenizer.require("mask")
        self.mlm_probability, self.whole_word_mask = mlm_probability, whole_word_mask
        self.mask_ratio, self.random_ratio = mask_ratio, random_ratio
        self.special = tokenizer.special.copy()
        self.special[self.pad_id] = True
        self.word_start = tokenizer.word_start
        self.standalone = tokenizer.standalone
        self.random_pool = np.flatnonzero(~self.special)  # ids a random replacement may take
        self.pad_to_multiple_of = pad_to_multiple_of
        self.rng = WorkerRandom(seed)

    def choose(self, input_ids: np.ndarray, length: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Boolean (B, T) array of the positions to predict."""
        B, T = input_ids.shape
        inside = np.arange(T)[None, :] < length[:, None]  # (B, T) real tokens
        candidate = inside & ~self.special[input_ids]
        if not self.whole_word_mask:
            return candidate & (rng.random((B, T)) < self.mlm_probability)
        # A unit (word) starts at a "▁" piece, after a stand-alone or non-candidate token, or
        # at the start of a row. Number units over the flattened batch with a cumulative sum.
        starts = self.word_start[input_ids] | ~candidate
        starts[:, 1:] |= self.standalone[input_ids[:, :-1]] | ~candidate[:, :-1]
        starts[:, 0] = True
        unit = np.cumsum(starts.reshape(-1)) - 1  # (B*T,) unit index of every token
        chosen_unit = rng.random(int(unit[-1]) + 1) < self.mlm_probability
        return candidate & chosen_unit[unit].reshape(B, T)

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        rng = self.rng()
        rows = [np.asarray(s["input_ids"], dtype=np.int64) for s in samples]
        input_ids = pad_2d(rows, self.pad_id, self.pad_to_multiple_of)  # (B, T)
        length = np.array([len(r) for r in rows])
        B, T = input_ids.shape
        attention_mask = (np.arange(T)[None, :] < length[:, None]).astype(np.int64)
        if "token_type_ids" in samples[0]:
            token_type_ids = pad_2d([s["token_type_ids"] for s in samples], 0, self.pad_to_multiple_of)
        else:
            token_type_ids = np.zeros_like(input_ids)

        chosen = self.choose(input_ids, length, rng)
        labels = np.where(chosen, input_ids, IGNORE_INDEX)
        action = rng.random((B, T))
        to_mask = chosen & (action < self.mask_ratio)
        to_random = chosen & (action >= self.mask_ratio) & (action < self.mask_ratio + self.random_ratio)
        masked = input_ids.copy()
        masked[to_mask] = self.mask_id
        masked[to_random] = rng.choice(self.random_pool, size=int(to_random.sum()))
        batch = {
            "input_ids": masked,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "labels": labels,
        }
        if "next_sentence_label" in samples[0]:
            batch["next_sentence_label"] = np.array([s["next_sentence_label"] for s in samples], dtype=np.int64)
        return to_tensors(batch)
