"""AdaLoRA (Zhang et al., 2023): LoRA in SVD form, with a rank budget moved to where it matters.

The update of a frozen linear layer is written like a singular value decomposition:

    y = W x + b + (alpha / r) P Λ Q dropout(x),    P: (out, r),  Λ = diag(λ): (r,),  Q: (r, in)

P and Q start small and random (normal, std 0.02) and Λ at zero, so the wrapped model starts out
exactly equal to the original. Training adds the orthogonality regulariser to the task loss,

    R = mean over the adapted layers of  ||PᵀP - I||²_F + ||QQᵀ - I||²_F,     loss += adalora_ortho_weight R

which keeps P and Q close to orthonormal, so that dropping a triplet (P[:, i], λ_i, Q[i, :])
removes only its own share of the update, as dropping a singular value does.

Importance (the paper's equations 8-11). After each optimizer step, every entry w of P, Λ, Q
gets its sensitivity I(w) = |w ∂L/∂w|, smoothed and with its uncertainty:

    Ī ← β1 Ī + (1 - β1) I,      Ū ← β2 Ū + (1 - β2) |I - Ī|,      s(w) = Ī Ū

and triplet i of a layer scores S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij).

Rank budget. The budget b(t) is the total number of triplets kept over all layers; it starts at
b(0) = adalora_init_rank x layers and ends at b(T) = adalora_target_rank x layers (T = max_steps):

    b(t) = b(0)                                                       t <= t_i  (warmup_steps)
    b(t) = b(T) + (b(0) - b(T)) (1 - (t - t_i) / (T - t_i - t_f))³    t_i < t < T - t_f
    b(t) = b(T)                                                       t >= T - t_f  (final_steps)

Every adalora_mask_interval steps of the middle phase the triplets with the lowest scores over
*all* layers are masked (λ_i set to 0) until b(t) are left: a layer that matters keeps more rank
than one that does not. At t = T - t_f the mask is fixed (the rank pattern), and re-applied
after every step of the final phase. Masked triplets are not removed while training: their λ
may grow back until the next masking, as in the paper. `RankAllocator.ranks()` gives each
layer's rank; the Trainer prints it at the end and puts it in the run's summary.

The Trainer (finetune_mode="adalora") adds `orthogonality_penalty` to the loss and calls
`RankAllocator.step` after each optimizer step (with the gradients still there): that is the
whole hook. A run saves P, Λ, Q (masked λ are zero) and the head on top of its base, with the
rank pattern in the adapter's description (see `minillm.checkpoint`); `merge_lora` folds the
update into the weight, W ← W + (alpha / r) P Λ Q, as for LoRA.

Compared with peft's AdaLoRA (checked in tests/test_adalora.py): the same forward (peft divides
by r + 1e-5 instead of r), the same importance scores, schedule and masking (`mask_to_budget`
masks the same triplets as peft's RankAllocator on the same gradients). peft's regulariser is
the unsquared Frobenius norm averaged over the matrices; here it is the paper's squared norm.
Not supported: AdaLoRA with a time budget only (max_steps=0: the schedule needs T), resizing
the saved tensors to the final ranks (the masked triplets are saved as zeros).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.lora import LORA_TARGETS, LoRALinear, add_lora


class AdaLoRALinear(LoRALinear):
    """A frozen nn.Linear plus the update (alpha / r) P Λ Q (module docstring).

    It is a LoRALinear whose lora_A is Q (r, in) and lora_B is P (out, r), with the singular
    values lora_E = λ (r,) between them: merging, saving and loading treat it as LoRA's wrapper.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, rank, alpha, dropout)
        self.lora_E = nn.Parameter(torch.zeros(rank, device=base.weight.device, dtype=base.weight.dtype))  # λ: (r,)
        with torch.no_grad():
            nn.init.normal_(self.lora_A, std=0.02)  # Q: (r, in)
            nn.init.normal_(self.lora_B, std=0.02)  # P: (out, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = F.linear(self.dropout(x), self.lora_A) * self.lora_E  # (..., in) -> (..., r), times λ
        return self.base(x) + self.scaling * F.linear(projected, self.lora_B)  # (..., r) -> (..., out)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) P Λ Q: (out, in)."""
        return self.scaling * (self.lora_B @ (self.lora_E[:, None] * self.lora_A))  # (out, r) @ (r, in)

    def merged(self) -> nn.Linear:
        """The base layer with (alpha / r) P Λ Q folded in."""
        with torch.no_grad():
            self.base.weight += self.delta_weight()
        return self.base


def add_adalora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                targets: tuple[str, ...] = LORA_TARGETS) -> list[str]:
    """Wrap the model's `targets` layers (as `minillm.lora.add_lora`) in AdaLoRALinear of initial
    rank `rank`; returns the wrapped module names, in the model's order."""
    return add_lora(model, rank, alpha, dropout, targets, layer=AdaLoRALinear)


def adalora_layers(model: nn.Module) -> dict[str, AdaLoRALinear]:
    """{module name: AdaLoRALinear} in the model's order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, AdaLoRALinear)}


def orthogonality_penalty(model: nn.Module) -> torch.Tensor:
    """R = mean over AdaLoRA layers of ||PᵀP - I||²_F + ||QQᵀ - I||²_F (module docstring)."""
    layers = list(adalora_layers(model).values())
    if not layers:
        raise ValueError(f"orthogonality_penalty: {type(model).__name__} has no AdaLoRA layers")
    total = 0.0
    for layer in layers:
        eye = torch.eye(layer.rank, device=layer.lora_A.device, dtype=layer.lora_A.dtype)  # (r, r)
        total = total + ((layer.lora_B.T @ layer.lora_B - eye) ** 2).sum()  # PᵀP: (r, r)
        total = total + ((layer.lora_A @ layer.lora_A.T - eye) ** 2).sum()  # QQᵀ: (r, r)
    return total / len(layers)


class RankAllocator:
    """Importance-based rank allocation on the budget schedule (module docstring).

    Args:
        model: the model with its AdaLoRA layers (add_adalora).
        target_rank: the average rank per layer at the end (b(T) = target_rank x layers).
        total_steps: T, the run's max_steps.
        warmup_steps: t_i, steps before any masking.
        final_steps: t_f, steps at the end with the rank pattern fixed.
        mask_interval: steps between two maskings in the middle phase.
        beta1, beta2: the smoothing of the sensitivity and of its uncertainty.
    """

    def __init__(self, model: nn.Module, target_rank: int, total_steps: int, warmup_steps: int = 0,
                 final_steps: int = 0, mask_interval: int = 1, beta1: float = 0.85, beta2: float = 0.85):
        self.layers = adalora_layers(model)
        if not self.layers:
            raise ValueError(f"RankAllocator: {type(model).__name__} has no AdaLoRA layers (add_adalora first)")
        if warmup_steps + final_steps >= total_steps:
            raise ValueError(f"RankAllocator: warmup_steps + final_steps ({warmup_steps} + {final_steps}) must be "
                             f"below total_steps ({total_steps}), to leave steps for the budget to shrink")
        self.initial_budget = sum(layer.rank for layer in self.layers.values())
        self.target_budget = target_rank * len(self.layers)
        if not 1 <= self.target_budget <= self.initial_budget:
            raise ValueError(f"RankAllocator: target_rank must be in [1, the initial rank], got {target_rank}")
        self.total_steps, self.warmup_steps, self.final_steps = total_steps, warmup_steps, final_steps
        self.mask_interval, self.beta1, self.beta2 = mask_interval, beta1, beta2
        self.sensitivity: dict[str, torch.Tensor] = {}  # Ī per parameter ("<layer>.lora_A"...)
        self.uncertainty: dict[str, torch.Tensor] = {}  # Ū per parameter
        self.rank_pattern = {name: [True] * layer.rank for name, layer in self.layers.items()}

    def _parameters(self):
        for name, layer in self.layers.items():
            for kind in ("lora_A", "lora_E", "lora_B"):
                yield f"{name}.{kind}", getattr(layer, kind)

    def budget(self, step: int) -> tuple[int, bool]:
        """(b(step), whether to mask at this step) on the cubic schedule."""
        final_start = self.total_steps - self.final_steps
        if step <= self.warmup_steps:
            return self.initial_budget, False
        if step > final_start:
            return self.target_budget, True
        remaining = 1 - (step - self.warmup_steps) / (final_start - self.warmup_steps)
        budget = int((self.initial_budget - self.target_budget) * remaining ** 3 + self.target_budget)
        return budget, step % self.mask_interval == 0

    @torch.no_grad()
    def update_importance(self) -> None:
        """Ī and Ū from each parameter's current value and gradient (a missing gradient is zero)."""
        for name, param in self._parameters():
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            sensitivity = (param * grad).abs().float()  # I(w) = |w dL/dw|
            if name not in self.sensitivity:
                self.sensitivity[name] = torch.zeros_like(sensitivity)
                self.uncertainty[name] = torch.zeros_like(sensitivity)
            smoothed = self.sensitivity[name].mul_(self.beta1).add_((1 - self.beta1) * sensitivity)
            self.uncertainty[name].mul_(self.beta2).add_((1 - self.beta2) * (sensitivity - smoothed).abs())

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """{layer: S (r,)}: S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij), with s = Ī Ū."""
        if not self.sensitivity:
            raise RuntimeError("RankAllocator.triplet_scores: no importance yet (call update_importance first)")
        score = {name: self.sensitivity[name] * self.uncertainty[name] for name in self.sensitivity}
        return {name: score[f"{name}.lora_E"]                       # (r,)
                + score[f"{name}.lora_A"].mean(dim=1)               # Q: (r, in) -> (r,)
                + score[f"{name}.lora_B"].mean(dim=0)               # P: (out, r) -> (r,)
                for name in self.layers}

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Mask (λ_i = 0) the lowest-scoring triplets over all layers until `budget` remain (ties at
        the threshold are masked together); returns and keeps the rank pattern."""
        scores = self.triplet_scores()
        to_mask = self.initial_budget - budget
        if to_mask > 0:
            threshold = torch.cat(list(scores.values())).kthvalue(to_mask).values  # the to_mask-th smallest
            self.rank_pattern = {name: (score > threshold).tolist() for name, score in scores.items()}
        else:
            self.rank_pattern = {name: [True] * len(score) for name, score in scores.items()}
        self.apply_rank_pattern()
        return self.rank_pattern

    @torch.no_grad()
    def apply_rank_pattern(self) -> None:
        """λ_i = 0 wherever the rank pattern says the triplet is masked."""
        for name, layer in self.layers.items():
            keep = torch.tensor(self.rank_pattern[name], device=layer.lora_E.device)
            layer.lora_E.masked_fill_(~keep, 0.0)

    def step(self, step: int) -> None:
        """The Trainer's hook, after optimizer step number `step` (1-based), gradients still there:
        importance, then masking on the schedule; the final phase fixes and keeps the pattern."""
        final_start = self.total_steps - self.final_steps
        if step < final_start:
            self.update_importance()
            budget, mask_now = self.budget(step)
            if mask_now:
                self.mask_to_budget(budget)
        elif step == final_start:
            self.mask_to_budget(self.target_budget)
        else:
            self.apply_rank_pattern()

    def ranks(self) -> dict[str, int]:
        """{layer: triplets kept}."""
        return {name: sum(keep) for name, keep in self.rank_pattern.items()}

    def state_dict(self) -> dict:
        """What resuming needs: Ī, Ū and the rank pattern (tensors and lists only)."""
        return {"sensitivity": dict(self.sensitivity), "uncertainty": dict(self.uncertainty),
                "rank_pattern": {name: list(keep) for name, keep in self.rank_pattern.items()}}

    def load_state_dict(self, state: dict) -> None:
        if set(state["rank_pattern"]) != set(self.layers):
            raise ValueError("RankAllocator.load_state_dict: the saved rank pattern names other layers than the model's")
        self.sensitivity, self.uncertainty = dict(state["sensitivity"]), dict(state["uncertainty"])
        self.rank_pattern = {name: list(keep) for name, keep in state["rank_pattern"].items()}


def build_rank_allocator(model: nn.Module, config) -> RankAllocator:
    """The RankAllocator of a TrainConfig's adalora_* fields (finetune_mode="adalora")."""
    return RankAllocator(model, target_rank=config.adalora_target_rank, total_steps=config.max_steps,
                         warmup_steps=config.adalora_warmup_steps, final_steps=config.adalora_final_steps,
                         mask_interval=config.adalora_mask_interval, beta1=config.adalora_beta1,
                         beta2=config.adalora_beta2)
