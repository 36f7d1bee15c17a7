"""Causal language modelling batches: windows over the flat token stream.

Shape legend: B batch, T sequence length (``seq_len``).

Prepared shards are one stream of documents, each ending in EOS. A window is ``seq_len``
consecutive tokens of that stream; it packs across document boundaries (no padding, no
waste). Windows are

* ``mode="sequential"``: non-overlapping, in order, covering the stream once per epoch
  (validation), ``len = n_tokens // seq_len``;
* ``mode="random"``: a random start per sample, a pure function of ``(seed, index)``,
  ``len = samples`` (default ``n_tokens // seq_len``). There are no epochs to reseed: the
  caller sizes ``samples`` to cover the run, so no window index repeats within it.

Batch keys (:class:`CausalLMCollator`):

* ``input_ids`` (B, T) long
* ``attention_mask`` (B, T) long, all ones (windows are full)
* ``labels`` (B, T) long, **equal to input_ids**: the model shifts internally (position t
  predicts ``labels[t + 1]``), so a window of T tokens gives T - 1 predictions.

With ``document_mask=True`` two more keys describe the documents inside each window, for
document-aware attention (a token attends only to earlier tokens of its own document, and each
document gets the logits it would get alone):

* ``position_ids`` (B, T) long: restart at 0 at the first token of every document;
* ``document_ids`` (B, T) long: which document of its window a token belongs to, counting from
  0 in every row (a document starts after each EOS)::

      input_ids     a  b  EOS  c  d  e  EOS  f
      document_ids  0  0  0    1  1  1  1    2
      position_ids  0  1  2    0  1  2  3    0

``CausalLM.forward`` takes both keys (``document_ids`` builds the "causal and same document"
attention mask). ``labels`` are then -100 at the first token of every document: the token before
it belongs to another document, so nothing in view predicts it.
"""

from __future__ import annotations

import numpy as np
import torch

from minillm.data.collate import IGNORE_INDEX, to_tensors
from minillm.data.shards import TokenShards

MODES = ("random", "sequential")


class CausalLMDataset(torch.utils.data.Dataset):
    """Windows of ``seq_len`` tokens from one split of prepared shards (see module docstring)."""

    def __init__(
        self,
        shards: TokenShards,
        seq_len: int,
        mode: str = "random",
        seed: int = 0,
        samples: int | None = None,
        document_mask: bool = False,
    ):
        if mode not in MODES:
            raise ValueError(f"CausalLMDataset: mode must be one of {MODES}, got {mode!r}")
        if seq_len < 2:
            raise ValueError(f"CausalLMDataset: seq_len must be >= 2, got {seq_len}")
        if shards.n_tokens < seq_len:
            raise ValueError(
                f"CausalLMDataset: seq_len={seq_len} is longer than the {shards.split} split "
                f"({shards.n_tokens} tokens in {shards.out_dir})"
            )
        self.shards, self.seq_len, self.mode, self.seed = shards, seq_len, mode, seed
        self.document_mask = document_mask
        windows = shards.n_tokens // seq_len
        self.samples = samples if samples is not None else windows
        if mode == "sequential" and samples is not None and samples > windows:
            raise ValueError(f"CausalLMDataset: samples={samples} > {windows} sequential windows of seq_len={seq_len}")
        if self.samples < 1:
            raise ValueError(f"CausalLMDataset: samples must be >= 1, got {self.samples}")

    def __len__(self) -> int:
        return self.samples

    def start(self, index: int) -> int:
        """Stream position where window ``index`` begins."""
        if self.mode == "sequential":
            return index * self.seq_len
        high = self.shards.n_tokens - self.seq_len + 1
        return int(np.random.default_rng([self.seed, index]).integers(0, high))

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self.samples:
            raise IndexError(f"CausalLMDataset: index {index} out of range ({self.samples} samples)")
        s = self.start(index)
        tokens = np.asarray(self.shards.tokens[s : s + self.seq_len], dtype=np.int64)  # (T,)
        item = {"input_ids": tokens}
        if self.document_mask:
            offsets = self.shards.offsets
            # document starts strictly inside the window, relative to its first token
            lo, hi = np.searchsorted(offsets, [s, s + self.seq_len], side="right")
            starts = offsets[lo:hi] - s
            starts = starts[(starts > 0) & (starts < self.seq_len)]
            is_start = np.zeros(self.seq_len, dtype=np.int64)  # (T,)
            is_start[starts] = 1
            document = np.cumsum(is_start)  # (T,) 0 up to the first start, then 1, 2, ...
            first_token = np.concatenate([[0], starts])  # (documents,) where each one begins
            item["document_ids"] = document
            item["position_ids"] = np.arange(self.seq_len) - first_token[document]  # (T,)
        return item


class CausalLMCollator:
    """Stack causal windows into the batch dict described in the module docstring."""

    def __call__(self, samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        input_ids = np.stack([s["input_ids"] for s in samples])  # (B, T)
        batch = {
            "input_ids": input_ids,
            "attention_mask": np.ones_like(input_ids),
            "labels": input_ids.copy(),
        }
        if "document_ids" in samples[0]:
            batch["position_ids"] = np.stack([s["position_ids"] for s in samples])  # (B, T)
            batch["document_ids"] = np.stack([s["document_ids"] for s in samples])  # (B, T)
            # A document's first token is not predicted from the one before it, which belongs to
            # another document it cannot see: no label there (position 0 has none anyway).
            batch["labels"][batch["position_ids"] == 0] = IGNORE_INDEX
        return to_tensors(batch)
