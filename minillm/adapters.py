"""Bottleneck adapters (Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP").

Every block of the frozen model gets two small trainable modules, one after the attention
sublayer and one after the MLP sublayer, each applied to that sublayer's output before it joins
the residual stream:

    adapter(h) = h + W_up f(W_down h + b_down) + b_up,    W_down: C -> m,  W_up: m -> C,  f = GELU

m (adapter_size) is much smaller than C. W_up and b_up start at zero, so every adapter starts as
the identity and the adapted model starts out exactly as the base model (Houlsby et al. start
near identity; zero is the exact limit). Each adapter has 2 C m + C + m parameters (both weight
matrices and both biases), so L blocks hold

    2 L (2 C m + C + m)

(Houlsby et al., section 3.1, counting the two adapters per block). Here only the adapters and
the task head train: the paper also trains the layer norms, which this module leaves frozen.

Adapters cannot be merged into the linear layers around them (the non-linearity f sits between
W_down and W_up), so a loaded adapter run keeps them as modules: `AdaptedSublayer` wraps the
attention or MLP module and adds the adapter to its output.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from minillm.model import Block

ADAPTED_SUBLAYERS = ("attn", "mlp")  # the self-attention and MLP sublayers of each Block


class BottleneckAdapter(nn.Module):
    """h + W_up f(W_down h + b_down) + b_up (module docstring); the identity at initialisation."""

    def __init__(self, d_model: int, size: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"BottleneckAdapter: size must be >= 1, got {size}")
        self.down = nn.Linear(d_model, size)  # (C -> m), nn.Linear's own initialisation
        self.act = nn.GELU()
        self.up = nn.Linear(size, d_model)  # (m -> C), zero: the adapter starts as the identity
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))  # (B, T, C) -> (B, T, m) -> (B, T, C)


class AdaptedSublayer(nn.Module):
    """A frozen sublayer (`base`: attention or MLP) followed by a BottleneckAdapter on its output.
    The attention sublayer returns (output, keys and values): the adapter takes the output only."""

    def __init__(self, base: nn.Module, d_model: int, size: int):
        super().__init__()
        self.base = base
        self.adapter = BottleneckAdapter(d_model, size).to(next(base.parameters()).device)

    def forward(self, *args, **kwargs):
        out = self.base(*args, **kwargs)
        if isinstance(out, tuple):  # MultiHeadAttention: (B, T, C) output and its (k, v)
            return (self.adapter(out[0]), *out[1:])
        return self.adapter(out)  # (B, T, C)


def add_adapters(model: nn.Module, size: int) -> list[str]:
    """Wrap the attention and MLP sublayers of every block (in place); returns the wrapped names."""
    if size < 1:
        raise ValueError(f"TrainConfig.adapter_size: got {size}, expected an integer >= 1")
    wrapped = []
    for block_name, block in list(model.named_modules()):
        if not isinstance(block, Block):
            continue
        if block.cross_attn is not None:
            raise ValueError(f"add_adapters: {block_name} has cross-attention; adapters support encoder (BERT) "
                             f"and decoder (GPT) models")
        for leaf in ADAPTED_SUBLAYERS:
            if isinstance(getattr(block, leaf), AdaptedSublayer):
                raise ValueError(f"add_adapters: {block_name}.{leaf} has an adapter already")
            setattr(block, leaf, AdaptedSublayer(getattr(block, leaf), model.config.d_model, size))
            wrapped.append(f"{block_name}.{leaf}")
    if not wrapped:
        raise ValueError(f"add_adapters: found no blocks in {type(model).__name__}")
    return wrapped


def adapter_parameter_count(n_layers: int, d_model: int, size: int) -> int:
    """2 L (2 C m + C + m): Houlsby et al.'s count for two adapters per block (module docstring)."""
    return 2 * n_layers * (2 * d_model * size + d_model + size)
