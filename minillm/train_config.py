"""TrainConfig: every setting of a training run, flat, typed and validated on construction.

It is read from TOML plus dotted command-line overrides (``--train.lr=3e-4``), so every field is
a plain scalar and ``TrainConfig(**fields)`` raises a ``TypeError``/``ValueError`` naming the
field on a bad value. The resolved config is saved beside every checkpoint (``config.json``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from minillm.config import check_field_types, config_from_dict
from minillm.tasks import TASKS, get_task

SCHEDULES = ("cosine", "linear", "constant", "wsd")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
FINETUNE_MODES = ("full", "lora", "bitfit", "freeze", "keep")
FINETUNE_MODES += ("adalora",)  # minillm.adalora
FINETUNE_MODES += ("adapter", "prefix", "deep-prompt", "prompt")  # minillm.adapters, minillm.prompts
# Modes whose runs save only what they train, on top of init_from (minillm.checkpoint, "LoRA runs").
ADAPTER_MODES = ("lora", "adalora", "adapter", "prefix", "deep-prompt", "prompt")
RESUME_CHANGES = ("refuse", "allow")

# Resuming: the saved config is the base. These fields only say how the run is launched, and are
# never compared with it ...
LAUNCH_FIELDS = {"train": ("out_dir", "resume", "overwrite", "resume_changes", "progress")}
# ... and these change how far it goes, how often it reports, or where it runs, not what it
# learns: a new value is applied and said. Any other difference is refused unless
# resume_changes="allow".
HARMLESS_ON_RESUME = {
    "train": ("max_steps", "max_minutes", "log_every", "eval_every", "eval_batches", "checkpoint_every",
              "keep_checkpoints", "early_stopping_patience", "num_workers", "device", "compile"),
    "model": ("attn_backend", "norm_backend"),
    "data": ("num_workers",),
}


def lower_is_better(metric: str) -> bool:
    """Losses and perplexities improve downwards; accuracies, F1 and MCC upwards."""
    return metric.endswith(("loss", "ppl"))


@dataclass
class TrainConfig:
    """Training settings; see :mod:`minillm.trainer` for how they are used."""

    out_dir: str = "runs/default"
    """Run directory: checkpoints (step_XXXXXX/, best, latest), metrics.jsonl/.csv, metrics.png."""
    task: str = "causal-lm"
    """What is learnt, one of :data:`minillm.tasks.TASKS`: causal-lm, mlm, mlm-nsp, span-corruption,
    seq2seq, classification. The task builds the model's head, the batches and the metrics."""
    batch_size: int = 16
    """Sequences per micro-batch per process."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step. Global batch = batch_size * grad_accum_steps * world size."""
    max_steps: int = 1000
    """Optimizer steps of the whole run (also the horizon of the learning-rate schedule). 0: no
    step limit, train until max_minutes (which must be set), and the schedule's horizon is that
    time budget ("time-fitted", see :mod:`minillm.optim`): the decay ends when the budget does."""
    max_minutes: float | None = None
    """Optional budget of training time, in minutes of wall clock (evaluations and checkpoints
    included), counted over the whole run: a resumed run carries on from the time its checkpoint
    saved. Training stops (and checkpoints) at the first step that ends past it. With max_steps > 0
    the schedule's horizon stays max_steps, so a run the budget cuts short ends before its learning
    rate has decayed (a warning then says so); max_steps=0 fits the schedule to the budget instead."""
    lr: float = 6e-4
    """Peak learning rate, reached at the end of warmup (GPT-2 small's value)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr (Chinchilla/nanoGPT decay to lr / 10)."""
    warmup_steps: int = 100
    """Steps of linear warmup to lr (Adam's second moments are noisy at the start); a short run
    with warmup_steps >= max_steps simply never reaches the peak."""
    schedule: str = "cosine"
    """Decay after warmup: "cosine", "linear", "constant" or "wsd" (warmup-stable-decay: the peak
    lr until the last cooldown_fraction of the horizon, then linear to min_lr). The horizon is
    max_steps, or the max_minutes budget when max_steps=0; formulas in :mod:`minillm.optim`."""
    cooldown_fraction: float = 0.2
    """schedule="wsd": the fraction of the horizon (of the steps, or of the minutes when time-fitted)
    spent decaying to min_lr; 0.2 is the cooldown length Hägele et al. (2024) found to match cosine."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on matrices (never on biases, norms or embeddings)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay (0.95 rather than 0.999: steadier with large-batch LM training)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    precision: str = "auto"
    """"fp32", "bf16" (autocast), "fp16" (autocast + gradient scaler), "auto" (bf16 on a GPU that
    supports it and on a CPU with native bf16 arithmetic, AVX512-BF16 or AMX; fp32 elsewhere). Weights
    and optimizer state stay fp32 in every mode; the report names the precision the run used."""
    compile: bool = False
    """Wrap the model in torch.compile (needs a working compiler toolchain)."""
    seed: int = 0
    """Seeds the initialisation, dropout and the order of training samples."""
    device: str = "auto"
    """"auto" (cuda when available), "cpu" or "cuda"."""
    eval_every: int = 200
    """Evaluate every N optimizer steps (and at the end); 0 evaluates only at the end."""
    eval_batches: int = 20
    """Batches per evaluation (per process); 0 means the whole evaluation set."""
    log_every: int = 10
    """Write a training row to the metrics log every N steps."""
    checkpoint_every: int = 500
    """Save a checkpoint every N steps (and at the end); 0 saves only at the end."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep besides the best one; 0 keeps all."""
    early_stopping_metric: str = "val_loss"
    """Metric that picks the best checkpoint and drives early stopping: one the task reports (Task.metrics)."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations without improvement; 0 never stops early."""
    finetune_mode: str = "full"
    """"full" (every weight), "lora" (low-rank adapters; needs init_from: the run saves only the
    adapter, on top of that base), "adalora" (LoRA in SVD form with a shrinking rank budget, see
    :mod:`minillm.adalora`), "bitfit" (biases only), "freeze" (embeddings and the first
    freeze_layers blocks frozen), "adapter" (Houlsby bottleneck adapters), "prefix" (prefix tuning),
    "deep-prompt" (P-tuning v2), "prompt" (prompt tuning): adalora and these four need init_from too
    and save only what they train (minillm.adapters, minillm.prompts). In these the task head always
    trains. "keep": train exactly the parameters whose requires_grad is True as the model arrives (a
    model prepared by peft's get_peft_model, or frozen by hand), the head included. A model that
    arrives with frozen parameters is refused in every mode but "keep", rather than unfrozen behind
    the caller's back."""
    lora_rank: int = 8
    """LoRA rank r of the update B A."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator: the update is (alpha / r) B A (Hu et al., 2021)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    adapter_size: int = 16
    """finetune_mode="adapter": bottleneck width m of the Houlsby adapters (minillm.adapters)."""
    prefix_length: int = 10
    """finetune_mode="prefix": P, the keys and values put before every block's own (minillm.prompts);
    they take the first P of max_seq_len positions."""
    prefix_hidden: int = 512
    """finetune_mode="prefix": width of the MLP that reparameterises the prefix while it trains
    (Li & Liang, 2021, used 512); folded away in what the run saves."""
    prompt_length: int = 20
    """finetune_mode="prompt" or "deep-prompt": P, the soft-prompt vectors at the input (prompt) or
    the keys and values of every block (deep-prompt, P-tuning v2); they take the first P positions."""
    adalora_init_rank: int = 12
    """finetune_mode="adalora" (see :mod:`minillm.adalora`; lora_alpha and lora_dropout apply too):
    the rank r every adapted layer starts with."""
    adalora_target_rank: int = 8
    """AdaLoRA: the average rank per layer at the end (the final budget is this times the layers)."""
    adalora_ortho_weight: float = 0.1
    """AdaLoRA: weight of the orthogonality regulariser ||PᵀP - I||²_F + ||QQᵀ - I||²_F in the loss."""
    adalora_beta1: float = 0.85
    """AdaLoRA: EMA decay of the sensitivity |w dL/dw| (the paper's β1)."""
    adalora_beta2: float = 0.85
    """AdaLoRA: EMA decay of the sensitivity's uncertainty (the paper's β2)."""
    adalora_warmup_steps: int = 0
    """AdaLoRA: steps at the full initial rank before the budget starts shrinking (t_i)."""
    adalora_final_steps: int = 0
    """AdaLoRA: steps at the end with the rank pattern fixed (t_f)."""
    adalora_mask_interval: int = 10
    """AdaLoRA: optimizer steps between two reallocations while the budget shrinks."""
    freeze_layers: int = 0
    """finetune_mode="freeze": number of leading blocks to freeze (embeddings are frozen too)."""
    layer_lr_decay: float = 1.0
    """Layer-wise LR decay: block i of L gets lr * decay^(L + 1 - (i + 1)); 1.0 disables it."""
    probe_steps: int = 0
    """Fine-tuning from pretrained weights: first train the new head alone for this many steps,
    everything else frozen (a linear probe), then fine-tune from there: LP-FT (Kumar et al., 2022).
    A random head's first gradients pull the pretrained features towards whatever fits it; a
    probed head already fits the labels as well as the frozen features allow. 0 turns it off; it
    is skipped from scratch (init_from=None) and when resuming. The probe run is kept in
    out_dir/probe."""
    probe_lr: float = 3e-3
    """Peak learning rate of the probe (only the head trains, so it takes larger steps)."""
    init_from: str | None = None
    """Initial weights: a minillm checkpoint (or run directory) or a Hugging Face directory.
    Ignored when resuming: the run's own checkpoint already holds the fine-tuned weights; except in
    a LoRA run, whose checkpoints hold only the adapter: its base is loaded again, and must be the
    very weights it was trained on (checked against the adapter's fingerprint)."""
    resume: bool = False
    """Continue the run in out_dir from its latest checkpoint, exactly where it stopped. Its saved
    config is the base: fields that change what the run learns (lr, schedule, data, model...) are
    refused when they differ, unless resume_changes="allow"; HARMLESS_ON_RESUME ones are applied."""
    resume_changes: str = "refuse"
    """Resuming with settings that differ from the saved run's: "refuse" (an error listing each
    difference) or "allow" (apply them, and say so)."""
    overwrite: bool = False
    """Start afresh in an out_dir that already holds a run, deleting its checkpoints and logs
    (otherwise that is an error: a finished run is never replaced by accident)."""
    num_workers: int = 0
    """DataLoader worker processes (0 = load in the training process)."""
    progress: bool = True
    """Show a tqdm progress bar (rank 0 only)."""

    def __post_init__(self) -> None:
        check_field_types(self)

        def fail(name: str, expected: str) -> None:
            raise ValueError(f"TrainConfig.{name}: got {getattr(self, name)!r}, expected {expected}")

        for name, allowed in (
            ("task", tuple(TASKS)), ("schedule", SCHEDULES), ("precision", PRECISIONS),
            ("device", DEVICES), ("finetune_mode", FINETUNE_MODES), ("resume_changes", RESUME_CHANGES),
        ):
            if getattr(self, name) not in allowed:
                fail(name, f"one of {allowed}")
        if not self.out_dir:
            fail("out_dir", "a directory path")
        for name in ("batch_size", "grad_accum_steps", "lora_rank", "adapter_size", "prefix_length", "prefix_hidden",
                     "prompt_length", "adalora_init_rank", "adalora_target_rank", "adalora_mask_interval"):
            if getattr(self, name) < 1:
                fail(name, "an integer >= 1")
        for name in ("max_steps", "warmup_steps", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
                     "early_stopping_patience", "freeze_layers", "probe_steps", "num_workers",
                     "adalora_warmup_steps", "adalora_final_steps"):
            if getattr(self, name) < 0:
                fail(name, "an integer >= 0")
        if self.log_every < 1:
            fail("log_every", "an integer >= 1")
        if self.max_minutes is not None and not (self.max_minutes > 0 and math.isfinite(self.max_minutes)):
            fail("max_minutes", "None or a positive number of minutes")
        if self.max_steps == 0 and self.max_minutes is None:
            fail("max_minutes", "a positive number of minutes when max_steps=0 (a run without a step limit "
                                "trains until its time budget)")
        if not 0.0 < self.cooldown_fraction <= 1.0:
            fail("cooldown_fraction", "a number in (0, 1]")
        for name in ("lr", "probe_lr"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                fail(name, "a positive finite number")
        if self.probe_steps and not get_task(self.task).new_head:
            fail("probe_steps", f"0 for task {self.task!r} (the probe trains a new head, which this task has not)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            fail("min_lr_ratio", "a number in [0, 1]")
        if not 0.0 <= self.weight_decay < 1.0:
            fail("weight_decay", "a number in [0, 1)")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                fail(name, "a number in [0, 1)")
        if not self.eps > 0:
            fail("eps", "a positive number")
        if not (self.grad_clip >= 0 and math.isfinite(self.grad_clip)):
            fail("grad_clip", "a number >= 0 (0 disables clipping)")
        if self.early_stopping_metric not in get_task(self.task).metrics:
            fail("early_stopping_metric", f"one of {get_task(self.task).metrics} for task {self.task!r}")
        if not self.lora_alpha > 0:
            fail("lora_alpha", "a positive number")
        if not 0.0 <= self.lora_dropout < 1.0:
            fail("lora_dropout", "a number in [0, 1)")
        if not 0.0 < self.layer_lr_decay <= 1.0:
            fail("layer_lr_decay", "a number in (0, 1]")
        if self.resume and self.overwrite:
            fail("overwrite", "False when resume=True (resume continues the run that overwrite would delete)")
        if self.finetune_mode == "lora" and self.init_from is None:
            fail("init_from", "a pretrained checkpoint when finetune_mode='lora' (LoRA adapts a base model, and "
                              "the run saves only the adapter, on top of it)")
        if self.finetune_mode in ADAPTER_MODES and self.init_from is None:
            fail("init_from", f"a pretrained checkpoint when finetune_mode={self.finetune_mode!r} (it adapts a base "
                              f"model, and the run saves only what it trains, on top of it)")
        self._check_adalora(fail)
        if self.finetune_mode == "freeze" and self.freeze_layers == 0:
            fail("freeze_layers", "an integer >= 1 when finetune_mode='freeze'")

    def _check_adalora(self, fail) -> None:
        """The adalora_* fields (only when finetune_mode="adalora")."""
        if self.finetune_mode != "adalora":
            return
        if self.init_from is None:
            fail("init_from", "a pretrained checkpoint when finetune_mode='adalora' (AdaLoRA adapts a base model, "
                              "and the run saves only the adapter, on top of it)")
        if self.max_steps == 0:
            fail("max_steps", "a positive number of steps when finetune_mode='adalora' (its rank budget schedule "
                              "is laid out over max_steps)")
        if self.adalora_target_rank > self.adalora_init_rank:
            fail("adalora_target_rank", f"an integer in [1, adalora_init_rank={self.adalora_init_rank}]")
        if not (self.adalora_ortho_weight >= 0 and math.isfinite(self.adalora_ortho_weight)):
            fail("adalora_ortho_weight", "a finite number >= 0")
        for name in ("adalora_beta1", "adalora_beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                fail(name, "a number in (0, 1)")
        if self.adalora_warmup_steps + self.adalora_final_steps >= self.max_steps:
            fail("adalora_final_steps", f"fewer than max_steps - adalora_warmup_steps = "
                                        f"{self.max_steps - self.adalora_warmup_steps} (the budget needs steps to shrink)")

    def fields_without_effect(self) -> dict[str, str]:
        """{field: why} for the fields this config sets aside (LoRA's rank outside LoRA mode...): a
        value given for one of them would be ignored, so the CLI refuses it."""
        unused = {}
        if self.finetune_mode != "lora":
            unused.update(dict.fromkeys(("lora_rank", "lora_alpha", "lora_dropout"), "finetune_mode is not 'lora'"))
        if self.finetune_mode == "adalora":
            unused["lora_rank"] = "finetune_mode is 'adalora' (its ranks are adalora_init_rank and adalora_target_rank)"
            del unused["lora_alpha"], unused["lora_dropout"]
        else:
            unused.update(dict.fromkeys([f.name for f in dataclasses.fields(self) if f.name.startswith("adalora_")],
                                        "finetune_mode is not 'adalora'"))
        if self.finetune_mode != "freeze":
            unused["freeze_layers"] = "finetune_mode is not 'freeze'"
        if self.finetune_mode != "adapter":
            unused["adapter_size"] = "finetune_mode is not 'adapter'"
        if self.finetune_mode != "prefix":
            unused.update(dict.fromkeys(("prefix_length", "prefix_hidden"), "finetune_mode is not 'prefix'"))
        if self.finetune_mode not in ("prompt", "deep-prompt"):
            unused["prompt_length"] = "finetune_mode is not 'prompt' or 'deep-prompt'"
        if self.init_from is None or not get_task(self.task).new_head:
            why = "there is no pretrained body to probe (init_from is none)" if self.init_from is None else \
                f"task {self.task!r} has no new head to probe"
            unused.update(dict.fromkeys(("probe_steps", "probe_lr"), why))
        elif self.probe_steps == 0:
            unused["probe_lr"] = "probe_steps is 0"
        if self.schedule == "constant":
            unused["min_lr_ratio"] = "schedule is 'constant'"
        if self.schedule != "wsd":
            unused["cooldown_fraction"] = f"schedule is {self.schedule!r}, not 'wsd'"
        return unused

    @property
    def virtual_tokens(self) -> tuple[str, int] | None:
        """(field, P) of the soft prompt or prefix this run puts before every sequence, or None."""
        if self.finetune_mode == "prefix":
            return "prefix_length", self.prefix_length
        if self.finetune_mode in ("prompt", "deep-prompt"):
            return "prompt_length", self.prompt_length
        return None

    @property
    def time_fitted(self) -> bool:
        """True when the schedule's horizon is the max_minutes budget (max_steps=0), not max_steps."""
        return self.max_steps == 0

    @property
    def min_lr(self) -> float:
        """Learning rate at the end of the schedule."""
        return self.lr * self.min_lr_ratio

    def to_dict(self) -> dict:
        """Plain dict (for config.json beside a checkpoint)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build from a dict (a TOML table, a saved config); unknown keys are a ValueError naming them."""
        return config_from_dict(cls, values)


def resume_differences(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(harmless, refused) differences between a run's saved configs (config.json: section ->
    dict) and the configs it resumes with (section -> config object), each as
    "section.field: saved -> now". LAUNCH_FIELDS are not compared; HARMLESS_ON_RESUME ones are
    harmless; fields a saved config does not have (written by an older minillm) are skipped."""
    harmless, refused = [], []
    for section, config in current.items():
        if not dataclasses.is_dataclass(config) or not isinstance(saved.get(section), dict):
            continue
        before, now = _comparable(saved[section]), _comparable(dataclasses.asdict(config))
        for name, value in now.items():
            if name in LAUNCH_FIELDS.get(section, ()) or name not in before or before[name] == value:
                continue
            line = f"{section}.{name}: {before[name]!r} -> {value!r}"
            (harmless if name in HARMLESS_ON_RESUME.get(section, ()) else refused).append(line)
    return harmless, refused


def _comparable(values: dict) -> dict:
    """Config values with defaults resolved (d_ff None is 4 * d_model) and tuples as lists."""
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    if values.get("d_model") is not None and "d_ff" in values:
        values["d_ff"] = values["d_ff"] or 4 * values["d_model"]
    if "n_kv_heads" in values:
        values["n_kv_heads"] = values["n_kv_heads"] or values.get("n_heads")
    if "n_decoder_layers" in values:
        values["n_decoder_layers"] = values["n_decoder_layers"] or values.get("n_layers")
    return values
