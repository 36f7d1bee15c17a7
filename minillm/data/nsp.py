"""Next sentence prediction pairs (BERT): ``[CLS] A [SEP] B [SEP]``.

Segments are whole paragraphs where the text has them, as BERT's were whole sentences. A
paragraph starts after a blank line (two newline pieces in a row; a tokenizer without a newline
piece has no paragraphs). Sampling, a pure function of ``(seed, index)`` (the caller sizes
``samples`` to cover a run, so no pair repeats within it):

1. pick a document with at least 2 tokens, and a span of it of up to ``max_len - 3`` tokens
   that starts at a paragraph start (one that is not the document's last, when it has several);
2. cut the span at a paragraph start inside it, chosen at random; a span with none (one long
   paragraph, or no paragraphs at all) is cut at a random token instead. A is the part before
   the cut;
3. with probability ``1 - random_probability`` B is the part after the cut (the true next
   segment, ``next_sentence_label = 0``); otherwise B is a span of the same length from a
   *different* document (``next_sentence_label = 1``), starting where the true B would: at a
   paragraph start after a paragraph cut, at a random token after a token cut, so where B
   starts never gives the label away. This is the label convention of the model's NSP head;
4. truncate longest-first so ``len(A) + len(B) + 3 <= max_len``; no pair is ever longer.

Why paragraphs: with random token cuts both kinds of B start mid-sentence, "does B continue A?"
rests on local syntax, and the tiny BERT of ``minillm pretrain --model bert`` ended its 1000
steps at 56.6% NSP accuracy. With whole paragraphs the question becomes whether B is about the
same thing as A, and the same run ends at 70.3% (validation pairs of the default corpus; 62.1%
in a one-thread run, whose float sums round differently).

Sample keys: ``input_ids``, ``token_type_ids`` (0 for ``[CLS] A [SEP]``, 1 for ``B [SEP]``) and
``next_sentence_label``. :class:`minillm.data.mlm.MLMCollator` pads, masks and passes the
labels through, which gives BERT's joint MLM + NSP batches; :class:`NSPCollator` pads without
masking.
"""

from __future__ import annotations

import numpy as np
import torch

from minillm.data.collate import pad_segment_pairs, pair_with_specials, to_tensors, truncate_longest_first
from minillm.data.shards import TokenShards
from minillm.tokenizer import Tokenizer


class NSPDataset(torch.utils.data.Dataset):
    """Sentence-pair samples (see module docstring); ``len`` is ``samples`` (default: documents)."""

    def __init__(
        self,
        shards: TokenShards,
        tokenizer: Tokenizer,
        max_len: int,
        random_probability: float = 0.5,
        seed: int = 0,
        samples: int | None = None,
    ):
        if max_len < 5:
            raise ValueError(f"NSPDataset: max_len must be >= 5 ([CLS] A [SEP] B [SEP]), got {max_len}")
        if not 0.0 < random_probability < 1.0:
            raise ValueError(f"NSPDataset: random_probability must be in (0, 1), got {random_probability}")
        self.shards, self.max_len, self.seed = shards, max_len, seed
        self.random_probability = random_probability
        self.cls_id, self.sep_id = tokenizer.require("cls"), tokenizer.require("sep")
        self.newline_id = tokenizer.newline_id
        lengths = np.diff(shards.offsets) - (1 if shards.eos_id is not None else 0)
        self.lengths = lengths
        self.eligible = np.flatnonzero(lengths >= 2)  # documents A can come from
        self.nonempty = np.flatnonzero(lengths >= 1)  # documents a random B can come from
        if len(self.eligible) == 0 or len(self.nonempty) < 2:
            raise ValueError(
                f"NSPDataset: the {shards.split} split of {shards.out_dir} needs at least 2 non-empty "
                f"documents, one with 2+ tokens (has {len(self.nonempty)} non-empty)"
            )
        self.samples = samples if samples is not None else len(self.eligible)

    def __len__(self) -> int:
        return self.samples

    def paragraph_starts(self, tokens: np.ndarray) -> np.ndarray:
        """Positions p > 0 that start a paragraph: tokens[p - 2 : p] are two newlines and tokens[p] is not."""
        if self.newline_id is None or len(tokens) < 3:
            return np.zeros(0, dtype=np.int64)
        is_newline = tokens == self.newline_id  # (n,)
        return np.flatnonzero(is_newline[:-2] & is_newline[1:-1] & ~is_newline[2:]) + 2

    def segment_starts(self, tokens: np.ndarray) -> np.ndarray:
        """Where a segment may begin: the document's start and its paragraph starts."""
        return np.concatenate([[0], self.paragraph_starts(tokens)])

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index])
        budget = self.max_len - 3  # room for A and B after [CLS], [SEP], [SEP]
        doc = int(self.eligible[rng.integers(len(self.eligible))])
        tokens = self.shards.document(doc)
        starts = self.segment_starts(tokens)
        first = starts[: max(1, len(starts) - 1)]  # not the last paragraph: nothing would follow it
        start = int(first[rng.integers(len(first))])
        width = max(2, min(len(tokens) - start, budget))
        start = min(start, len(tokens) - width)  # a 2-token span of a document's final 1-token paragraph
        span = tokens[start : start + width]
        inner = starts[(starts > start) & (starts < start + len(span))] - start  # paragraph cuts inside
        by_paragraph = len(inner) > 0
        cut = int(inner[rng.integers(len(inner))]) if by_paragraph else int(rng.integers(1, len(span)))
        a, b = span[:cut], span[cut:]
        label = int(rng.random() < self.random_probability)
        if label == 1:
            # a document other than `doc`: draw among the others by shifting past it
            k = int(rng.integers(len(self.nonempty) - 1))
            other = int(self.nonempty[k + (1 if self.nonempty[k] >= doc else 0)])
            other_tokens = self.shards.document(other)
            n = min(len(b), len(other_tokens))
            if by_paragraph:
                other_starts = self.segment_starts(other_tokens)
                other_starts = other_starts[other_starts <= len(other_tokens) - n]  # room for n tokens: 0 always is
                s = int(other_starts[rng.integers(len(other_starts))])
            else:
                s = int(rng.integers(0, len(other_tokens) - n + 1))
            b = other_tokens[s : s + n]
        a, b = truncate_longest_first(a.tolist(), b.tolist(), budget)
        ids, types = pair_with_specials(a, b, self.cls_id, self.sep_id)
        return {
            "input_ids": np.array(ids, dtype=np.int64),
            "token_type_ids": np.array(types, dtype=np.int64),
            "next_sentence_label": label,
        }


class NSPCollator:
    """Pad NSP samples without masking: input_ids, attention_mask, token_type_ids, next_sentence_label."""

    def __init__(self, tokenizer: Tokenizer, pad_to_multiple_of: int | None = None):
        self.pad_id = tokenizer.require("pad")
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        batch = pad_segment_pairs(samples, self.pad_id, self.pad_to_multiple_of)
        batch["next_sentence_label"] = np.array([s["next_sentence_label"] for s in samples], dtype=np.int64)
        return to_tensors(batch)
