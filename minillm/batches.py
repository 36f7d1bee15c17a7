"""Micro-batches for the trainer, each a pure function of (seed, index).

A map-style ``Dataset`` is sampled here. Micro-batch m (counted over the whole run) holds the
samples ``perm_e[j G + rank B : j G + (rank + 1) B]`` of epoch e's permutation ``perm_e``
(seeded by ``(seed, e)``), with ``G = B * world`` and ``m = e * (N // G) + j``; a collator that
draws random numbers through ``collate_fn.rng()`` (MLM masking) gets a generator seeded by
``(seed, rank, m)``. Every batch is therefore a pure function of (seed, m): resuming at step k
reproduces the same batches bit for bit, with any number of DataLoader workers, and the ranks of
a DDP run together see exactly the global batch that one process with batch size G would see.

Any other iterable of ready batch dicts (a DataLoader you built) is cycled: global batch i goes
to rank ``i % world``, and resuming skips the batches already consumed, which reproduces the run
only if iterating it again yields the same batches.
"""

from __future__ import annotations

import numpy as np
import torch


class _Indexed(torch.utils.data.Dataset):
    """Dataset view taking (micro-batch index, sample index) keys, so the collator knows m."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        m, index = key
        return m, self.dataset[index]


class _SeededCollate:
    """Collate with randomness drawn from a generator seeded by (seed, rank, m, stream)."""

    def __init__(self, collate_fn, seed: int, rank: int, stream: int):
        self.collate_fn = collate_fn or torch.utils.data.default_collate
        self.seed, self.rank, self.stream = seed, rank, stream

    def __call__(self, items: list):
        m, samples = items[0][0], [sample for _, sample in items]
        rng = getattr(self.collate_fn, "rng", None)
        if not callable(rng):
            return self.collate_fn(samples)
        generator = np.random.default_rng([self.seed, self.rank, m, self.stream])
        self.collate_fn.rng = lambda: generator
        try:
            return self.collate_fn(samples)
        finally:
            self.collate_fn.rng = rng


class _TrainSampler(torch.utils.data.Sampler):
    """Yields micro-batches [(m, index), ...] from micro-batch `start` on, forever (module docstring)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int, start: int):
        self.n, self.batch_size, self.seed, self.rank, self.world, self.start = n, batch_size, seed, rank, world, start
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch == 0:
            raise ValueError(
                f"train_data: {n} samples cannot fill one global micro-batch of batch_size * world = {batch_size * world}"
            )

    def __iter__(self):
        m, epoch, perm = self.start, None, None
        G = self.batch_size * self.world
        while True:
            e, j = divmod(m, self.per_epoch)
            if e != epoch:
                epoch, perm = e, np.random.default_rng([self.seed, e]).permutation(self.n)
            lo = j * G + self.rank * self.batch_size
            yield [(m, int(i)) for i in perm[lo : lo + self.batch_size]]
            m += 1


class _EvalSampler(torch.utils.data.Sampler):
    """This rank's share (rank, rank + world, ...) of the eval set, in order, in batches."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int):
        self.indices = list(range(rank, n, world))
        self.batch_size = batch_size

    def __iter__(self):
        for m, lo in enumerate(range(0, len(self.indices), self.batch_size)):
            yield [(m, i) for i in self.indices[lo : lo + self.batch_size]]

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)


def is_map_dataset(data) -> bool:
    """A Dataset to sample (True), or an iterable of ready batches (False)."""
    if isinstance(data, torch.utils.data.IterableDataset):
        raise TypeError("train_data/eval_data: an IterableDataset yields samples; wrap it in a DataLoader of batches")
    return isinstance(data, torch.utils.data.Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")
                                                           and not isinstance(data, (list, tuple)))


def _cycle(iterable, skip: int, rank: int, world: int):
    """Global batches of a re-iterable, forever: batch i goes to rank i % world; the first `skip` are dropped."""
    i = 0
    while True:
        empty = True
        for batch in iterable:
            empty = False
            if i >= skip and i % world == rank:
                yield batch
            i += 1
        if empty:
            raise ValueError("train_data: the iterable yielded no batches")


def train_batches(data, collate_fn, *, batch_size: int, seed: int, rank: int, world: int, start: int,
                  num_workers: int = 0, pin_memory: bool = False):
    """This rank's training micro-batches from micro-batch ``start`` on, forever."""
    if is_map_dataset(data):
        loader = torch.utils.data.DataLoader(
            _Indexed(data), batch_sampler=_TrainSampler(len(data), batch_size, seed, rank, world, start),
            num_workers=num_workers, collate_fn=_SeededCollate(collate_fn, seed, rank, stream=0),
            pin_memory=pin_memory, generator=torch.Generator(),  # never the global RNG
        )
        return iter(loader)
    return _cycle(data, start * world, rank, world)


def eval_batches(data, collate_fn, *, batch_size: int, seed: int, rank: int, world: int, num_workers: int = 0,
                 pin_memory: bool = False):
    """This rank's share of an evaluation set, in order, once."""
    if is_map_dataset(data):
        loader = torch.utils.data.DataLoader(
            _Indexed(data), batch_sampler=_EvalSampler(len(data), batch_size, rank, world),
            num_workers=num_workers, collate_fn=_SeededCollate(collate_fn, seed, rank, stream=1),
            pin_memory=pin_memory, generator=torch.Generator(),
        )
        return iter(loader)
    return (batch for i, batch in enumerate(data) if i % world == rank)


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch's tensors on ``device`` (asynchronously from pinned memory)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
