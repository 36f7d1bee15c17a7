"""Causal language modelling batches: windows over the flat token stream.

Shape legend: B batch, T sequence length (``seq_len``), N documents (segments) in a batch.

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

With ``document_mask=True`` two more keys describe the document boundaries inside windows, for
document-aware attention (a token attends only within its own document):

* ``position_ids`` (B, T) long: restart at 0 at the first token of every document;
* ``cu_seqlens`` (N + 1,) int32: cumulative segment lengths over the flattened (B*T) batch,
  the varlen layout of FlashAttention (segment k is ``flat[cu_seqlens[k]:cu_seqlens[k+1]]``;
  a window's rows never share a segment).

The model itself does not take ``cu_seqlens``; a trainer that does not use document masking
drops both keys (or leaves ``document_mask`` off).
"""

from __future__ import annotations

import numpy as np
import torch

from minillm.data.collate import to_tensors
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
            bounds = np.concatenate([[0], starts, [self.seq_len]])
            item["segment_lengths"] = np.diff(bounds)
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
        if "segment_lengths" in samples[0]:
            B, T = input_ids.shape
            lengths = np.concatenate([s["segment_lengths"] for s in samples])  # (N,)
            cu = np.zeros(len(lengths) + 1, dtype=np.int32)
            np.cumsum(lengths, out=cu[1:])
            # position within its segment: global index minus the start of its segment
            seg_of = np.repeat(np.arange(len(lengths)), lengths)  # (B*T,)
            position_ids = (np.arange(B * T) - cu[:-1][seg_of]).reshape(B, T)  # (B, T)
            batch["position_ids"] = position_ids.astype(np.int64)
            batch["cu_seqlens"] = cu
        return to_tensors(batch)
