"""The training loop: fetch, schedule, accumulate, step, evaluate, checkpoint.

    trainer = Trainer(model, TrainConfig(task="causal-lm", out_dir="runs/gpt"), train_set, val_set,
                      collate_fn=CausalLMCollator(), tokenizer=tokenizer)
    summary = trainer.fit()        # {"steps", "tokens_per_s", "best_metric", "final": {...}, ...}

Data. `train_data` and `eval_data` are either

* a map-style ``torch.utils.data.Dataset`` (with ``collate_fn``): the trainer samples it itself.
  Micro-batch m (counted over the whole run) holds the samples
  ``perm_e[j G + rank B : j G + (rank + 1) B]`` of epoch e's permutation ``perm_e`` (seeded by
  ``(seed, e)``), with ``G = B * world`` and ``m = e * (N // G) + j``; a collator that draws random
  numbers through ``collate_fn.rng()`` (MLM masking) gets a generator seeded by ``(seed, rank, m)``.
  Every batch is therefore a pure function of (seed, m): resuming at step k reproduces the same
  batches bit for bit, with any number of DataLoader workers, and ranks of a DDP run together
  see exactly the global batch a single process with batch_size G would see. Or
* any other iterable of ready batch dicts (a DataLoader you built): it is cycled; global batch i
  goes to rank ``i % world``; resuming skips the batches already consumed, which reproduces the
  run only if iterating it again yields the same batches.

Loss normalisation. Models return summed losses (``loss_reduction="sum"``); before the backward
passes of a step the trainer counts the target tokens of *all* its micro-batches (all-reduced
over ranks), and each micro-batch contributes ``sum / total``. So 4 micro-batches give exactly the
gradient of one 4x batch, however the targets are spread among them. MLM + NSP keeps two terms,
``mlm_sum / n_masked + nsp_sum / n_pairs``, matching the two means of the model's default loss.
DDP averages gradients over ranks, so each rank scales its loss by the world size.

Hooks. ``hooks={"on_step_end": fn, "on_eval_end": fn, "on_checkpoint": fn}``; each is called as
``fn(trainer, info)`` (info: the step's metrics dict, or the checkpoint path; on_checkpoint runs
on rank 0 only) and may set ``trainer.should_stop = True``.

Run directory. ``out_dir`` gets checkpoints, ``metrics.jsonl``/``.csv`` and ``metrics.png`` (see
:mod:`minillm.checkpoint`). An out_dir that already holds a run is an error unless
``resume=True`` (continue exactly where it stopped) or ``overwrite=True`` (start afresh). A
non-finite loss or gradient stops training with a FloatingPointError naming the last good
checkpoint; no checkpoint is ever written from non-finite weights.

DDP. Launched by torchrun (``WORLD_SIZE`` > 1 in the environment) the trainer initialises the
process group (NCCL on GPU, gloo on CPU), wraps the model in DistributedDataParallel and shards
the data by rank; only rank 0 writes logs and checkpoints. The caller may destroy the process
group at the end (``torch.distributed.destroy_process_group()``).

Not supported: FSDP/tensor parallelism, IterableDataset of samples (wrap it in a DataLoader).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from minillm import checkpoint as ckpt
from minillm.lora import apply_finetune_mode
from minillm.metrics import IGNORE_INDEX, MetricsLog, classification_metrics, confusion_matrix, perplexity, plot_metrics
from minillm.optim import apply_lr, build_optimizer
from minillm.train_config import TrainConfig, lower_is_better

HOOKS = ("on_step_end", "on_eval_end", "on_checkpoint")

# Dense bf16/fp16 tensor-core peak FLOP/s by GPU name (vendor data sheets); MFU is measured
# against it (Chowdhery et al., 2022). Longer names first: "H100 PCIe" before "H100".
PEAK_FLOPS = {
    "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12,
    "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12, "V100": 125e12, "T4": 65e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12,
}


def peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of a CUDA device by name, None on CPU or an unknown GPU (then no MFU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_FLOPS[key]
    return None


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices); call before building the model."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# =============================================================================================
# Losses and metrics per task: what is summed, and over how many targets
# =============================================================================================


def target_counts(task: str, batch: dict) -> dict[str, torch.Tensor]:
    """Number of targets of each loss term in a batch (the denominators of the mean loss)."""
    labels = batch["labels"]
    if task == "causal-lm":
        return {"lm": (labels[:, 1:] != IGNORE_INDEX).sum()}  # position t predicts t + 1
    if task == "classification" and labels.is_floating_point():  # regression
        return {"lm": torch.tensor(labels.numel(), device=labels.device)}
    counts = {"lm": (labels != IGNORE_INDEX).sum()}
    if task == "mlm-nsp":
        counts["nsp"] = (batch["next_sentence_label"] != IGNORE_INDEX).sum()
    return counts


def forward_sums(model, task: str, batch: dict):
    """(model output, {term: summed loss}) for one batch."""
    # MLM: logits (N, V) of the masked positions only; the head skips the others
    options = {"masked_logits_only": True} if task in ("mlm", "mlm-nsp") else {}
    if task == "mlm-nsp":  # two terms with their own denominators: NSP is summed here
        inputs = {k: v for k, v in batch.items() if k != "next_sentence_label"}
        out = model(**inputs, loss_reduction="sum", **options)
        nsp = F.cross_entropy(out.nsp_logits.float(), batch["next_sentence_label"], ignore_index=IGNORE_INDEX, reduction="sum")
        return out, {"lm": out.loss, "nsp": nsp}
    out = model(**batch, loss_reduction="sum", **options)
    return out, {"lm": out.loss}


def batch_tokens(task: str, batch: dict) -> int:
    """Token positions the model processes for a batch (encoder + decoder for seq2seq)."""
    n = batch["input_ids"].numel()
    if task == "seq2seq":
        n += batch["labels"].numel()
    return n


# =============================================================================================
# Data: micro-batches as a pure function of (seed, index)
# =============================================================================================


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


def _is_map_dataset(data) -> bool:
    if isinstance(data, torch.utils.data.IterableDataset):
        raise TypeError("train_data/eval_data: an IterableDataset yields samples; wrap it in a DataLoader of batches")
    return isinstance(data, torch.utils.data.Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")
                                                           and not isinstance(data, (list, tuple)))


def _cycle_batches(iterable, skip: int, rank: int, world: int):
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


# =============================================================================================
# The trainer
# =============================================================================================


class Trainer:
    """Fit a minillm model (see the module docstring for data, losses, hooks and DDP).

    Args:
        model: a minillm task model (`build_model`), on any device; the trainer moves it.
        config: the TrainConfig.
        train_data / eval_data: map-style Datasets (with collate_fn) or iterables of batch dicts.
        collate_fn: turns a list of samples into a batch dict (Dataset inputs only).
        configs_to_save: extra configs for config.json (e.g. {"data": data_config}); "task",
            "model" and "train" are always saved.
        tokenizer: saved beside every checkpoint; its vocabulary must match the model's.
        hooks: {"on_step_end" | "on_eval_end" | "on_checkpoint": fn(trainer, info)}.
    """

    def __init__(self, model, config: TrainConfig, train_data, eval_data=None, *, collate_fn=None,
                 configs_to_save: dict | None = None, tokenizer=None, hooks: dict | None = None):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
        unknown = sorted(set(hooks or {}) - set(HOOKS))
        if unknown:
            raise ValueError(f"hooks: unknown hook name(s) {unknown}; available hooks are {HOOKS}")
        self.config, self.hooks, self.tokenizer = config, dict(hooks or {}), tokenizer
        self.out_dir = Path(config.out_dir)
        self.rank, self.world, local_rank = _setup_distributed(config.device)
        self.is_main = self.rank == 0
        self.device = _pick_device(config.device, local_rank)
        self.dtype = _pick_dtype(config.precision, self.device)
        ckpt.check_vocab(model.config, tokenizer, "Trainer")
        self.configs = {**(configs_to_save or {}), "task": config.task, "model": model.config, "train": config}

        resume_from = self._check_out_dir()
        if not resume_from:
            seed_everything(config.seed + self.rank)
        if config.init_from is not None and not resume_from:
            ckpt.init_from(model, config.init_from, tokenizer)
        self.trainable = apply_finetune_mode(model, config)
        self.raw_model = model.to(self.device)
        if resume_from:
            ckpt.load_weights(self.raw_model, resume_from)
        self.optimizer = build_optimizer(self.raw_model, config)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

        self.step, self.micro_batches, self.tokens_seen = 0, 0, 0
        self.best_value, self.best_step, self.evals_since_best = None, None, 0
        self.should_stop, self.last_eval, self.last_saved_step = False, None, None
        if resume_from:
            self._load_state(resume_from)

        self.model = self.raw_model
        if config.compile:
            self.model = torch.compile(self.model)
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.model, device_ids=ids)
        self.train_data, self.eval_data, self.collate_fn = train_data, eval_data, collate_fn
        self.log = MetricsLog(self.out_dir, enabled=self.is_main, resume_step=self.step if resume_from else None)
        self.peak, self._flops_per_token = peak_flops(self.device), {}

    # ------------------------------------------------------------------ setup helpers

    def _check_out_dir(self) -> Path | None:
        """Rank 0 prepares out_dir (checkpoint.prepare_run_dir); every rank gets the checkpoint to
        resume from, or rank 0's error."""
        outcome = None
        if self.is_main:
            try:
                outcome = ckpt.prepare_run_dir(self.out_dir, resume=self.config.resume, overwrite=self.config.overwrite)
            except Exception as err:
                if self.world == 1:
                    raise
                outcome = err
        if self.world > 1:
            shared = [outcome]
            dist.broadcast_object_list(shared, src=0)  # also the barrier: no rank looks at out_dir before rank 0 is done
            outcome = shared[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _load_state(self, checkpoint: Path) -> None:
        state = ckpt.load_state(checkpoint)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.micro_batches, self.tokens_seen = state["step"], state["data"]["micro_batches"], state["tokens_seen"]
        self.best_value, self.best_step = state["best_value"], state["best_step"]
        self.evals_since_best = state["evals_since_best"]
        self.last_saved_step = self.step
        saved = state["data"]
        if saved["world"] != self.world or saved["batch_size"] != self.config.batch_size:
            warnings.warn(
                f"resume: the run was saved with world={saved['world']}, batch_size={saved['batch_size']}; "
                f"now world={self.world}, batch_size={self.config.batch_size}: batches will differ from an uninterrupted run"
            )
        rngs = state["rng"]
        if len(rngs) == self.world:
            ckpt.set_rng_state(rngs[self.rank])
        else:
            seed_everything(self.config.seed + self.rank + self.step)

    def _state(self) -> dict:
        rng = ckpt.rng_state()
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        return {
            "step": self.step, "tokens_seen": self.tokens_seen,
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "rng": rngs,
            "best_value": self.best_value, "best_step": self.best_step, "evals_since_best": self.evals_since_best,
            "data": {"micro_batches": self.micro_batches, "world": self.world, "batch_size": self.config.batch_size},
        }

    def _autocast(self):
        if self.dtype == torch.float32:  # no autocast context at all: even a disabled one costs time
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if k != "cu_seqlens"}

    def _hook(self, name: str, info) -> None:
        if name in self.hooks:
            self.hooks[name](self, info)

    # ------------------------------------------------------------------ data

    def _train_batches(self):
        c = self.config
        if _is_map_dataset(self.train_data):
            sampler = _TrainSampler(len(self.train_data), c.batch_size, c.seed, self.rank, self.world, self.micro_batches)
            loader = torch.utils.data.DataLoader(
                _Indexed(self.train_data), batch_sampler=sampler, num_workers=c.num_workers,
                collate_fn=_SeededCollate(self.collate_fn, c.seed, self.rank, stream=0),
                pin_memory=self.device.type == "cuda", generator=torch.Generator(),  # never the global RNG
            )
            return iter(loader)
        return _cycle_batches(self.train_data, self.micro_batches * self.world, self.rank, self.world)

    def _eval_batches(self):
        c = self.config
        if _is_map_dataset(self.eval_data):
            loader = torch.utils.data.DataLoader(
                _Indexed(self.eval_data), batch_sampler=_EvalSampler(len(self.eval_data), c.batch_size, self.rank, self.world),
                num_workers=c.num_workers, collate_fn=_SeededCollate(self.collate_fn, c.seed, self.rank, stream=1),
                pin_memory=self.device.type == "cuda", generator=torch.Generator(),
            )
            return iter(loader)
        return (batch for i, batch in enumerate(self.eval_data) if i % self.world == self.rank)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        """Train to max_steps (or max_minutes, early stopping, a hook's stop); returns a summary.
        A run replacing another (overwrite=True) that ends by an exception before its first
        checkpoint puts the previous run back (checkpoint.restore_previous_run), then re-raises."""
        try:
            return self._fit()
        except BaseException:
            self.log.close()  # nothing more of this run may land in out_dir
            if self.is_main:
                ckpt.restore_previous_run(self.out_dir)
            raise

    def _fit(self) -> dict:
        c = self.config
        batches = self._train_batches()
        bar = tqdm(total=c.max_steps, initial=self.step, disable=not (self.is_main and c.progress),
                   dynamic_ncols=True, desc=c.task)
        start, start_tokens, stop_reason = time.perf_counter(), self.tokens_seen, "max_steps"
        self.should_stop = False
        self.model.train()
        try:
            while self.step < c.max_steps:
                # fetch: every micro-batch of this step, so their target counts are known up front
                micro = [self._to_device(next(batches)) for _ in range(c.grad_accum_steps)]
                self.micro_batches += c.grad_accum_steps
                # schedule
                lr = apply_lr(self.optimizer, self.step, c)
                # accumulate
                loss = self._all_sum(self._accumulate(micro))  # each rank holds its share of the mean
                # step
                grad_norm = self._optimizer_step(loss)
                self.step += 1
                self.tokens_seen += sum(batch_tokens(c.task, b) for b in micro) * self.world
                elapsed = time.perf_counter() - start
                row = self._step_row(loss, lr, grad_norm, (self.tokens_seen - start_tokens) / elapsed, micro[0])
                if self.step % c.log_every == 0 or self.step == c.max_steps:
                    self.log.log(self.step, "train", row)
                bar.update(1)
                bar.set_postfix(_postfix(row, self.last_eval), refresh=False)
                self._hook("on_step_end", row)
                # evaluate
                last = self.step == c.max_steps
                improved = False
                if self.eval_data is not None and ((c.eval_every and self.step % c.eval_every == 0) or last):
                    improved = self._evaluate_and_track()
                reason = self._stop_reason(elapsed)
                # checkpoint
                if (c.checkpoint_every and self.step % c.checkpoint_every == 0) or improved or last or reason:
                    self.save(best=improved)
                if reason:
                    stop_reason = reason
                    break
        finally:
            bar.close()
        train_seconds = time.perf_counter() - start
        if stop_reason == "max_minutes" and self.is_main:
            self._warn_schedule_cut(lr)

        if self.eval_data is not None and (self.last_eval is None or self.last_eval["step"] != self.step):
            self._evaluate_and_track()
        if self.last_saved_step != self.step:
            self.save(best=self.best_step == self.step)
        if self.is_main and self.log.records:
            plot_metrics(self.log.jsonl, self.out_dir / "metrics.png")
        self.log.close()
        elapsed = time.perf_counter() - start
        return {
            "steps": self.step, "stopped": stop_reason, "tokens": self.tokens_seen,
            "tokens_per_s": (self.tokens_seen - start_tokens) / max(train_seconds, 1e-9), "elapsed_s": elapsed,
            "train_loss": next((r["loss"] for r in reversed(self.log.records) if r["kind"] == "train"), None),
            "best_metric": c.early_stopping_metric, "best_value": self.best_value, "best_step": self.best_step,
            "final": self.last_eval, "trainable_parameters": self.trainable["trainable"],
        }

    def _step_row(self, loss: float, lr: float, grad_norm: float, tokens_per_s: float, batch: dict) -> dict:
        """What the log and the progress bar show for a step (MFU only on a GPU with a known peak)."""
        row = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s}
        if self.peak is not None:
            seq_len = batch["input_ids"].shape[1]
            if seq_len not in self._flops_per_token:
                self._flops_per_token[seq_len] = self.raw_model.flops_per_token(seq_len)
            row["mfu"] = self._flops_per_token[seq_len] * tokens_per_s / self.world / self.peak
        return row

    def _warn_schedule_cut(self, lr: float) -> None:
        """max_minutes ended the run before max_steps: the schedule's horizon is max_steps, so the
        learning rate never finished its decay. Say so, and what max_steps fits the budget."""
        c = self.config
        if c.schedule == "constant" or self.step >= c.max_steps:  # nothing left undecayed
            return
        warnings.warn(
            f"TrainConfig.max_minutes={c.max_minutes:g} stopped the run at step {self.step} of max_steps={c.max_steps}: "
            f"the learning rate was still {lr:.3g} (the schedule decays it to {c.min_lr:.3g} at step {c.max_steps}). "
            f"For a schedule that finishes within this budget on this machine, set max_steps={self.step} "
            f"(--train.max_steps={self.step}), or raise max_minutes",
            stacklevel=3,
        )

    def _stop_reason(self, elapsed: float) -> str | None:
        """Why training stops after this step, or None. Every rank stops when one of them does."""
        c = self.config
        reason = None
        if self.should_stop:
            reason = "hook"
        if c.early_stopping_patience and self.evals_since_best >= c.early_stopping_patience:
            reason = "early_stopping"
        if c.max_minutes is not None and elapsed > 60 * c.max_minutes:
            reason = "max_minutes"
        if self._any_rank(reason is not None):
            return reason or "another rank stopped"
        return None

    def _accumulate(self, micro: list[dict]) -> float:
        """Forward and backward over the micro-batches; returns this rank's share of the step's mean loss."""
        task = self.config.task
        counts = [target_counts(task, b) for b in micro]
        totals = {term: sum(c[term] for c in counts).float() for term in counts[0]}
        if self.world > 1:  # the denominators of the *global* batch
            stacked = torch.stack(list(totals.values()))
            dist.all_reduce(stacked)
            totals = dict(zip(totals, stacked))
        totals = {term: n.clamp(min=1) for term, n in totals.items()}
        total_loss = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro):
            sync = i == len(micro) - 1
            no_sync = self.model.no_sync() if self.world > 1 and not sync else contextlib.nullcontext()
            with no_sync:
                with self._autocast():
                    _, sums = forward_sums(self.model, task, batch)
                    loss = sum(sums[term] / totals[term] for term in sums)
                self.scaler.scale(loss * self.world).backward()  # DDP averages over ranks: undo it
            total_loss += loss.detach()
        return total_loss.item()

    def _optimizer_step(self, loss: float) -> float:
        """Clip, step, zero; stop on a non-finite loss or gradient before touching the weights."""
        c = self.config
        if not math.isfinite(loss):
            self._diverged(f"the training loss is {loss}")
        self.scaler.unscale_(self.optimizer)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        max_norm = c.grad_clip if c.grad_clip > 0 else float("inf")  # inf: measure the norm, clip nothing
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True).item()
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():  # fp16: the scaler skips the step
            self._diverged(f"the gradient norm is {grad_norm}")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _diverged(self, what: str) -> None:
        latest = ckpt.latest_checkpoint(self.out_dir)
        kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint had been saved yet"
        raise FloatingPointError(
            f"step {self.step + 1}: {what}; training stopped and {kept}. Try a lower lr, longer warmup, "
            f"grad_clip > 0, or bf16/fp32 instead of fp16."
        )

    def _all_sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor(value, device=self.device, dtype=torch.float64)
        dist.all_reduce(t)
        return t.item()

    def _any_rank(self, flag: bool) -> bool:
        if self.world == 1:
            return bool(flag)
        t = torch.tensor(int(flag), device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    # ------------------------------------------------------------------ evaluate

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss (and perplexity) and the task's metrics on eval_data (first eval_batches batches)."""
        if self.eval_data is None:
            raise ValueError("evaluate: the Trainer was given no eval_data")
        c, task = self.config, self.config.task
        was_training = self.raw_model.training
        self.raw_model.eval()
        num_labels = self.raw_model.config.num_labels
        sums = torch.zeros(4, device=self.device, dtype=torch.float64)  # lm loss, nsp loss, lm count, nsp count
        hits = torch.zeros(4, device=self.device, dtype=torch.float64)  # token correct/total, nsp correct/total
        confusion = torch.zeros(num_labels, num_labels, device=self.device, dtype=torch.float64)
        regression = task == "classification" and num_labels == 1
        for i, batch in enumerate(self._eval_batches()):
            if c.eval_batches and i >= c.eval_batches:
                break
            batch = self._to_device(batch)
            with self._autocast():
                out, terms = forward_sums(self.raw_model, task, batch)
            counts = target_counts(task, batch)
            sums[0] += terms["lm"].double()
            sums[2] += counts["lm"]
            labels = batch["labels"]
            if task == "mlm-nsp":
                sums[1] += terms["nsp"].double()
                sums[3] += counts["nsp"]
                nsp = batch["next_sentence_label"]
                keep = nsp != IGNORE_INDEX
                hits[2] += (out.nsp_logits.argmax(-1)[keep] == nsp[keep]).sum()
                hits[3] += keep.sum()
            if task == "classification":
                if not regression:
                    confusion += confusion_matrix(out.logits.argmax(-1), labels, num_labels).double()
                continue
            if task in ("mlm", "mlm-nsp"):  # logits (N, V): the masked positions, in order
                targets = labels[labels != IGNORE_INDEX]
                hits[0] += (out.logits.argmax(-1) == targets).sum()
                hits[1] += targets.numel()
                continue
            logits = out.logits[:, :-1] if task == "causal-lm" else out.logits  # (B, T, V)
            targets = labels[:, 1:] if task == "causal-lm" else labels
            keep = targets != IGNORE_INDEX
            hits[0] += (logits.argmax(-1)[keep] == targets[keep]).sum()
            hits[1] += keep.sum()
        if self.world > 1:
            for t in (sums, hits, confusion):
                dist.all_reduce(t)
        if was_training:
            self.raw_model.train()
        if sums[2] == 0:
            raise ValueError("evaluate: eval_data gave no batches with targets")

        lm_loss = (sums[0] / sums[2]).item()
        metrics = {"val_loss": lm_loss}
        if task != "classification":
            metrics["val_ppl"] = perplexity(lm_loss)
        if task == "mlm-nsp":
            nsp_loss = (sums[1] / sums[3].clamp(min=1)).item()
            metrics.update(val_loss=lm_loss + nsp_loss, mlm_loss=lm_loss, nsp_loss=nsp_loss,
                           nsp_accuracy=(hits[2] / hits[3].clamp(min=1)).item())
        if task in ("mlm", "mlm-nsp"):
            metrics["mlm_accuracy"] = (hits[0] / hits[1].clamp(min=1)).item()
        if task in ("causal-lm", "seq2seq"):
            metrics["token_accuracy"] = (hits[0] / hits[1].clamp(min=1)).item()
        if task == "classification" and not regression:
            metrics.update(classification_metrics(confusion.long().cpu()))
        return metrics

    def _evaluate_and_track(self) -> bool:
        """Evaluate, log, update the best metric; True when this evaluation is a new best."""
        metrics = self.evaluate()
        self.log.log(self.step, "eval", metrics)
        self.last_eval = {"step": self.step, **metrics}
        name = self.config.early_stopping_metric
        if name not in metrics:
            raise ValueError(f"TrainConfig.early_stopping_metric: {name!r} is not reported here; metrics are {sorted(metrics)}")
        value = metrics[name]
        better = self.best_value is None or (value < self.best_value if lower_is_better(name) else value > self.best_value)
        if better:
            self.best_value, self.best_step, self.evals_since_best = value, self.step, 0
        else:
            self.evals_since_best += 1
        self._hook("on_eval_end", self.last_eval)
        return better

    # ------------------------------------------------------------------ checkpoint

    def save(self, best: bool = False) -> Path | None:
        """Checkpoint the current step (rank 0 writes; every rank must call it under DDP)."""
        state = self._state()  # collective under DDP: every rank gathers its RNG state
        path = None
        if self.is_main:
            path = ckpt.save_checkpoint(self.out_dir, self.step, self.raw_model, state, self.configs, self.tokenizer)
            ckpt.finish_replacement(self.out_dir)  # the run this one replaces, if any, is no longer needed
            if best:
                ckpt.mark_best(self.out_dir, path)
            ckpt.prune_checkpoints(self.out_dir, self.config.keep_checkpoints)
        self.last_saved_step = self.step
        if self.world > 1:
            dist.barrier()
        if path is not None:
            self._hook("on_checkpoint", path)
        return path


def _postfix(row: dict, last_eval: dict | None) -> dict:
    out = {"loss": f"{row['loss']:.4f}", "lr": f"{row['lr']:.2e}", "tok/s": f"{row['tokens_per_s']:.0f}"}
    if last_eval is not None:
        out["val_loss"] = f"{last_eval['val_loss']:.4f}"
    if "mfu" in row:
        out["mfu"] = f"{100 * row['mfu']:.1f}%"
    return out


def _setup_distributed(device: str) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; joins the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("TrainConfig.device: got 'cuda', but torch sees no CUDA device")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def _pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else torch.float32
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("TrainConfig.precision: 'fp16' needs a CUDA device (use 'bf16' or 'fp32' on CPU)")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
