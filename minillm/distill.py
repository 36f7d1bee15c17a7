"""Knowledge distillation: train a smaller student on a trained teacher's soft targets.

Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network". With teacher
logits z_t, student logits z_s and a temperature T, every position that has a label contributes

    L = alpha * T^2 * KL( softmax(z_t / T) || softmax(z_s / T) ) + (1 - alpha) * CE(z_s, y)

The T^2 keeps the soft term's gradients the same size as the hard term's when T changes: the
gradient of the KL with respect to z_s is (softmax(z_s / T) - softmax(z_t / T)) / T, and it
shrinks again by about 1 / T as the softened distributions flatten, so T^2 puts it back.

Optionally (``DistillConfig.hidden_weight > 0``) the student's block outputs also learn to match
the teacher's, through one learned linear projection per student block (C_s -> C_t), with a
mean squared error over real tokens (TinyBERT's hidden-state loss, Jiao et al., 2020):

    L_hidden = hidden_weight * sum_l mean_tokens || W_l h_s^(l) - h_t^(m(l)) ||^2 / C_t

where m(l) is the teacher block matched to student block l (``hidden_layers``, by default spread
evenly: the last student block meets the last teacher block). The projections are a training aid:
they are trained with the student and dropped afterwards.

Supported tasks: causal-lm (every next-token position with a label), mlm (the masked positions),
mlm-nsp (the masked positions, and the NSP pair logits as a second distilled term) and
classification (one distribution per example; regression, num_labels=1, is refused). Padding
and positions without labels never count. The teacher runs in eval mode under ``torch.no_grad``:
only the student (and the projections) receive gradients.

A student is the teacher's architecture with some fields changed (fewer layers, narrower). It may
start from the teacher's weights (``init_from_teacher``) only when it differs from the teacher in
n_layers alone: then its blocks are copies of teacher blocks (``init_layers="spread"``: every
other one, or evenly spaced; ``"first"``: the first k), and the embeddings, final norm and heads
are the teacher's. A narrower student cannot copy and is refused.

Not supported: encoder-decoder and XLNet tasks (span-corruption, seq2seq, permutation-lm), a
teacher of another vocabulary than the student, resuming a distillation run.

    minillm distill --teacher runs/pretrain-gpt --model.n_layers=2 --distill.temperature=2
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm import checkpoint as ckpt
from minillm.config import ModelConfig, check_field_types
from minillm.data import DataConfig
from minillm.metrics import IGNORE_INDEX
from minillm.model import Block
from minillm.tasks import Task, get_task
from minillm.train_config import TrainConfig
from minillm.trainer import Trainer

DISTILLABLE_TASKS = ("causal-lm", "mlm", "mlm-nsp", "classification")
INIT_LAYERS = ("spread", "first")


@dataclass
class DistillConfig:
    """How a student learns from its teacher (the ``[distill]`` section of a distillation run)."""

    teacher: str = ""
    """The teacher: a minillm checkpoint or run directory (its task, data and tokenizer are the student's)."""
    temperature: float = 2.0
    """T: both distributions are softmax(z / T); higher T shows more of the teacher's ranking of wrong answers."""
    alpha: float = 0.5
    """Weight of the soft (teacher) term; 1 - alpha weighs the hard-label loss. 1: teacher only."""
    hidden_weight: float = 0.0
    """Weight of the hidden-state matching term; 0 turns it off."""
    hidden_layers: list[int] | None = None
    """hidden_weight > 0: for each student block, the teacher block it matches (0-based); None: spread evenly."""
    init_from_teacher: bool = False
    """Start the student from the teacher's weights (needs the same architecture but for n_layers)."""
    init_layers: str = "spread"
    """init_from_teacher: which teacher blocks the student's copy: "spread" (evenly spaced: every other
    one for half as many) or "first" (the first n_layers)."""

    def __post_init__(self) -> None:
        check_field_types(self)

        def fail(name: str, expected: str) -> None:
            raise ValueError(f"DistillConfig.{name}: got {getattr(self, name)!r}, expected {expected}")

        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            fail("temperature", "a positive finite number")
        if not 0.0 <= self.alpha <= 1.0:
            fail("alpha", "a number in [0, 1]")
        if not (self.hidden_weight >= 0 and math.isfinite(self.hidden_weight)):
            fail("hidden_weight", "a number >= 0 (0 turns hidden-state matching off)")
        if self.hidden_layers is not None and any(i < 0 for i in self.hidden_layers):
            fail("hidden_layers", "None or a list of teacher block indices >= 0")
        if self.init_layers not in INIT_LAYERS:
            fail("init_layers", f"one of {INIT_LAYERS}")

    def fields_without_effect(self) -> dict[str, str]:
        """{field: why} for the fields that this config sets aside."""
        unused = {}
        if self.hidden_weight == 0:
            unused["hidden_layers"] = "hidden_weight is 0"
        if not self.init_from_teacher:
            unused["init_layers"] = "init_from_teacher is false"
        return unused


# =============================================================================================
# The loss
# =============================================================================================


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), summed over the rows (N, V) -> ()."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"teacher_logits: expected the student's shape {tuple(student_logits.shape)}, got "
                         f"{tuple(teacher_logits.shape)}")
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, V)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (N, V)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum()  # sum_rows sum_v p_t (log p_t - log p_s)
    return temperature ** 2 * kl


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float, alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL + (1 - alpha) * cross-entropy, summed over the rows whose label is not
    IGNORE_INDEX. Logits (N, V), labels (N,). Divide by the number of labelled rows for the mean."""
    keep = labels != IGNORE_INDEX  # (N,)
    soft = soft_target_loss(student_logits[keep], teacher_logits[keep], temperature)
    hard = F.cross_entropy(student_logits[keep].float(), labels[keep], reduction="sum")
    return alpha * soft + (1 - alpha) * hard


# =============================================================================================
# The task that trains the student: the teacher's task, with the teacher's soft targets
# =============================================================================================


def blocks_of(model: nn.Module) -> list[Block]:
    """The Transformer blocks of a task model, in order (a GPT's, a BERT's, a classifier's body)."""
    return [module for module in model.modules() if isinstance(module, Block)]


def spread(n_student: int, n_teacher: int) -> list[int]:
    """Teacher block for each of n_student blocks, evenly spaced and ending on the last: 2 of 4 -> [1, 3]."""
    return [round((i + 1) * n_teacher / n_student) - 1 for i in range(n_student)]


class _BlockOutputs:
    """Forward hooks that keep each block's output (B, T, C) of the latest forward pass."""

    def __init__(self, model: nn.Module):
        self.outputs: list[torch.Tensor | None] = []
        self.handles = []
        for i, block in enumerate(blocks_of(model)):
            self.outputs.append(None)
            self.handles.append(block.register_forward_hook(self._keeper(i)))

    def _keeper(self, i: int):
        def keep(module, inputs, output):
            self.outputs[i] = output[0] if isinstance(output, tuple) else output

        return keep


class DistillationTask(Task):
    """The teacher's task with the distillation loss: the student's training loss only. The
    evaluation, metrics and report stay the base task's, on hard labels, so the student's figures
    compare with a model trained without a teacher."""

    def __init__(self, base: Task, teacher: nn.Module, config: DistillConfig, student: nn.Module):
        if base.name not in DISTILLABLE_TASKS:
            raise ValueError(f"TrainConfig.task: distillation supports {DISTILLABLE_TASKS}, got {base.name!r}")
        self.base, self.teacher, self.config = base, teacher.eval(), config
        for param in self.teacher.parameters():
            param.requires_grad_(False)
        self.name, self.model_class, self.architectures = base.name, base.model_class, base.architectures
        self.metrics, self.tally_keys = base.metrics, base.tally_keys
        self.loss_terms = base.loss_terms + (("hidden",) if config.hidden_weight > 0 else ())
        self.projections = nn.ModuleList()
        self.layer_map: list[int] = []
        if config.hidden_weight > 0:
            n_student, n_teacher = len(blocks_of(student)), len(blocks_of(teacher))
            self.layer_map = list(config.hidden_layers) if config.hidden_layers is not None else spread(n_student, n_teacher)
            if len(self.layer_map) != n_student or max(self.layer_map) >= n_teacher:
                raise ValueError(f"DistillConfig.hidden_layers: got {config.hidden_layers}, expected {n_student} "
                                 f"teacher block indices (one per student block), each in [0, {n_teacher})")
            width_s, width_t = student.config.d_model, teacher.config.d_model
            self.projections = nn.ModuleList(nn.Linear(width_s, width_t, bias=False) for _ in range(n_student))
            self.student_blocks, self.teacher_blocks = _BlockOutputs(student), _BlockOutputs(teacher)

    # the base task decides everything but the training loss
    def check_model(self, model):
        self.base.check_model(model)

    def tokens(self, batch):
        return self.base.tokens(batch)

    def new_tally(self, model):
        return self.base.new_tally(model)

    def tally(self, out, batch):
        return self.base.tally(out, batch)

    def scores(self, losses, tally):
        return self.base.scores(losses, tally)

    def target_counts(self, batch):
        counts = self.base.target_counts(batch)
        if self.layer_map:
            counts["hidden"] = self._real_tokens(batch).sum() * len(self.layer_map)
        return counts

    @staticmethod
    def _real_tokens(batch: dict) -> torch.Tensor:
        mask = batch.get("attention_mask")
        return torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask.bool()  # (B, T)

    def forward(self, model, batch):
        out, hard = self.base.forward(model, batch)
        with torch.no_grad():
            teacher_out, _ = self.base.forward(self.teacher, batch)
        T, alpha = self.config.temperature, self.config.alpha
        name = self.base.name
        if name == "causal-lm":
            labels = batch["labels"][:, 1:]  # position t predicts token t + 1
            student, teacher = out.logits[:, :-1], teacher_out.logits[:, :-1]  # (B, T-1, V)
            soft = {"loss": soft_target_loss(student[labels != IGNORE_INDEX], teacher[labels != IGNORE_INDEX], T)}
        elif name in ("mlm", "mlm-nsp"):  # masked_logits_only: logits (N, V) of the labelled positions already
            soft = {self.base.loss_terms[0]: soft_target_loss(out.logits, teacher_out.logits, T)}
            if name == "mlm-nsp":
                keep = batch["next_sentence_label"] != IGNORE_INDEX
                soft["nsp"] = soft_target_loss(out.nsp_logits[keep], teacher_out.nsp_logits[keep], T)
        else:  # classification: one distribution per example
            keep = batch["labels"] != IGNORE_INDEX
            soft = {"loss": soft_target_loss(out.logits[keep], teacher_out.logits[keep], T)}
        terms = {term: alpha * soft[term] + (1 - alpha) * hard[term] for term in hard}
        if self.layer_map:
            terms["hidden"] = self.config.hidden_weight * self._hidden_loss(batch)
        return out, terms

    def _hidden_loss(self, batch: dict) -> torch.Tensor:
        """Summed over real tokens and matched blocks: || W_l h_s - h_t ||^2 / C_t."""
        real = self._real_tokens(batch)  # (B, T)
        total = torch.zeros((), device=real.device)
        for l, m in enumerate(self.layer_map):
            student = self.projections[l](self.student_blocks.outputs[l].float())  # (B, T, C_t)
            teacher = self.teacher_blocks.outputs[m].float()  # (B, T, C_t), computed under no_grad
            total = total + ((student - teacher) ** 2).mean(-1)[real].sum()
        return total


class DistillTrainer(Trainer):
    """The Trainer, with the student's loss from a DistillationTask and its evaluation from the base task."""

    def __init__(self, student, teacher, distill: DistillConfig, config: TrainConfig, train_data, eval_data=None,
                 **options):
        if config.resume:
            raise ValueError("TrainConfig.resume: a distillation run cannot be resumed (its hidden-state "
                             "projections are not checkpointed); start it afresh with overwrite=true")
        super().__init__(student, config, train_data, eval_data, **options)
        self.base_task = self.task
        self.task = DistillationTask(self.base_task, teacher.to(self.device), distill, self.raw_model)
        if len(self.task.projections):
            self.task.projections.to(self.device)
            self.optimizer.add_param_group({"params": list(self.task.projections.parameters()),
                                            "weight_decay": 0.0, "lr_scale": 1.0})

    def evaluate(self) -> dict:
        task, self.task = self.task, self.base_task  # held-out figures on hard labels, as without a teacher
        try:
            return super().evaluate()
        finally:
            self.task = task


# =============================================================================================
# The student
# =============================================================================================


def student_config(teacher: ModelConfig, overrides: dict) -> ModelConfig:
    """The teacher's architecture with ``overrides`` ({field: value}); the vocabulary stays the teacher's."""
    for name in ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id"):
        if name in overrides and overrides[name] != getattr(teacher, name):
            raise ValueError(f"ModelConfig.{name}: the student must share the teacher's vocabulary and special ids "
                             f"({name}={getattr(teacher, name)}), got {overrides[name]!r}")
    return ModelConfig.from_dict({**teacher.to_dict(), **overrides})


def init_from_teacher(student: nn.Module, teacher: nn.Module, how: str = "spread") -> list[int]:
    """Copy the teacher's weights into a student that differs from it in n_layers only; returns
    the teacher block each student block was copied from."""
    s, t = student.config, teacher.config
    differ = [f"{f.name} ({getattr(s, f.name)!r} vs the teacher's {getattr(t, f.name)!r})"
              for f in dataclasses.fields(ModelConfig) if f.name not in ("n_layers",) + ckpt.RUNTIME_FIELDS
              and getattr(s, f.name) != getattr(t, f.name)]
    if differ:
        raise ValueError(f"DistillConfig.init_from_teacher: the student differs from the teacher in {', '.join(differ)}; "
                         f"only a student with fewer layers and otherwise the teacher's shape can copy its layers; "
                         f"set init_from_teacher=false")
    if s.n_layers > t.n_layers:
        raise ValueError(f"DistillConfig.init_from_teacher: the student has {s.n_layers} layers, the teacher only "
                         f"{t.n_layers}; a student copies a subset of the teacher's blocks")
    if how not in INIT_LAYERS:
        raise ValueError(f"init_layers: got {how!r}, expected one of {INIT_LAYERS}")
    chosen = list(range(s.n_layers)) if how == "first" else [i * t.n_layers // s.n_layers for i in range(s.n_layers)]
    teacher_blocks, student_blocks = blocks_of(teacher), blocks_of(student)
    with torch.no_grad():
        for name, param in student.named_parameters():  # everything outside the blocks: embeddings, norm, heads
            if ".blocks." not in name:
                param.copy_(dict(teacher.named_parameters(remove_duplicate=False))[name])
        for student_block, i in zip(student_blocks, chosen):
            student_block.load_state_dict(teacher_blocks[i].state_dict())
    return chosen


# =============================================================================================
# The run
# =============================================================================================

SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "distill": DistillConfig}
# Fields of the teacher's TrainConfig that describe how the teacher was started, not the student.
RESET_TRAIN = {"init_from": None, "resume": False, "probe_steps": 0, "finetune_mode": "full", "freeze_layers": 0,
               "layer_lr_decay": 1.0}


def load_teacher(path: str | Path):
    """(teacher model, its saved configs, its tokenizer, its checkpoint directory)."""
    try:
        checkpoint = ckpt.resolve_checkpoint(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"DistillConfig.teacher: {err}") from None
    teacher, configs, tokenizer = ckpt.load_model(checkpoint)
    if tokenizer is None:
        raise ValueError(f"DistillConfig.teacher: {checkpoint} has no tokenizer to read the data with")
    if configs["task"] not in DISTILLABLE_TASKS:
        raise ValueError(f"DistillConfig.teacher: {checkpoint} was trained on task {configs['task']!r}; "
                         f"distillation supports {DISTILLABLE_TASKS}")
    return teacher, configs, tokenizer, checkpoint


def distill(distill_config: DistillConfig, model_overrides: dict | None = None, train_overrides: dict | None = None,
            *, echo=print) -> dict:
    """Train a student of the teacher ``distill_config.teacher`` on the teacher's task and data.

    model_overrides: ModelConfig fields of the student ({"n_layers": 2}); the rest is the teacher's.
    train_overrides: TrainConfig fields on top of the teacher's saved ones (out_dir defaults to
    runs/distill). Returns {"summary" (Trainer.fit), "metrics" (the last evaluation, hard labels),
    "out_dir", "parameters", "teacher_parameters", "student", "initialised_from" (teacher blocks or None)}.
    """
    from minillm import recipes

    if not isinstance(distill_config, DistillConfig):
        raise TypeError(f"distill_config: expected a DistillConfig, got {type(distill_config).__name__}")
    if not distill_config.teacher:
        raise ValueError("DistillConfig.teacher: got '', expected a checkpoint or run directory")
    teacher, saved, tokenizer, checkpoint = load_teacher(distill_config.teacher)
    task = get_task(saved["task"])
    model = student_config(teacher.config, dict(model_overrides or {}))
    data = DataConfig.from_dict({**saved.get("data", {}), "tokenizer": str(checkpoint)})
    train_values = {**saved.get("train", {}), **RESET_TRAIN, "out_dir": "runs/distill", "task": task.name}
    train = TrainConfig.from_dict({**train_values, **(train_overrides or {})})
    if train.task != task.name:
        raise ValueError(f"TrainConfig.task: the student learns the teacher's task {task.name!r}, got {train.task!r}")
    for name, why in train.fields_without_effect().items():
        if name in (train_overrides or {}):
            raise ValueError(f"TrainConfig.{name}: got {train_overrides[name]!r}, which would have no effect: {why}")
    recipes._check_run_can_start(train)
    if task.from_corpus:
        recipes.prepare_data(data, progress=False)
    task.check(model, data)
    samples = train.max_steps * train.batch_size * train.grad_accum_steps
    task_data = task.datasets(data, tokenizer, model, samples)
    model = task.configure_model(model, task_data)
    torch.manual_seed(train.seed)
    student = task.build_model(model)
    chosen = init_from_teacher(student, teacher, distill_config.init_layers) if distill_config.init_from_teacher else None
    echo(f"teacher: {checkpoint} ({teacher.num_parameters():,} parameters); student: {model.n_layers} layers of "
         f"{model.d_model} ({student.num_parameters():,} parameters), "
         + (f"blocks copied from teacher blocks {chosen}" if chosen else "from scratch")
         + f"; T={distill_config.temperature:g}, alpha={distill_config.alpha:g}")
    saved_configs = {"data": data, "distill": distill_config}
    if task_data.labels is not None:
        saved_configs["labels"] = task_data.labels
    trainer = DistillTrainer(student, teacher, distill_config, train, task_data.train, task_data.validation,
                             collate_fn=task_data.collate, configs_to_save=saved_configs, tokenizer=tokenizer)
    summary = trainer.fit()
    metrics = {k: v for k, v in (summary["final"] or {}).items() if k != "step"}
    echo(f"student trained {summary['steps']} steps; validation "
         + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f"; checkpoint in {trainer.out_dir}")
    return {"summary": summary, "metrics": metrics, "out_dir": str(trainer.out_dir),
            "parameters": student.num_parameters(), "teacher_parameters": teacher.num_parameters(),
            "student": model, "initialised_from": chosen}
