"""Permutation language-modelling batches (XLNet): windows of the corpus, one factorisation order each.

Shape legend: B batch, T sequence length (``seq_len``), P predictions per sequence.

XLNet (Yang et al., 2019, section 2.3) samples an order z of the T positions and predicts only the
last P of it (partial prediction, P ~ T / K with K = 6 or 7): the first T - P tokens are the
context, seen in full by everybody; each of the P targets sees the context and the targets before
it in z, never itself or later ones. The input keeps its natural order; the order lives in masks:

* ``input_ids`` (B, T) long: a window of the prepared stream (as ``CausalLMDataset``'s);
* ``perm_mask`` (B, T, T) float: 1 where position i may not see position j, that is
  rank(j) >= max(rank(i), T - P), rank being the place in the order;
* ``target_mapping`` (B, P, T) float: one-hot, prediction p is for position z_{T-P+p};
* ``labels`` (B, P) long: the token at each predicted position.

The order of window ``index`` is a function of ``(seed, index)``, so validation batches are the same
at every evaluation and a resumed run sees the same orders.
"""

from __future__ import annotations

import numpy as np
import torch

from minillm.data.causal import CausalLMDataset
from minillm.data.collate import to_tensors


def permutation_masks(order: np.ndarray, num_predict: int) -> tuple[np.ndarray, np.ndarray]:
    """(perm_mask (B, T, T), target_mapping (B, P, T)), float32, for orders (B, T) predicting the last P."""
    B, T = order.shape
    if not 1 <= num_predict <= T:
        raise ValueError(f"num_predict: got {num_predict}, expected 1 <= num_predict <= T = {T}")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(T)[None].repeat(B, 0), axis=1)  # rank[b, order[b, t]] = t
    first_target = T - num_predict
    # A target sees what comes before it; the context sees the context (ranks below first_target).
    perm_mask = rank[:, None, :] >= np.maximum(rank[:, :, None], first_target)  # (B, T, T)
    target_mapping = np.zeros((B, num_predict, T), dtype=np.float32)
    rows = np.arange(B)[:, None]
    target_mapping[rows, np.arange(num_predict)[None], order[:, first_target:]] = 1.0
    return perm_mask.astype(np.float32), target_mapping


class PermutationLMDataset(torch.utils.data.Dataset):
    """Windows of a prepared split (see ``CausalLMDataset``), each with a random order of its positions."""

    def __init__(self, windows: CausalLMDataset, seed: int):
        self.windows, self.seed = windows, seed

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        item = self.windows[index]
        order = np.random.default_rng([self.seed, index, 1]).permutation(len(item["input_ids"]))  # (T,)
        return {"input_ids": item["input_ids"], "order": order}


class PermutationLMCollator:
    """Stack windows and build XLNet's masks for partial prediction of one in ``predict_one_in`` tokens."""

    def __init__(self, predict_one_in: int = 6):
        if predict_one_in < 1:
            raise ValueError(f"PermutationLMCollator: predict_one_in must be >= 1, got {predict_one_in}")
        self.predict_one_in = predict_one_in

    def __call__(self, samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        input_ids = np.stack([s["input_ids"] for s in samples])  # (B, T)
        order = np.stack([s["order"] for s in samples])  # (B, T)
        num_predict = max(1, round(input_ids.shape[1] / self.predict_one_in))  # P
        perm_mask, target_mapping = permutation_masks(order, num_predict)
        labels = np.take_along_axis(input_ids, order[:, -num_predict:], axis=1)  # (B, P)
        return to_tensors({"input_ids": input_ids, "perm_mask": perm_mask, "target_mapping": target_mapping,
                           "labels": labels})
