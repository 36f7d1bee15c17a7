"""The training loop: fetch, schedule, accumulate, step, evaluate, checkpoint.

    trainer = Trainer(model, TrainConfig(task="causal-lm", out_dir="runs/gpt"), train_set, val_set,
                      collate_fn=CausalLMCollator(), tokenizer=tokenizer)
    summary = trainer.fit()        # {"steps", "tokens_per_s", "best_metric", "final": {...}, ...}

This file is the loop; what it leans on lives beside it. The task (:mod:`minillm.tasks`, chosen
by ``TrainConfig.task``) gives a batch's summed loss terms and their target counts, and the
metrics; :mod:`minillm.batches` feeds micro-batches that are pure functions of (seed, index), so
a resumed run sees the very batches it would have seen; :mod:`minillm.evaluation` evaluates;
:mod:`minillm.checkpoint` owns the run directory and what a checkpoint holds;
:mod:`minillm.distributed` knows torchrun's processes, the device and the precision.

Data. ``train_data`` and ``eval_data`` are map-style Datasets (with ``collate_fn``), sampled by
the trainer, or iterables of ready batch dicts, cycled (see :mod:`minillm.batches`).

Loss normalisation. Models return summed losses (``loss_reduction="sum"``); before the backward
passes of a step the trainer counts the targets of each loss term over *all* its micro-batches
(all-reduced over ranks), and each micro-batch contributes ``sum / total``. So 4 micro-batches
give exactly the gradient of one 4x batch, however the targets are spread among them. DDP
averages gradients over ranks, so each rank scales its loss by the world size.

Hooks. ``hooks={"on_step_end": fn, "on_eval_end": fn, "on_checkpoint": fn}``; each is called as
``fn(trainer, info)`` (info: the step's metrics dict, or the checkpoint path; on_checkpoint runs
on rank 0 only) and may set ``trainer.should_stop = True``.

Run directory. ``out_dir`` gets the resolved ``config.toml``, checkpoints, ``metrics.jsonl``/``.csv``
and ``metrics.png``. An out_dir that already holds a run is an error unless ``resume=True``
(continue exactly where it stopped: the saved config is compared with this one, see
``TrainConfig.resume``) or ``overwrite=True`` (start afresh: the previous run is kept aside until
this one's first checkpoint is written, and put back if this one fails before that). A non-finite
loss or gradient stops training with a FloatingPointError naming the last good checkpoint; no
checkpoint is ever written from non-finite weights.

DDP. Launched by torchrun the trainer joins the process group, wraps the model in
DistributedDataParallel and shards the data by rank; only rank 0 writes logs and checkpoints.
Not supported: FSDP/tensor parallelism, IterableDataset of samples (wrap it in a DataLoader).

Fine-tuning (``TrainConfig.finetune_mode``, see :mod:`minillm.lora`). A model that arrives with
frozen parameters trains with finetune_mode="keep", which leaves every requires_grad as it is;
any other mode is refused, since it would unfreeze them. A model prepared with ``peft``
(``get_peft_model(model, LoraConfig(...))``) is unwrapped (``minillm.lora.unwrap_model``): the
trainer trains, evaluates and saves the minillm model inside, whose layers hold the adapters, and
its checkpoints hold the full weights under peft's names (resume with the same get_peft_model).
A LoRA run (finetune_mode="lora"; likewise "adalora", "adapter", "prefix", "deep-prompt", "prompt")
loads its base (``init_from``) also when it resumes, and saves only the adapter (see
:mod:`minillm.checkpoint`); a prefix run takes its MLP back from the training state
(``minillm.prompts.unfold_prefixes``). An AdaLoRA run (see :mod:`minillm.adalora`) adds its
orthogonality regulariser to each step's loss (``adalora_ortho_weight``; the logged loss is the
task's alone), and its rank allocator runs after each optimizer step, before the gradients are
cleared; its final ranks per layer are printed and returned in the summary (``"adalora_ranks"``).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from minillm import checkpoint as ckpt
from minillm.adalora import build_rank_allocator, orthogonality_penalty
from minillm import config_io, distributed
from minillm.batches import eval_batches, to_device, train_batches
from minillm.distributed import seed_everything
from minillm.evaluation import evaluate
from minillm.lora import apply_finetune_mode, check_frozen_parameters, unwrap_model
from minillm.prompts import unfold_prefixes
from minillm.metrics import MetricsLog, plot_metrics
from minillm.optim import apply_lr, build_optimizer, schedule_cut
from minillm.tasks import get_task
from minillm.train_config import ADAPTER_MODES, TrainConfig, lower_is_better

HOOKS = ("on_step_end", "on_eval_end", "on_checkpoint")

__all__ = ["Trainer", "seed_everything", "HOOKS"]


class Trainer:
    """Fit a minillm model (see the module docstring for data, losses, hooks and DDP).

    Args:
        model: a minillm task model (``minillm.tasks.build_model``), on any device; the trainer moves it.
            It may come wrapped by peft (a PeftModel with LoRA...): then use finetune_mode="keep".
        config: the TrainConfig; ``config.task`` must be the task the model was built for.
        train_data / eval_data: map-style Datasets (with collate_fn) or iterables of batch dicts.
        collate_fn: turns a list of samples into a batch dict (Dataset inputs only).
        configs_to_save: more configs for config.json and config.toml (e.g. {"data": data_config});
            "task", "model" and "train" are always saved.
        tokenizer: saved beside every checkpoint; its vocabulary must match the model's.
        hooks: {"on_step_end" | "on_eval_end" | "on_checkpoint": fn(trainer, info)}.
        before_training: fn(model), called on a fresh run once out_dir is taken and the pretrained
            weights (config.init_from) are in, before the fine-tuning mode and the optimizer are
            set up: where the recipes train a new head alone first (LP-FT's probe). The
            requires_grad flags it changes are put back as the model arrived.
        clock: a function returning seconds, ``time.perf_counter`` by default; it measures the
            training time that max_minutes budgets and a time-fitted schedule (max_steps=0) follows.
            Tests pass a fake one to drive the schedule without waiting.
    """

    def __init__(self, model, config: TrainConfig, train_data, eval_data=None, *, collate_fn=None,
                 configs_to_save: dict | None = None, tokenizer=None, hooks: dict | None = None,
                 before_training=None, clock=time.perf_counter):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
        unknown = sorted(set(hooks or {}) - set(HOOKS))
        if unknown:
            raise ValueError(f"hooks: unknown hook name(s) {unknown}; available hooks are {HOOKS}")
        check_frozen_parameters(model, config.finetune_mode)  # before anything is touched
        wrapper, model = model, unwrap_model(model)
        self.config, self.hooks, self.tokenizer = config, dict(hooks or {}), tokenizer
        self.task = get_task(config.task)
        self.task.check_model(model)
        self.out_dir = Path(config.out_dir)
        self.rank, self.world, local_rank = distributed.setup(config.device)
        self.is_main = self.rank == 0
        self.device = distributed.pick_device(config.device, local_rank)
        self.dtype = distributed.pick_dtype(config.precision, self.device)
        ckpt.check_vocab(model.config, tokenizer, "Trainer")
        self.configs = {**(configs_to_save or {}), "task": config.task, "model": model.config, "train": config}
        if wrapper is not model:  # load_model refuses such a checkpoint: its names are peft's
            peft_type = getattr(wrapper.active_peft_config, "peft_type", None)
            self.configs["peft"] = {"wrapper": type(wrapper).__name__,
                                    "peft_type": str(getattr(peft_type, "value", peft_type))}
        self.train_data, self.eval_data, self.collate_fn = train_data, eval_data, collate_fn
        self.clock = clock

        self.log = None
        resume_from = ckpt.take_run_dir(self.out_dir, resume=config.resume, overwrite=config.overwrite,
                                        rank=self.rank, world=self.world)
        with self._previous_run_back_on_failure():
            self._set_up(model, resume_from, before_training)

    def _set_up(self, model, resume_from: Path | None, before_training) -> None:
        """Everything after out_dir is taken: weights, fine-tuning mode, optimizer, resumed state, log."""
        config, tokenizer = self.config, self.tokenizer
        if resume_from:
            ckpt.check_resume_changes(resume_from, self.configs, allow=config.resume_changes == "allow",
                                      say=self.is_main)
        else:
            seed_everything(config.seed + self.rank)
        lora = config.finetune_mode in ADAPTER_MODES  # LoRA and the other methods that save only an adapter
        base_digests = None
        # A resumed run's own checkpoint has newer weights, except a LoRA run's: it holds the adapter alone.
        if config.init_from is not None and (lora or not resume_from):
            loaded = ckpt.init_from(model, config.init_from, tokenizer)["loaded"]
            if lora and not resume_from:
                base_digests = ckpt.tensor_digests(model, loaded)
        if before_training is not None and not resume_from:
            arrived = [(p, p.requires_grad) for p in model.parameters()]
            before_training(model)
            for param, requires_grad in arrived:
                param.requires_grad_(requires_grad)
        self.trainable = apply_finetune_mode(model, config)
        # AdaLoRA's hook: its regulariser joins the loss, its rank allocator runs after each step
        self.rank_allocator = build_rank_allocator(model, config) if config.finetune_mode == "adalora" else None
        self.adapter = None  # what a LoRA run saves (checkpoint.Adapter); None: the full weights
        if lora:
            self.adapter = (ckpt.read_adapter(resume_from) if resume_from
                            else ckpt.plan_adapter(model, config, base_digests))
        self.raw_model = model.to(self.device)
        prefix = config.finetune_mode == "prefix"
        if resume_from and prefix:  # the weights file holds the folded prefix, state.pt the MLP that trains it
            ckpt.load_weights(self.raw_model, resume_from)  # folds the prefix: checks the base, loads it and the head
            unfold_prefixes(self.raw_model, ckpt.load_state(resume_from)["prefix_reparameterisation"])
        self.optimizer = build_optimizer(self.raw_model, config)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.step, self.micro_batches, self.tokens_seen = 0, 0, 0
        self.best_value, self.best_step, self.evals_since_best = None, None, 0
        self.should_stop, self.last_eval, self.last_saved_step = False, None, None
        self.train_seconds = 0.0  # training time of the whole run, resumes included (max_minutes counts it)
        self.step_seconds = 0.0  # how long the last step took (a time-fitted schedule looks one step ahead)
        if resume_from:
            if not prefix:
                ckpt.load_weights(self.raw_model, resume_from)
            ckpt.restore_training_state(self, resume_from)

        self.model = torch.compile(self.raw_model) if config.compile else self.raw_model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.model, device_ids=ids)
        self.log = MetricsLog(self.out_dir, enabled=self.is_main, resume_step=self.step if resume_from else None)
        if self.is_main:  # the config that runs, as it runs: the same values every checkpoint saves
            config_io.save_configs({k: v for k, v in self.configs.items() if config_io.is_config(v)}, self.out_dir)
        self.peak, self._flops_per_token = distributed.peak_flops(self.device), {}

    # ------------------------------------------------------------------ run directory and resume

    @contextlib.contextmanager
    def _previous_run_back_on_failure(self):
        """A run that ends by an exception (Ctrl-C, a NaN stop) before its first checkpoint puts
        back the run it was replacing (checkpoint.restore_previous_run), then re-raises."""
        try:
            yield
        except BaseException:
            if self.log is not None:
                self.log.close()  # nothing more of this run may land in out_dir
            if self.is_main:
                ckpt.restore_previous_run(self.out_dir)
            raise

    def _hook(self, name: str, info) -> None:
        if name in self.hooks:
            self.hooks[name](self, info)

    def _eval_batches(self):
        c = self.config
        return eval_batches(self.eval_data, self.collate_fn, batch_size=c.batch_size, seed=c.seed, rank=self.rank,
                            world=self.world, num_workers=c.num_workers, pin_memory=self.device.type == "cuda")

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        """Train to max_steps (or max_minutes, early stopping, a hook's stop); returns a summary.
        A run replacing another (overwrite=True) that ends by an exception before its first
        checkpoint puts the previous run back (checkpoint.restore_previous_run), then re-raises."""
        with self._previous_run_back_on_failure():
            return self._fit()

    def _fit(self) -> dict:
        c = self.config
        batches = train_batches(self.train_data, self.collate_fn, batch_size=c.batch_size, seed=c.seed,
                                rank=self.rank, world=self.world, start=self.micro_batches, num_workers=c.num_workers,
                                pin_memory=self.device.type == "cuda")
        # A time-fitted run has no step count: its bar counts the seconds of the budget instead, so it
        # shows the time left (tqdm's ETA), with the step in the postfix.
        budget_s = round(60 * c.max_minutes) if c.time_fitted else None
        bar = tqdm(total=budget_s if c.time_fitted else c.max_steps, unit="s" if c.time_fitted else "it",
                   initial=min(budget_s, round(self.train_seconds)) if c.time_fitted else self.step,
                   disable=not (self.is_main and c.progress), dynamic_ncols=True, desc=c.task)
        start, start_tokens, stop_reason = time.perf_counter(), self.tokens_seen, "max_steps"
        # Training time: what the checkpoint saved plus this session's clock. The clock is read at the
        # start of each step (the schedule) and at the stop check (the budget and the saved time), never
        # in between, so a fake clock that a test advances drives both exactly, resumes included.
        # A time-fitted schedule gives a step the rate of the time it is expected to end (its start plus
        # the last step's duration): the step that ends the budget runs at min_lr.
        session_start, seconds_before = self.clock(), self.train_seconds
        self.should_stop = False
        self.model.train()
        lr = None
        try:
            while c.time_fitted or self.step < c.max_steps:
                # fetch: every micro-batch of this step, so their target counts are known up front
                micro = [to_device(next(batches), self.device) for _ in range(c.grad_accum_steps)]
                self.micro_batches += c.grad_accum_steps
                # schedule
                step_start = self.train_seconds = seconds_before + self.clock() - session_start
                step_end = step_start + self.step_seconds
                if c.time_fitted and self.world > 1:  # one rate for every replica: the ranks' mean time
                    step_end = distributed.all_sum(step_end, self.device) / self.world
                lr = apply_lr(self.optimizer, self.step, c, step_end)
                # accumulate
                loss = distributed.all_sum(self._accumulate(micro), self.device)  # each rank holds its share
                # step
                grad_norm = self._optimizer_step(loss)
                self.step += 1
                self.tokens_seen += sum(self.task.tokens(b) for b in micro) * self.world
                elapsed = time.perf_counter() - start
                row = self._step_row(loss, lr, grad_norm, (self.tokens_seen - start_tokens) / elapsed, micro[0])
                if self.step % c.log_every == 0 or self.step == c.max_steps:
                    self.log.log(self.step, "train", row)
                if c.time_fitted:
                    bar.update(min(budget_s, round(self.train_seconds)) - bar.n)  # the time this step started at
                else:
                    bar.update(1)
                bar.set_postfix({**({"step": self.step} if c.time_fitted else {}), **_postfix(row, self.last_eval)},
                                refresh=False)
                self._hook("on_step_end", row)
                # evaluate
                last = self.step == c.max_steps
                improved = False
                if self.eval_data is not None and ((c.eval_every and self.step % c.eval_every == 0) or last):
                    improved = self._evaluate_and_track()
                self.train_seconds = seconds_before + self.clock() - session_start
                self.step_seconds = self.train_seconds - step_start
                reason = self._stop_reason(self.train_seconds)
                # checkpoint
                if (c.checkpoint_every and self.step % c.checkpoint_every == 0) or improved or last or reason:
                    self.save(best=improved)
                if reason:
                    stop_reason = reason
                    break
        finally:
            bar.close()
        train_seconds = time.perf_counter() - start
        if stop_reason == "max_minutes" and self.is_main and (cut := schedule_cut(c, self.step, lr)):
            warnings.warn(cut, stacklevel=2)

        if self.eval_data is not None and (self.last_eval is None or self.last_eval["step"] != self.step):
            self._evaluate_and_track()
        if self.last_saved_step != self.step:
            self.save(best=self.best_step == self.step)
        if self.is_main and self.log.records:
            plot_metrics(self.log.jsonl, self.out_dir / "metrics.png")
        self.log.close()
        extra = {}
        if self.rank_allocator is not None:
            extra["adalora_ranks"] = self.rank_allocator.ranks()
            if self.is_main:
                ranks = ", ".join(f"{name}={rank}" for name, rank in extra["adalora_ranks"].items())
                print(f"AdaLoRA ranks at step {self.step} ({sum(extra['adalora_ranks'].values())} in all): {ranks}")
        return {
            "steps": self.step, "stopped": stop_reason, "tokens": self.tokens_seen,
            "tokens_per_s": (self.tokens_seen - start_tokens) / max(train_seconds, 1e-9),
            "elapsed_s": time.perf_counter() - start,
            "train_loss": next((r["loss"] for r in reversed(self.log.records) if r["kind"] == "train"), None),
            "best_metric": c.early_stopping_metric, "best_value": self.best_value, "best_step": self.best_step,
            "final": self.last_eval, "trainable_parameters": self.trainable["trainable"],
            "train_seconds": self.train_seconds, "last_lr": lr, **extra,
        }

    def _accumulate(self, micro: list[dict]) -> float:
        """Forward and backward over the micro-batches; returns this rank's share of the step's mean loss."""
        counts = [self.task.target_counts(b) for b in micro]
        totals = distributed.sum_tensors({term: sum(c[term] for c in counts).float() for term in counts[0]})
        totals = {term: n.clamp(min=1) for term, n in totals.items()}  # the denominators of the *global* batch
        total_loss = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro):
            sync = i == len(micro) - 1
            no_sync = self.model.no_sync() if self.world > 1 and not sync else contextlib.nullcontext()
            with no_sync:
                with distributed.autocast(self.device, self.dtype):
                    _, sums = self.task.forward(self.model, batch)
                    loss = sum(sums[term] / totals[term] for term in sums)
                    objective = loss
                    if self.rank_allocator is not None:  # once per step: 1/len(micro) of it per micro-batch
                        penalty = orthogonality_penalty(self.raw_model)
                        objective = loss + self.config.adalora_ortho_weight * penalty / len(micro)
                self.scaler.scale(objective * self.world).backward()  # DDP averages over ranks: undo it
            total_loss += loss.detach()
        return total_loss.item()

    def _optimizer_step(self, loss: float) -> float:
        """Clip, step, zero; stop on a non-finite loss or gradient before touching the weights."""
        if not math.isfinite(loss):
            self._diverged(f"the training loss is {loss}")
        self.scaler.unscale_(self.optimizer)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")  # inf: measure, clip nothing
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True).item()
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():  # fp16: the scaler skips the step
            self._diverged(f"the gradient norm is {grad_norm}")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.rank_allocator is not None and math.isfinite(grad_norm):  # AdaLoRA: needs the gradients
            self.rank_allocator.step(self.step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _diverged(self, what: str) -> None:
        latest = ckpt.latest_checkpoint(self.out_dir)
        kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint had been saved yet"
        raise FloatingPointError(
            f"step {self.step + 1}: {what}; training stopped and {kept}. Try a lower lr, longer warmup, "
            f"grad_clip > 0, or bf16/fp32 instead of fp16."
        )

    def _stop_reason(self, train_seconds: float) -> str | None:
        """Why training stops after this step (``train_seconds`` of training time, resumes included),
        or None. Every rank stops when one of them does."""
        c = self.config
        reason = None
        if self.should_stop:
            reason = "hook"
        if c.early_stopping_patience and self.evals_since_best >= c.early_stopping_patience:
            reason = "early_stopping"
        if c.max_minutes is not None and train_seconds > 60 * c.max_minutes:
            reason = "max_minutes"
        if distributed.any_rank(reason is not None, self.device):
            return reason or "another rank stopped"
        return None

    def _step_row(self, loss: float, lr: float, grad_norm: float, tokens_per_s: float, batch: dict) -> dict:
        """What the log and the progress bar show for a step (MFU only on a GPU with a known peak)."""
        row = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s}
        if self.peak is not None:
            seq_len = batch["input_ids"].shape[1]
            if seq_len not in self._flops_per_token:
                self._flops_per_token[seq_len] = self.raw_model.flops_per_token(seq_len)
            row["mfu"] = self._flops_per_token[seq_len] * tokens_per_s / self.world / self.peak
        return row

    # ------------------------------------------------------------------ evaluate and checkpoint

    def evaluate(self) -> dict:
        """Loss and the task's metrics on eval_data (its first eval_batches batches)."""
        if self.eval_data is None:
            raise ValueError("evaluate: the Trainer was given no eval_data")
        return evaluate(self.raw_model, self.task, self._eval_batches(), dtype=self.dtype,
                        max_batches=self.config.eval_batches)

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

    def save(self, best: bool = False) -> Path | None:
        """Checkpoint the current step (rank 0 writes; every rank must call it under DDP)."""
        state = ckpt.training_state(self)  # a collective under DDP: every rank's RNG state
        path = None
        if self.rank_allocator is not None:
            self.adapter.rank_pattern = self.rank_allocator.rank_pattern
        if self.is_main:
            path = ckpt.save_checkpoint(self.out_dir, self.step, self.raw_model, state, self.configs, self.tokenizer,
                                        adapter=self.adapter)
            ckpt.finish_replacement(self.out_dir)  # the run this one replaces, if any, is no longer needed
            if best:
                ckpt.mark_best(self.out_dir, path)
            ckpt.prune_checkpoints(self.out_dir, self.config.keep_checkpoints)
        self.last_saved_step = self.step
        distributed.barrier()
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
