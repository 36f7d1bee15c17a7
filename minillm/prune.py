"""Pruning: remove the weights, attention heads or MLP channels a trained model needs least.

Unstructured magnitude pruning (Han et al., 2015) zeroes the fraction ``sparsity`` of the weights
of smallest |w| in the Transformer blocks' linear layers (attention projections, MLP), either
over all of them at once (``scope="global"``: a layer that matters less may lose more) or layer
by layer (``scope="layer"``: each loses the same fraction). Exactly round(sparsity * n) weights
are zeroed, ties broken by position. The tensors keep their shape: the zeros only pay off with a
sparse format or kernel, which minillm does not have. Embeddings, norms, biases and the task
heads are left dense.

Structured pruning removes whole attention heads or MLP hidden channels and really shrinks the
tensors. Importance follows Michel, Levy & Neubig (2019), "Are Sixteen Heads Really Better than
One?": put a gate xi_h = 1 on the output of each head h (on each hidden channel j of the MLP),
and score it by the loss's sensitivity to the gate, accumulated over a few batches b:

    I_h = sum_b | dL_b / d xi_h |        (L_b: the task's loss summed over batch b)

Michel et al. take the absolute value per example; per batch costs one backward pass per batch
instead of one per example, at the price of letting opposite signs within a batch cancel. A head
whose output the loss does not depend on scores 0 and goes first. ``importance="weight"``
scores instead by the L2 norm of the weights that read the unit's output (out_proj's columns of
the head, fc_out's column of the channel), which needs no data.

ModelConfig holds one n_heads and one d_ff for every block, so structured pruning removes the
same number of heads (channels) from every block, each block its own least important ones. The
pruned model's head dim is kept explicit (``d_head``), since n_heads * d_head then falls below
d_model. Supported: GPT and BERT bodies (causal-lm, mlm, mlm-nsp, classification) with one
key/value head per query head; not supported: grouped-query attention (a key/value head serves
several query heads), T5's relative position bias (one column per head), encoder-decoder and XLNet.

    minillm prune --checkpoint runs/pretrain-gpt --sparsity 0.5 --out runs/pruned
    minillm prune --checkpoint runs/pretrain-gpt --sparsity 0.5 --structured heads --finetune-steps 50 --out runs/pruned-heads
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from minillm.batches import to_device
from minillm.config import check_field_types
from minillm.model import Block, GatedMLP, MultiHeadAttention
from minillm.tasks import Task

SCOPES = ("global", "layer")
STRUCTURES = ("heads", "mlp")
IMPORTANCES = ("gradient", "weight")
# Fields of the source run's TrainConfig that describe how it was started, not the fine-tune after pruning.
RESET_TRAIN = {"init_from": None, "resume": False, "probe_steps": 0, "finetune_mode": "full", "freeze_layers": 0,
               "layer_lr_decay": 1.0}


def _check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity: got {sparsity!r}, expected a number in [0, 1) (the fraction removed)")
    return float(sparsity)


def _blocks(model: nn.Module) -> list[Block]:
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        raise TypeError(f"model: expected a minillm GPT or BERT task model (with Transformer blocks), got "
                        f"{type(model).__name__}")
    return blocks


# =============================================================================================
# Unstructured: magnitude
# =============================================================================================


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """{name: layer} of the linear layers inside the Transformer blocks (attention and MLP)."""
    _blocks(model)
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and ".blocks." in f".{name}"}


def _zero_smallest(weights: list[torch.Tensor], k: int) -> None:
    """Zero the k entries of smallest magnitude over all of ``weights`` together (in place)."""
    if k == 0:
        return
    flat = torch.cat([w.detach().abs().flatten() for w in weights])  # (n,)
    order = torch.argsort(flat, stable=True)[:k]  # ties: the earlier position goes first
    mask = torch.ones_like(flat, dtype=torch.bool)
    mask[order] = False
    start = 0
    for w in weights:
        n = w.numel()
        w.data.mul_(mask[start:start + n].view_as(w))
        start += n


@torch.no_grad()
def magnitude_prune(model: nn.Module, sparsity: float, scope: str = "global") -> dict[str, torch.Tensor]:
    """Zero the fraction ``sparsity`` of smallest-|w| weights of the blocks' linear layers.

    Returns {parameter name: bool mask, True where the weight is kept}, which
    :func:`keep_pruned` uses to hold the zeros through fine-tuning."""
    sparsity = _check_sparsity(sparsity)
    if scope not in SCOPES:
        raise ValueError(f"scope: got {scope!r}, expected one of {SCOPES}")
    layers = prunable_linears(model)
    weights = [layer.weight for layer in layers.values()]
    if scope == "global":
        _zero_smallest(weights, round(sparsity * sum(w.numel() for w in weights)))
    else:
        for w in weights:
            _zero_smallest([w], round(sparsity * w.numel()))
    return {f"{name}.weight": layer.weight != 0 for name, layer in layers.items()}


def keep_pruned(model: nn.Module, masks: dict[str, torch.Tensor]) -> list:
    """Hold pruned weights at zero while training: their gradients are masked, so AdamW never
    moves them (its update of a weight whose gradient was always 0 is 0, and decay keeps 0 at 0).
    Returns the hook handles (``handle.remove()`` ends it)."""
    params = dict(model.named_parameters())
    return [params[name].register_hook(lambda grad, keep=mask: grad * keep.to(grad.device, grad.dtype))
            for name, mask in masks.items()]


def sparsity_of(model: nn.Module) -> float:
    """Fraction of zeros among the weights of the blocks' linear layers."""
    weights = [layer.weight for layer in prunable_linears(model).values()]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


# =============================================================================================
# Structured: heads and MLP channels
# =============================================================================================


def _check_structured(model: nn.Module, structure: str) -> None:
    if structure not in STRUCTURES:
        raise ValueError(f"structured: got {structure!r}, expected one of {STRUCTURES}")
    config = model.config
    if config.arch not in ("encoder", "decoder"):
        raise ValueError(f"structured pruning: supports GPT and BERT bodies (arch 'decoder' or 'encoder'), got "
                         f"arch {config.arch!r}")
    if structure == "heads" and config.kv_heads != config.n_heads:
        raise ValueError(f"structured='heads': needs one key/value head per query head, got n_kv_heads="
                         f"{config.kv_heads} for n_heads={config.n_heads} (grouped-query attention)")
    if structure == "heads" and config.pos_encoding == "relative":
        raise ValueError("structured='heads': T5's relative position bias has one column per head and is not pruned")


def _unit_input(block: Block, structure: str) -> nn.Linear:
    """The linear layer that reads the pruned units: out_proj (heads side by side) or fc_out (channels)."""
    return block.attn.out_proj if structure == "heads" else block.mlp.fc_out


def _n_units(config, structure: str) -> int:
    return config.n_heads if structure == "heads" else config.ff_dim


def unit_importance(model: nn.Module, structure: str, task: Task | None = None, batches: Iterable[dict] | None = None,
                    importance: str = "gradient") -> torch.Tensor:
    """(n_layers, units) importance of every head (structure="heads") or MLP channel ("mlp").

    "gradient": Michel et al.'s |dL / d xi| summed over ``batches`` (the task's training loss,
    summed over each batch's targets), with a gate xi = 1 multiplying each unit's output. "weight":
    the L2 norm of the weights that read each unit (no data needed)."""
    _check_structured(model, structure)
    if importance not in IMPORTANCES:
        raise ValueError(f"importance: got {importance!r}, expected one of {IMPORTANCES}")
    blocks, config = _blocks(model), model.config
    units = _n_units(config, structure)
    if importance == "weight":
        scores = []
        for block in blocks:
            columns = _unit_input(block, structure).weight.detach().float()  # (C, units * width)
            scores.append(columns.reshape(columns.shape[0], units, -1).pow(2).sum((0, 2)).sqrt())  # (units,)
        return torch.stack(scores)
    if task is None or batches is None:
        raise ValueError("importance='gradient': needs the task and a few batches to measure the loss on")
    device = next(model.parameters()).device
    gates = torch.ones(len(blocks), units, device=device, requires_grad=True)  # xi: (L, units)

    def gate(layer: int):
        def apply(module, inputs):
            x = inputs[0]  # (B, T, units * width)
            return (x * gates[layer].repeat_interleave(x.shape[-1] // units),)

        return apply

    handles = [_unit_input(b, structure).register_forward_pre_hook(gate(i)) for i, b in enumerate(blocks)]
    scores = torch.zeros(len(blocks), units, dtype=torch.float64)
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in batches:
            _, terms = task.forward(model, to_device(batch, device))
            (grad,) = torch.autograd.grad(sum(terms.values()), gates)
            scores += grad.abs().double().cpu()
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("batches: got none; importance='gradient' needs at least one batch")
    return scores


def _keep_rows(layer: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    """A smaller copy of ``layer`` that computes only the outputs ``rows``."""
    new = nn.Linear(layer.in_features, len(rows), bias=layer.bias is not None)
    new.weight.data.copy_(layer.weight.data[rows])
    if layer.bias is not None:
        new.bias.data.copy_(layer.bias.data[rows])
    return new.to(layer.weight.device, layer.weight.dtype)


def _keep_columns(layer: nn.Linear, columns: torch.Tensor) -> nn.Linear:
    """A smaller copy of ``layer`` that reads only the inputs ``columns`` (its bias unchanged)."""
    new = nn.Linear(len(columns), layer.out_features, bias=layer.bias is not None)
    new.weight.data.copy_(layer.weight.data[:, columns])
    if layer.bias is not None:
        new.bias.data.copy_(layer.bias.data)
    return new.to(layer.weight.device, layer.weight.dtype)


@torch.no_grad()
def prune_units(model: nn.Module, structure: str, sparsity: float, scores: torch.Tensor) -> nn.Module:
    """Remove round(sparsity * units) heads or MLP channels from every block (at least one stays),
    the lowest ``scores`` (n_layers, units) of each block; returns ``model``, shrunk in place,
    with its config updated (n_heads and d_head, or d_ff)."""
    sparsity = _check_sparsity(sparsity)
    _check_structured(model, structure)
    blocks, config = _blocks(model), model.config
    units = _n_units(config, structure)
    if tuple(scores.shape) != (len(blocks), units):
        raise ValueError(f"scores: expected shape ({len(blocks)}, {units}), got {tuple(scores.shape)}")
    keep = max(1, units - round(sparsity * units))
    for block, block_scores in zip(blocks, scores):
        kept = torch.sort(torch.argsort(block_scores, descending=True, stable=True)[:keep]).values  # (keep,)
        if structure == "heads":
            attn: MultiHeadAttention = block.attn
            D = attn.head_dim
            rows = (kept[:, None] * D + torch.arange(D)[None, :]).flatten()  # (keep * D,) the heads' rows
            attn.q_proj, attn.k_proj, attn.v_proj = (_keep_rows(p, rows) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
            attn.out_proj = _keep_columns(attn.out_proj, rows)
            attn.n_heads = attn.n_kv_heads = keep
        else:
            mlp = block.mlp
            mlp.fc_in = _keep_rows(mlp.fc_in, kept)
            if isinstance(mlp, GatedMLP):
                mlp.fc_gate = _keep_rows(mlp.fc_gate, kept)
            mlp.fc_out = _keep_columns(mlp.fc_out, kept)
    if structure == "heads":
        new = {"n_heads": keep, "n_kv_heads": None, "d_head": config.head_dim}
    else:
        new = {"d_ff": keep}
    model.config = dataclasses.replace(config, **new)
    for module in model.modules():  # the stacks keep the config too
        if getattr(module, "config", None) is config:
            module.config = model.config
    return model


def structured_prune(model: nn.Module, structure: str, sparsity: float, task: Task | None = None,
                     batches: Iterable[dict] | None = None, importance: str = "gradient") -> torch.Tensor:
    """Score the units (:func:`unit_importance`) and remove the least important (:func:`prune_units`);
    returns the scores."""
    _check_sparsity(sparsity)
    scores = unit_importance(model, structure, task, batches, importance)
    prune_units(model, structure, sparsity, scores)
    return scores


# =============================================================================================
# Pruning a checkpoint (``minillm prune``)
# =============================================================================================


@dataclass
class PruneConfig:
    """What ``minillm prune`` did to a checkpoint (saved as the ``[prune]`` section of the result)."""

    checkpoint: str = ""
    """The pruned model's source: a minillm checkpoint or run directory."""
    sparsity: float = 0.5
    """Fraction removed: of the blocks' linear weights (unstructured), or of each block's heads or MLP channels."""
    structured: str | None = None
    """None: unstructured magnitude pruning; "heads" or "mlp": remove whole heads or MLP channels."""
    scope: str = "global"
    """Unstructured: rank the weights over all layers together ("global") or within each layer ("layer")."""
    importance: str = "gradient"
    """Structured: "gradient" (Michel et al.'s |dL/d gate| over importance_batches) or "weight" (weight norm)."""
    importance_batches: int = 8
    """Structured with importance="gradient": training batches the importance is summed over."""
    finetune_steps: int = 0
    """Optimizer steps of fine-tuning after pruning (the checkpoint's task, data and TrainConfig); 0: none.
    Unstructured pruning keeps its zeros through it (:func:`keep_pruned`)."""

    def __post_init__(self) -> None:
        check_field_types(self)

        def fail(name: str, expected: str) -> None:
            raise ValueError(f"PruneConfig.{name}: got {getattr(self, name)!r}, expected {expected}")

        if not self.checkpoint:
            fail("checkpoint", "a checkpoint or run directory")
        if not 0.0 <= self.sparsity < 1.0:
            fail("sparsity", "a number in [0, 1) (the fraction removed)")
        if self.structured is not None and self.structured not in STRUCTURES:
            fail("structured", f"None or one of {STRUCTURES}")
        if self.scope not in SCOPES:
            fail("scope", f"one of {SCOPES}")
        if self.importance not in IMPORTANCES:
            fail("importance", f"one of {IMPORTANCES}")
        if self.importance_batches < 1:
            fail("importance_batches", "an integer >= 1")
        if self.finetune_steps < 0:
            fail("finetune_steps", "an integer >= 0")

    def fields_without_effect(self) -> dict[str, str]:
        """{field: why} for the fields that this config sets aside."""
        if self.structured is None:
            return dict.fromkeys(("importance", "importance_batches"), "pruning is unstructured (structured is None)")
        unused = {"scope": "structured pruning removes the same number of units from every block"}
        if self.importance == "weight":
            unused["importance_batches"] = "importance is 'weight'"
        return unused


def prune_checkpoint(config: PruneConfig, out: str | Path, *, overwrite: bool = False, train_overrides: dict | None = None,
                     echo=print) -> dict:
    """Prune the model of ``config.checkpoint`` as ``config`` says and save it as a run in ``out``
    (``load_model``, ``evaluate`` and ``generate`` read it), fine-tuning it first when
    ``config.finetune_steps`` > 0 (``train_overrides``: TrainConfig fields for that). Returns
    {"out_dir", "checkpoint", "parameters_before", "parameters", "sparsity", "model_config", "summary"}."""
    from minillm import checkpoint as ckpt
    from minillm import recipes
    from minillm.batches import eval_batches
    from minillm.data import DataConfig
    from minillm.tasks import get_task
    from minillm.train_config import TrainConfig
    from minillm.trainer import Trainer

    if not isinstance(config, PruneConfig):
        raise TypeError(f"config: expected a PruneConfig, got {type(config).__name__}")
    try:
        source = ckpt.resolve_checkpoint(config.checkpoint)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"PruneConfig.checkpoint: {err}") from None
    model, saved, tokenizer = ckpt.load_model(source)
    task = get_task(saved["task"], f"{source}: task")
    if config.structured is not None:
        _check_structured(model, config.structured)
    else:
        prunable_linears(model)
    before = model.num_parameters()
    out = Path(out)
    needs_data = config.finetune_steps > 0 or (config.structured is not None and config.importance == "gradient")
    train = TrainConfig.from_dict({**saved.get("train", {}), **RESET_TRAIN, "out_dir": str(out), "overwrite": overwrite,
                                   "max_steps": max(config.finetune_steps, 1), "eval_every": 0, "checkpoint_every": 0,
                                   "warmup_steps": min(10, config.finetune_steps), "early_stopping_patience": 0,
                                   **(train_overrides or {})})
    recipes._check_run_can_start(train)
    task_data = data = None
    if needs_data:
        if tokenizer is None or "data" not in saved:
            raise ValueError(f"PruneConfig: {source} saved no tokenizer or data config, which importance='gradient' "
                             f"and finetune_steps need; use importance='weight' and finetune_steps=0")
        data = DataConfig.from_dict({**saved["data"], "tokenizer": str(source)})
        if task.from_corpus:
            recipes.prepare_data(data, progress=False)
        samples = train.max_steps * train.batch_size * train.grad_accum_steps
        task_data = task.datasets(data, tokenizer, model.config, samples)
    masks = None
    if config.structured is None:
        masks = magnitude_prune(model, config.sparsity, config.scope)
        what = f"{config.sparsity:.0%} of the blocks' linear weights zeroed ({config.scope})"
    else:
        batches = None
        if config.importance == "gradient":
            batches = itertools.islice(eval_batches(task_data.train, task_data.collate, batch_size=train.batch_size,
                                                    seed=train.seed, rank=0, world=1), config.importance_batches)
        structured_prune(model, config.structured, config.sparsity, task, batches, config.importance)
        kept = model.config.n_heads if config.structured == "heads" else model.config.d_ff
        what = f"{config.structured}: {kept} kept per block ({config.importance} importance)"
    configs = {"data": data if data is not None else saved.get("data"), "prune": config}
    if saved.get("labels") is not None:
        configs["labels"] = saved["labels"]
    summary = None
    if config.finetune_steps > 0:
        handles = keep_pruned(model, masks) if masks is not None else []
        trainer = Trainer(model, train, task_data.train, task_data.validation, collate_fn=task_data.collate,
                          configs_to_save=configs, tokenizer=tokenizer)
        summary = trainer.fit()
        for handle in handles:
            handle.remove()
        checkpoint = ckpt.latest_checkpoint(out)
    else:
        ckpt.take_run_dir(out, resume=False, overwrite=overwrite, rank=0, world=1)
        configs = {**configs, "task": task.name, "model": model.config}
        checkpoint = ckpt.save_checkpoint(out, 0, model, {}, configs, tokenizer)
        ckpt.finish_replacement(out)
    result = {"out_dir": str(out), "checkpoint": str(checkpoint), "parameters_before": before,
              "parameters": model.num_parameters(), "sparsity": sparsity_of(model), "model_config": model.config,
              "summary": summary}
    echo(f"pruned {source}: {what}; parameters {before:,} -> {result['parameters']:,}, zeros in the blocks' linear "
         f"weights {result['sparsity']:.1%}" + (f"; fine-tuned {config.finetune_steps} steps" if summary else "")
         + f"; saved {checkpoint}")
    return result
