"""Reading prepared token shards (see :mod:`minillm.data.prepare` for the layout).

``TokenShards(out_dir, "train")`` memory-maps ``train.bin`` read-only: ``tokens`` is the flat
stream (numpy uint16/uint32, not copied into memory), ``offsets`` the document boundaries.
A directory without a matching ``manifest.json`` (never prepared, or an interrupted prepare)
is refused with a message that says so; files whose size differs from the manifest too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from minillm.data.prepare import SPLITS


class TokenShards:
    """One split of a prepared directory.

    Attributes:
        tokens: flat token ids, ``np.memmap`` of shape (n_tokens,).
        offsets: int64 array (n_documents + 1,); document i is ``tokens[offsets[i]:offsets[i+1]]``.
        eos_id: the EOS appended after every document, or None when prepare did not append one.
        vocab_size: vocabulary size of the tokenizer that made the shards.
        tokenizer_path: the tokenizer copy stored beside the shards.
    """

    def __init__(self, out_dir: str | os.PathLike, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"TokenShards: split must be one of {SPLITS}, got {split!r}")
        self.out_dir = Path(out_dir)
        self.split = split
        manifest_path = self.out_dir / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"TokenShards: {manifest_path} not found: {self.out_dir} was never prepared or its "
                f"prepare was interrupted; run prepare() again"
            )
        self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        for name in (f"{split}.bin", f"{split}.idx.npy"):
            recorded = self.manifest["files"][name]["bytes"]
            actual = (self.out_dir / name).stat().st_size if (self.out_dir / name).is_file() else None
            if actual != recorded:
                raise ValueError(
                    f"TokenShards: {self.out_dir / name} has {actual} bytes, manifest.json records "
                    f"{recorded}; the directory is damaged, run prepare() again"
                )
        dtype = np.dtype(self.manifest["dtype"])
        n_tokens = self.manifest["splits"][split]["tokens"]
        if n_tokens:
            self.tokens = np.memmap(self.out_dir / f"{split}.bin", dtype=dtype, mode="r", shape=(n_tokens,))
        else:
            self.tokens = np.zeros(0, dtype=dtype)
        self.offsets = np.load(self.out_dir / f"{split}.idx.npy")
        self.eos_id = self.manifest["eos_id"]
        self.vocab_size = self.manifest["vocab_size"]
        self.tokenizer_path = self.out_dir / "tokenizer.model"

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        """Number of documents."""
        return len(self.offsets) - 1

    def document(self, i: int, with_eos: bool = False) -> np.ndarray:
        """Tokens of document ``i`` (a view), without its trailing EOS unless ``with_eos``."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"TokenShards({self.split}): document {i} out of range ({len(self)} documents)")
        i %= len(self)
        end = int(self.offsets[i + 1])
        if self.eos_id is not None and not with_eos:
            end -= 1
        return self.tokens[int(self.offsets[i]) : end]

    def __repr__(self) -> str:
        return f"TokenShards({str(self.out_dir)!r}, {self.split!r}: {len(self)} documents, {self.n_tokens} tokens)"
