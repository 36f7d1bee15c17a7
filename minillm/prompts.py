"""Virtual tokens: prompt tuning, prefix tuning and P-tuning v2 (deep prompts).

All three leave every weight of the model frozen and learn P extra vectors that each sequence
sees in front of its own tokens (shape letters as in `minillm.model`, with P the virtual length
and L the number of blocks).

Prompt tuning (Lester et al., 2021), finetune_mode="prompt". P trainable input vectors
E_p = [e_1 .. e_P] (P, C) are put before the token embeddings:

    x = [E_p ; E[x_1] .. E[x_T]] + pos(0 .. P+T-1) (+ segment 0),    then the frozen stack

Trainable: P * C numbers. The vectors start as the embeddings of P tokens drawn from the
vocabulary (Lester et al.'s "sampled vocabulary" initialisation).

Prefix tuning (Li & Liang, 2021), finetune_mode="prefix". Every block's self-attention gets P
extra keys and values, K_l = [K_p,l ; W_k h], V_l = [V_p,l ; W_v h], that every query may attend
to. Learning them directly is unstable (Li & Liang, section 4.3), so training reparameterises
them through a small MLP of a shorter table E' (P, C):

    [K_p,1, V_p,1, .., K_p,L, V_p,L] = W_2 tanh(W_1 E' + b_1) + b_2,   W_1: C -> prefix_hidden,
                                                                       W_2: prefix_hidden -> 2 L Hkv D
Trainable: P C + C h + h + h (2 L Hkv D) + 2 L Hkv D (h = prefix_hidden). After training only the
MLP's output is kept (`KeyValuePrefix.fold`): P * 2 L Hkv D numbers, which is what a prefix run
saves as weights; the MLP itself goes into the run's training state (state.pt), from which a
resumed run takes it back (`unfold_prefixes`).

P-tuning v2 (Liu et al., 2022), finetune_mode="deep-prompt": the same per-layer keys and values,
learnt directly (no MLP): P * 2 L Hkv D trainable numbers. It is a folded prefix from the start.

Positions and masks, as peft and Hugging Face do it (checked in tests/test_peft_methods.py):
the virtual tokens take the first P positions, so the sequence's own tokens count from P, and P
plus the sequence must fit in max_seq_len. They are never padding: the caller's attention mask
covers its own tokens, and the stack puts P ones in front of it. The stack returns hidden states
for the caller's tokens only, so a causal LM's logits and labels line up as without a prompt,
and classifier pooling ([CLS], last token, mean) never reads a virtual position. (peft's
BertForSequenceClassification with prompt tuning pools the first virtual token instead.)

With the KV cache (generation) the virtual keys and values enter the cache on the first step and
stay there. Supported: encoder (BERT) and decoder (GPT) stacks. Not supported: encoder-decoder
models, XLNet, caller-given position_ids, packed windows with document_ids. Nothing here merges
into the weights: a prompt is extra input vectors, a prefix extra keys and values.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange

from minillm.model import LayerCache, TransformerStack

PROMPT_MODES = ("prompt", "prefix", "deep-prompt")


class SoftPrompt(nn.Module):
    """P trainable input vectors (prompt tuning, module docstring)."""

    def __init__(self, length: int, token_table: nn.Embedding):
        super().__init__()
        self.length = length
        sampled = torch.randint(0, token_table.num_embeddings, (length,), device=token_table.weight.device)
        self.embeddings = nn.Parameter(token_table.weight.detach()[sampled].clone())  # (P, C)

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.embeddings.expand(batch_size, -1, -1)  # (B, P, C)


class KeyValuePrefix(nn.Module):
    """P keys and values for each of L blocks (prefix tuning and P-tuning v2, module docstring).

    hidden > 0: the MLP reparameterisation of prefix tuning (prefix_tokens, mlp), until `fold`.
    hidden = 0: the keys and values themselves, `key_values` (P, 2 L Hkv D), laid out as
    (layer, key or value, head, D) along the last dim (as peft's prefix encoder lays them out).
    """

    def __init__(self, length: int, n_layers: int, n_kv_heads: int, head_dim: int, d_model: int, hidden: int = 0):
        super().__init__()
        self.length, self.n_layers, self.n_kv_heads = length, n_layers, n_kv_heads
        width = 2 * n_layers * n_kv_heads * head_dim
        if hidden:
            self.prefix_tokens = nn.Parameter(torch.randn(length, d_model))  # (P, C): E'
            self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.Tanh(), nn.Linear(hidden, width))
            self.key_values = None
        else:
            self.key_values = nn.Parameter(torch.randn(length, width))  # (P, 2 L Hkv D)

    def all_key_values(self) -> torch.Tensor:
        """(P, 2 L Hkv D): the learnt table, or the MLP's output while reparameterised."""
        return self.key_values if self.key_values is not None else self.mlp(self.prefix_tokens)

    def forward(self, batch_size: int) -> list[LayerCache]:
        table = rearrange(self.all_key_values(), "p (l two h d) -> l two h p d",
                          l=self.n_layers, two=2, h=self.n_kv_heads)  # (L, 2, Hkv, P, D)
        table = table[:, :, None].expand(-1, -1, batch_size, -1, -1, -1)  # (L, 2, B, Hkv, P, D)
        return [LayerCache(self_kv=(layer[0], layer[1])) for layer in table]

    @torch.no_grad()
    def fold(self) -> "KeyValuePrefix":
        """Replace the MLP by its output (in place): the same keys and values, P * 2 L Hkv D numbers."""
        if self.key_values is None:
            folded = self.mlp(self.prefix_tokens).detach().clone()
            del self.prefix_tokens, self.mlp
            self.key_values = nn.Parameter(folded)
        return self


def _stacks(model: nn.Module, where: str) -> list[tuple[str, TransformerStack]]:
    """The model's encoder or decoder stack; ValueError for encoder-decoder models and XLNet."""
    if getattr(model.config, "arch", None) not in ("encoder", "decoder"):
        raise ValueError(f"{where}: virtual tokens (prompt, prefix, deep-prompt) need an encoder (BERT) or "
                         f"decoder (GPT) model, got arch={getattr(model.config, 'arch', None)!r}")
    stacks = [(name, m) for name, m in model.named_modules() if isinstance(m, TransformerStack)]
    if len(stacks) != 1:
        raise ValueError(f"{where}: expected one encoder or decoder stack in {type(model).__name__}, got {len(stacks)}")
    return stacks


def check_virtual_length(max_len: int, field: str, length: int) -> None:
    """ValueError naming `field` unless P virtual tokens leave room for one real token of max_len."""
    if not 1 <= length < max_len:
        raise ValueError(f"TrainConfig.{field}: got {length}, expected 1 .. max_seq_len - 1 = {max_len - 1} (the "
                         f"virtual tokens take the first positions of the model's max_seq_len={max_len})")


def add_virtual_tokens(model: nn.Module, mode: str, length: int, prefix_hidden: int = 0) -> list[str]:
    """Attach a trainable soft prompt ("prompt") or key/value prefix ("prefix" through an MLP of
    width prefix_hidden, "deep-prompt" without one) to the model's stack; returns its module name."""
    if mode not in PROMPT_MODES:
        raise ValueError(f"add_virtual_tokens: mode must be one of {PROMPT_MODES}, got {mode!r}")
    field = "prefix_length" if mode == "prefix" else "prompt_length"
    check_virtual_length(model.config.max_seq_len, field, length)
    if mode == "prefix" and prefix_hidden < 1:
        raise ValueError(f"TrainConfig.prefix_hidden: got {prefix_hidden}, expected an integer >= 1 for a prefix "
                         f"(the MLP's width; a prefix without the MLP is mode 'deep-prompt')")
    names = []
    for name, stack in _stacks(model, "add_virtual_tokens"):
        if stack.virtual_tokens:
            raise ValueError(f"add_virtual_tokens: {name} has a soft prompt or prefix already")
        config = model.config
        device = stack.embeddings.token.weight.device
        if mode == "prompt":
            stack.prompt = SoftPrompt(length, stack.embeddings.token)
            names.append(f"{name}.prompt")
        else:
            hidden = prefix_hidden if mode == "prefix" else 0
            stack.prefix = KeyValuePrefix(length, len(stack.blocks), config.kv_heads, config.head_dim,
                                          config.d_model, hidden).to(device)
            names.append(f"{name}.prefix")
    return names


def fold_prefixes(model: nn.Module) -> nn.Module:
    """Fold every prefix MLP into its keys and values (in place); see KeyValuePrefix.fold."""
    for module in model.modules():
        if isinstance(module, KeyValuePrefix):
            module.fold()
    return model


def reparameterisations(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: tensor} of every prefix MLP still training (prefix_tokens, mlp.*): what a prefix run
    keeps in its training state (state.pt) to resume, since its weights file holds the folded prefix."""
    return {f"{name}.{key}": tensor.detach().to("cpu") for name, module in model.named_modules()
            if isinstance(module, KeyValuePrefix) and module.key_values is None
            for key, tensor in module.state_dict().items()}


@torch.no_grad()
def unfold_prefixes(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """The inverse of fold_prefixes, for resuming: give every folded prefix its MLP back from
    `tensors` (reparameterisations). ValueError when the MLP does not make the folded keys and
    values: they come from different steps or runs."""
    for name, module in model.named_modules():
        if not isinstance(module, KeyValuePrefix) or module.key_values is None:
            continue
        own = {key.removeprefix(f"{name}."): t for key, t in tensors.items() if key.startswith(f"{name}.")}
        if "prefix_tokens" not in own:
            raise ValueError(f"unfold_prefixes: no MLP saved for {name}; the training state lacks it")
        device = module.key_values.device
        hidden, d_model = own["mlp.0.weight"].shape  # (h, C)
        mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.Tanh(), nn.Linear(hidden, module.key_values.shape[1]))
        mlp.load_state_dict({key.removeprefix("mlp."): t for key, t in own.items() if key.startswith("mlp.")})
        prefix_tokens = own["prefix_tokens"].to(device)
        mlp.to(device)
        if not torch.allclose(mlp(prefix_tokens), module.key_values, rtol=1e-5, atol=1e-6):
            raise ValueError(f"unfold_prefixes: the saved MLP of {name} does not make its saved keys and values")
        del module.key_values
        module.prefix_tokens, module.mlp, module.key_values = nn.Parameter(prefix_tokens), mlp, None


def folded_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<stack>.prefix.key_values": (P, 2 L Hkv D)} for every prefix still reparameterised: what
    a prefix run saves in place of the MLP."""
    with torch.no_grad():
        return {f"{name}.key_values": module.mlp(module.prefix_tokens).detach()
                for name, module in model.named_modules()
                if isinstance(module, KeyValuePrefix) and module.key_values is None}
