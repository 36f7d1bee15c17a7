"""AdamW over the model's parameter groups, layer-wise LR decay, and the learning-rate schedule.

Which parameters decay is the model's business (`Model.optimizer_groups`: matrices decay;
biases, norm weights and embeddings do not). This module only splits those groups further by
depth when layer-wise LR decay is asked for, and computes the learning rate of a step.

Schedule: a plain function of the step (and, when time-fitted, of the elapsed training time,
which the checkpoint saves), so a resumed run needs no scheduler state. Every schedule decays
the peak ``lr`` to ``min_lr`` by a factor f of the progress p in [0, 1] through its horizon:

    cosine: f = (1 + cos(pi p)) / 2     linear: f = 1 - p     constant: f = 1
    wsd (warmup-stable-decay): f = 1 for p < 1 - c, then (1 - p) / c   (c = cooldown_fraction)

Step horizon (max_steps > 0), the progress counts the steps after warmup:

    step <  warmup:   lr * (step + 1) / warmup                          linear warmup
    step >= warmup:   min_lr + (lr - min_lr) * f(p),  p = (step - warmup) / (max_steps - warmup)

Time horizon (max_steps = 0, "time-fitted"): the horizon is the budget of max_minutes, so the
decay ends with the run instead of being cut by it. With t the training time at which the step
is expected to end (seconds, resumes included: the Trainer adds the last step's duration to the
time the step starts, so the step that ends the budget runs at min_lr) and B = 60 * max_minutes:

    lr(step, t) = min(warmup(step), min_lr + (lr - min_lr) * f(t / B))
    warmup(step) = lr * min(1, (step + 1) / warmup)

The warmup is still counted in steps (how many noisy Adam updates to ramp over does not depend
on the machine); the min() hands over from the warmup ramp to the decay wherever they cross.
WSD is the natural time-fitted schedule: the rate stays at its peak for most of the budget and
the cooldown always gets its last fraction c of the minutes (Hu et al., 2024, MiniCPM; Hägele
et al., 2024), whatever the throughput of the machine turns out to be.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn

from minillm.train_config import TrainConfig


def lr_at(step: int, config: TrainConfig, elapsed_s: float | None = None) -> float:
    """Learning rate of optimizer step `step` (0-based). A time-fitted config (max_steps=0) also
    needs `elapsed_s`, the training time the step is taken at (module docstring); a step-horizon
    config ignores it."""
    if config.time_fitted:
        if elapsed_s is None or not elapsed_s >= 0:
            raise ValueError(f"lr_at: a time-fitted schedule (max_steps=0) needs elapsed_s >= 0 seconds, "
                             f"got {elapsed_s!r}")
        warmup = config.lr * min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else config.lr
        return min(warmup, decayed_lr(elapsed_s / (60 * config.max_minutes), config))
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = max(1, config.max_steps - config.warmup_steps)
    return decayed_lr((step - config.warmup_steps) / decay_steps, config)


def decayed_lr(progress: float, config: TrainConfig) -> float:
    """min_lr + (lr - min_lr) * f(progress), f the schedule's decay (module docstring); progress
    is clipped to [0, 1], so the rate stays at min_lr past the horizon."""
    p = min(1.0, max(0.0, progress))
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * p))
    elif config.schedule == "linear":
        factor = 1.0 - p
    else:  # wsd: stable at the peak, then a linear cooldown over the last cooldown_fraction
        factor = min(1.0, (1.0 - p) / config.cooldown_fraction)
    return config.min_lr + (config.lr - config.min_lr) * factor


_BLOCK = re.compile(r"(?:^|\.)(encoder|decoder|body)\.blocks\.(\d+)\.")


def layer_depth(name: str, model: nn.Module) -> int:
    """Depth of a parameter for layer-wise LR decay: 0 embeddings, i + 1 block i, L + 1 the rest
    (final norm, pooler, heads). An encoder-decoder counts its decoder blocks after the encoder's."""
    n_encoder = model.config.n_layers
    match = _BLOCK.search(name)
    if match:
        offset = n_encoder if match.group(1) == "decoder" and model.config.arch == "encoder-decoder" else 0
        return offset + int(match.group(2)) + 1
    if ".embeddings." in f".{name}":
        return 0
    return total_depth(model)


def total_depth(model: nn.Module) -> int:
    """L + 1: the depth of the heads (L = all blocks of the model)."""
    config = model.config
    return config.n_layers + (config.decoder_layers if config.arch == "encoder-decoder" else 0) + 1


def parameter_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """The model's decay/no-decay groups, each split by depth when layer_lr_decay < 1.

    Every group carries "lr_scale", the factor `apply_lr` multiplies the scheduled rate by.
    Frozen parameters (requires_grad=False) are left out.
    """
    base = model.optimizer_groups(config.weight_decay)
    if config.layer_lr_decay == 1.0:
        return [dict(group, lr_scale=1.0) for group in base if group["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    top = total_depth(model)
    groups: dict[tuple[float, int], dict] = {}
    for group in base:
        for param in group["params"]:
            depth = layer_depth(names[id(param)], model)
            key = (group["weight_decay"], depth)
            if key not in groups:
                groups[key] = {"params": [], "weight_decay": group["weight_decay"],
                               "lr_scale": config.layer_lr_decay ** (top - depth)}
            groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[1], k[0]))]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter, 2019) over `parameter_groups`.

    torch's fused kernel, on CUDA and on CPU: one pass over each group's parameters instead of a
    Python loop over them (for the tiny preset on 2 CPU cores, 0.5 ms a step against 2.2 ms for
    the multi-tensor foreach path; see benchmarks/step.py). Devices without a fused kernel take
    the foreach path.
    """
    groups = parameter_groups(model, config)
    if not groups:
        raise ValueError("build_optimizer: the model has no trainable parameters (check finetune_mode)")
    device = next(iter(groups[0]["params"])).device.type
    speed = {"fused": True} if device in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps, **speed)


def apply_lr(optimizer: torch.optim.Optimizer, step: int, config: TrainConfig, elapsed_s: float | None = None) -> float:
    """Set every group's lr for `step` (at `elapsed_s` seconds of training, for a time-fitted
    schedule); returns the unscaled rate (what the log shows)."""
    lr = lr_at(step, config, elapsed_s)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def schedule_cut(config: TrainConfig, step: int, lr: float) -> str | None:
    """What to say when max_minutes ends a run at ``step``, before max_steps: the schedule's
    horizon is max_steps, so the learning rate (``lr`` at the last step) never finished its decay;
    and what max_steps fits the budget. None when nothing was left undecayed (a time-fitted
    schedule's horizon is the budget itself)."""
    if config.schedule == "constant" or config.time_fitted or step >= config.max_steps:
        return None
    return (f"TrainConfig.max_minutes={config.max_minutes:g} stopped the run at step {step} of "
            f"max_steps={config.max_steps}: the learning rate was still {lr:.3g} (the schedule decays it to "
            f"{config.min_lr:.3g} at step {config.max_steps}). For a schedule that finishes within this budget on "
            f"this machine, set max_steps=0 (--train.max_steps=0: the schedule then spans max_minutes), "
            f"or max_steps={step}, or raise max_minutes")


def schedule_summary(config: TrainConfig, last_lr: float, elapsed_s: float, steps: int | None = None) -> str:
    """One line for the report: the schedule's horizon and how far its decay got by the last step
    (step ``steps``, run at ``last_lr``, after ``elapsed_s`` seconds of training). A run that ended
    within its warmup says so: its low last rate is the ramp's, not a finished decay."""
    if config.time_fitted:
        horizon = f"time-fitted to max_minutes={config.max_minutes:g} ({elapsed_s / 60:.2f} min trained)"
    else:
        horizon = f"over max_steps={config.max_steps}"
    if config.schedule == "constant" or config.lr == config.min_lr:
        return f"learning rate: {config.schedule} {horizon}, last step at lr {last_lr:.3g}"
    if steps is not None and steps < config.warmup_steps:
        return (f"learning rate: {config.schedule} {horizon}; the run ended in its warmup (step {steps} of "
                f"warmup_steps={config.warmup_steps}) at lr {last_lr:.3g}: NOT decayed, the peak {config.lr:.3g} "
                f"was never reached")
    done = (config.lr - last_lr) / (config.lr - config.min_lr)
    return (f"learning rate: {config.schedule} {horizon}; the last step ran at lr {last_lr:.3g} (peak {config.lr:.3g}, "
            f"min_lr {config.min_lr:.3g}): {'ended decayed' if done >= 0.95 else 'NOT decayed'}, {done:.0%} of the "
            f"decay done")
