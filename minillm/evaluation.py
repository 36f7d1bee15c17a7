"""Evaluation: a model's loss and its task's metrics over held-out batches.

One free function serves the trainer (every ``eval_every`` steps), the report at the end of a
run and ``minillm evaluate``. It sums the loss terms and their target counts over all batches
(and all ranks under DDP) before dividing, so the figures are exact means over the whole set,
however it is split into batches or processes; what else is counted (correct tokens, a confusion
matrix) is the task's tally (:mod:`minillm.tasks`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from minillm import distributed
from minillm.batches import to_device
from minillm.tasks import Task, get_task


@torch.no_grad()
def evaluate(model, task: Task | str, batches: Iterable[dict], *, dtype: torch.dtype = torch.float32,
             max_batches: int = 0) -> dict[str, float]:
    """{"val_loss", ...the task's metrics} of ``model`` over ``batches`` (the first ``max_batches``
    when > 0), for ``task`` (a Task or its name). The model runs on its own device, in eval mode,
    and is put back as it was; ``dtype`` is the autocast precision (fp32: none)."""
    if isinstance(task, str):
        task = get_task(task, "task")
    if not isinstance(task, Task):
        raise TypeError(f"task: expected a minillm.tasks.Task or a task name, got {type(task).__name__}")
    task.check_model(model)
    if not isinstance(max_batches, int) or max_batches < 0:
        raise ValueError(f"max_batches: expected an integer >= 0 (0 = every batch), got {max_batches!r}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = {term: torch.zeros((), device=device, dtype=torch.float64) for term in task.loss_terms}
    counts = {term: torch.zeros((), device=device, dtype=torch.float64) for term in task.loss_terms}
    tally = {key: value.to(device) for key, value in task.new_tally(model).items()}
    try:
        for i, batch in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            batch = to_device(batch, device)
            with distributed.autocast(device, dtype):
                out, terms = task.forward(model, batch)
            for term, n in task.target_counts(batch).items():
                sums[term] += terms[term].double()
                counts[term] += n
            for key, value in task.tally(out, batch).items():
                tally[key] += value.to(tally[key].dtype)
    finally:
        model.train(was_training)
    distributed.sum_tensors({**{f"sum:{k}": v for k, v in sums.items()}, **{f"n:{k}": v for k, v in counts.items()},
                             **tally})
    if counts[task.loss_terms[0]] == 0:
        raise ValueError("evaluate: the evaluation data gave no batch with targets")
    losses = {term: (sums[term] / counts[term].clamp(min=1)).item() for term in task.loss_terms}
    return task.scores(losses, tally)
