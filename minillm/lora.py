"""Fine-tuning modes: full, LoRA, BitFit, freezing the first k blocks.

LoRA (Hu et al., 2021). A frozen linear layer y = W x + b gets a trainable low-rank update:

    y = W x + b + (alpha / r) B A dropout(x),    A: (r, in),  B: (out, r)

A starts random (Kaiming-uniform, as nn.Linear) and B at zero, so the wrapped model starts out
exactly equal to the original; only r (in + out) numbers per layer train instead of in * out.
For inference `merge_lora` folds the update into the weight, W <- W + (alpha / r) B A, and the
wrappers disappear: no extra latency. LoRA wraps the attention projections (q, k, v, out) and
the MLP projections (fc_in, fc_gate, fc_out) of every block.

AdaLoRA (finetune_mode="adalora") is LoRA in SVD form with a rank budget: see `minillm.adalora`.

BitFit (Ben Zaken et al., 2022) trains only the bias terms. "freeze" freezes the embeddings and
the first `freeze_layers` blocks (of each stack). In these modes the task head (the classifier,
the NSP head) trains: it is new and has nothing to fall back on. "keep" changes nothing: the
parameters that train are exactly those whose ``requires_grad`` the caller left True (a model
prepared by ``peft``, or frozen by hand). A model that arrives with frozen parameters is refused
in every other mode (`check_frozen_parameters`): they set ``requires_grad`` themselves and would
silently undo the caller's choice.

Houlsby adapters ("adapter") live in `minillm.adapters`; prompt tuning ("prompt"), prefix
tuning ("prefix") and P-tuning v2 ("deep-prompt") in `minillm.prompts`; `apply_finetune_mode`
adds them like LoRA: everything else frozen, the head trained.

A LoRA run saves only what it trained, on top of its base (see `minillm.checkpoint`, "LoRA
runs"); `merge_lora` turns a loaded adapter into plain weights for export.

Models wrapped by ``peft`` (``get_peft_model``): a PeftModel with an adapter that lives inside the
wrapped layers (LoRA and the other layer-injecting methods) is the minillm model with some of its
layers replaced; `unwrap_model` returns that model, and the trainer, the tasks, checkpoints and
generation use it. Not supported: peft's prompt-learning methods (prompt, prefix and p-tuning),
whose virtual tokens are added by PeftModel.forward, and ``task_type="CAUSAL_LM"`` (peft then
expects the Hugging Face generation API). minillm never imports peft.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.adapters import add_adapters
from minillm.model import Block
from minillm.prompts import PROMPT_MODES, add_virtual_tokens

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_gate", "fc_out")
HEAD_MODULES = ("classifier", "nsp_head")  # task-specific layers that always train


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus the trainable low-rank update (alpha / r) B A (see module docstring)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRALinear: rank must be >= 1, got {rank}")
        self.base = base
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))  # (out, r): starts at 0
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own initialisation
        self.dropout = nn.Dropout(dropout)
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # (..., in) -> (..., r) -> (..., out)
        return self.base(x) + self.scaling * update

    def merged(self) -> nn.Linear:
        """The base layer with W + (alpha / r) B A folded in."""
        with torch.no_grad():
            self.base.weight += self.scaling * (self.lora_B @ self.lora_A)  # (out, r) @ (r, in)
        return self.base


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
             targets: tuple[str, ...] = LORA_TARGETS, layer: type = LoRALinear) -> list[str]:
    """Wrap every nn.Linear inside the model's blocks whose name is one of `targets` (default: all
    of LORA_TARGETS) in `layer` (LoRALinear, or a subclass such as AdaLoRA's); returns the wrapped
    module names, in the model's order."""
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown or not targets:
        raise ValueError(f"add_lora: targets must be a non-empty selection of {LORA_TARGETS}, got {tuple(targets)}")
    wrapped = []
    for block_name, block in list(model.named_modules()):
        if not isinstance(block, Block):
            continue
        for name, module in list(block.named_modules()):
            parent_name, _, leaf = name.rpartition(".")
            if leaf in targets and isinstance(module, nn.Linear):
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, leaf, layer(module, rank, alpha, dropout))
                wrapped.append(f"{block_name}.{name}")
    if not wrapped:
        raise ValueError(f"add_lora: found no {tuple(targets)} layers in {type(model).__name__}")
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and remove the wrappers (in place).

    The merged layers keep requires_grad=False from LoRA training; call requires_grad_(True)
    to train the merged model further.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module.merged())
    return model


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the task head (classifier, NSP head): always trained."""
    return [p for name in HEAD_MODULES if getattr(model, name, None) is not None
            for p in getattr(model, name).parameters()]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The minillm model inside a ``peft`` PeftModel, or `model` itself when it is not wrapped.

    peft's layer-injecting adapters (LoRA...) replace layers *inside* the wrapped model, and
    PeftModel.forward only calls it: running the unwrapped model runs the adapters too. Prompt
    learning (prompt/prefix/p-tuning) adds virtual tokens in PeftModel.forward instead, so it would
    be silently skipped: a TypeError. minillm does not import peft; a PeftModel is recognised by
    its ``get_base_model`` and ``active_peft_config``.
    """
    if not (callable(getattr(model, "get_base_model", None)) and hasattr(model, "active_peft_config")):
        return model
    if getattr(model.active_peft_config, "is_prompt_learning", False):
        kind = getattr(model.active_peft_config, "peft_type", "prompt learning")
        raise TypeError(f"model: a peft PeftModel with {kind} (prompt learning) adds virtual tokens in its own "
                        f"forward, which minillm does not run; use an adapter that replaces layers, such as LoRA")
    return model.get_base_model()


def count_parameters(model: nn.Module) -> dict:
    """{"trainable": n, "total": n}: unique parameters (tied weights once), trainable = requires_grad."""
    unique = {id(p): p for p in model.parameters()}.values()
    return {"trainable": sum(p.numel() for p in unique if p.requires_grad), "total": sum(p.numel() for p in unique)}


def check_frozen_parameters(model: nn.Module, mode: str) -> None:
    """ValueError when `model` arrives with frozen parameters and finetune_mode `mode` would set
    requires_grad itself (every mode but "keep"): the freezing was someone's choice (peft's, the
    caller's), and undoing it silently would train what they meant to keep fixed."""
    if mode == "keep":
        return
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        counts = count_parameters(model)
        raise ValueError(
            f"TrainConfig.finetune_mode: the model arrives with {counts['total'] - counts['trainable']:,} of "
            f"{counts['total']:,} parameters frozen (requires_grad=False: {', '.join(frozen[:3])}"
            f"{', ...' if len(frozen) > 3 else ''}), and finetune_mode={mode!r} would set requires_grad itself and "
            f"undo that; pass finetune_mode='keep' to train exactly the parameters that require grad, or call "
            f"model.requires_grad_(True) first to use {mode!r}"
        )


def apply_finetune_mode(model: nn.Module, config) -> dict:
    """Set requires_grad for `config.finetune_mode` ("full", "lora", "adalora", "bitfit", "freeze", "keep",
    "adapter", "prefix", "deep-prompt", "prompt").

    `config` is a TrainConfig (finetune_mode, lora_rank, lora_alpha, lora_dropout,
    freeze_layers, adapter_size, prefix_length, prefix_hidden, prompt_length). LoRA wrappers,
    adapters (minillm.adapters) and virtual tokens (minillm.prompts) are added in place. "keep" changes nothing, the head included.
    Returns {"trainable": n, "total": n} (count_parameters).
    """
    mode = config.finetune_mode
    if mode == "keep":
        return count_parameters(model)
    if mode == "full":
        model.requires_grad_(True)
    elif mode == "lora":
        model.requires_grad_(False)
        add_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout)  # A, B are new: trainable
    elif mode == "adapter":
        model.requires_grad_(False)
        add_adapters(model, config.adapter_size)  # the adapters are new: trainable
    elif mode in PROMPT_MODES:
        model.requires_grad_(False)
        length = config.prefix_length if mode == "prefix" else config.prompt_length
        add_virtual_tokens(model, mode, length, config.prefix_hidden)  # new: trainable
    elif mode == "adalora":
        from minillm.adalora import add_adalora  # adalora.py builds on this module's LoRALinear

        model.requires_grad_(False)
        add_adalora(model, config.adalora_init_rank, config.lora_alpha, config.lora_dropout)  # P, Λ, Q: trainable
    elif mode == "bitfit":
        model.requires_grad_(False)
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.requires_grad_(True)
    elif mode == "freeze":
        model.requires_grad_(True)
        stacks = [m for m in model.modules() if hasattr(m, "blocks") and hasattr(m, "embeddings")]
        for stack in stacks:
            if config.freeze_layers > len(stack.blocks):
                raise ValueError(
                    f"TrainConfig.freeze_layers: got {config.freeze_layers}, but the model has {len(stack.blocks)} blocks"
                )
            stack.embeddings.requires_grad_(False)
            for block in stack.blocks[: config.freeze_layers]:
                block.requires_grad_(False)
    else:
        raise ValueError(
            f"TrainConfig.finetune_mode: got {mode!r}, expected 'full', 'lora', 'adalora', 'bitfit', 'freeze', "
            f"'keep', 'adapter', 'prefix', 'deep-prompt' or 'prompt'"
        )
    for param in head_parameters(model):
        param.requires_grad_(True)
    return count_parameters(model)
