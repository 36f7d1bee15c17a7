"""Helpers every collator shares: padding ragged sequences and per-worker random generators.

Batches are dicts of ``torch.long`` tensors. Padding is on the right with ``PAD_ID``;
``attention_mask`` is 1 for real tokens and 0 for padding; ignored label positions hold
``IGNORE_INDEX = -100`` (what ``torch.nn.functional.cross_entropy`` skips).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

IGNORE_INDEX = -100


def pad_2d(rows: Sequence[Sequence[int] | np.ndarray], value: int, multiple_of: int | None = None) -> np.ndarray:
    """Stack ragged rows into an int64 (B, T) array padded on the right with ``value``.

    T is the longest row, rounded up to ``multiple_of`` when given (tensor-core friendly).
    """
    if not len(rows):
        raise ValueError("pad_2d: empty batch")
    T = max(len(r) for r in rows)
    if multiple_of:
        T = -(-T // multiple_of) * multiple_of
    out = np.full((len(rows), T), value, dtype=np.int64)  # (B, T)
    for b, row in enumerate(rows):
        out[b, : len(row)] = row
    return out


def pad_segment_pairs(samples: Sequence[dict], pad_id: int, multiple_of: int | None = None) -> dict[str, np.ndarray]:
    """Pad `[CLS] A [SEP] B [SEP]` samples: input_ids, attention_mask (1 = token) and token_type_ids, (B, T) each."""
    input_ids = pad_2d([s["input_ids"] for s in samples], pad_id, multiple_of)  # (B, T)
    lengths = np.array([len(s["input_ids"]) for s in samples])  # (B,)
    return {
        "input_ids": input_ids,
        "attention_mask": (np.arange(input_ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64),
        "token_type_ids": pad_2d([s["token_type_ids"] for s in samples], 0, multiple_of),
    }


def to_tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """numpy arrays to torch tensors, dtypes kept (int64 stays long)."""
    return {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in arrays.items()}


class WorkerRandom:
    """A numpy Generator that is different in every DataLoader worker and process.

    A collator created once and copied into several DataLoader workers would otherwise draw
    the same masks in every worker. The generator is seeded from ``(seed, worker id, pid
    generation)`` the first time it is used in each process.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self._pid: int | None = None
        self._rng: np.random.Generator | None = None

    def __call__(self) -> np.random.Generator:
        if self._rng is None or self._pid != os.getpid():
            info = torch.utils.data.get_worker_info()
            worker = info.id if info is not None else -1
            self._rng = np.random.default_rng([self.seed, worker + 1])
            self._pid = os.getpid()
        return self._rng

    def __getstate__(self) -> dict:
        return {"seed": self.seed, "_pid": None, "_rng": None}


def truncate_longest_first(a: list[int] | np.ndarray, b: list[int] | np.ndarray, max_tokens: int) -> tuple:
    """Drop tokens from the end of the longer of ``a`` and ``b`` until both fit in ``max_tokens``.

    Ties take from ``b``. ``a`` keeps at least one token when ``max_tokens >= 1``.
    """
    a, b = list(a), list(b)
    if max_tokens < 1:
        raise ValueError(f"truncate_longest_first: max_tokens must be >= 1, got {max_tokens}")
    excess = len(a) + len(b) - max_tokens
    while excess > 0:
        if len(a) > len(b):
            a.pop()
        else:
            b.pop()
        excess -= 1
    return a, b


def pair_with_ends(a: Sequence[int], b: Sequence[int] | None, end_id: int) -> tuple[list[int], list[int]]:
    """``a [EOS]`` (+ ``b [EOS]``) and its token type ids: GPT-2's framing, for a tokenizer without
    [CLS]/[SEP]."""
    ids, types = [*a, end_id], [0] * (len(a) + 1)
    if b is not None:
        ids += [*b, end_id]
        types += [1] * (len(b) + 1)
    return ids, types


def pair_with_specials(a: Sequence[int], b: Sequence[int] | None, cls_id: int, sep_id: int) -> tuple[list[int], list[int]]:
    """``[CLS] a [SEP]`` (+ ``b [SEP]``) and its token type ids (0 for the first part, 1 for b)."""
    ids = [cls_id, *a, sep_id]
    types = [0] * len(ids)
    if b is not None:
        ids += [*b, sep_id]
        types += [1] * (len(b) + 1)
    return ids, types
