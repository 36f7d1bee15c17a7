"""minillm's training step against a minimal plain-PyTorch GPT of the same architecture.

    python benchmarks/step.py                  # the char-level CPU recipe: 4 layers, 128 wide, batch 12 x 64
    python benchmarks/step.py --rounds 60      # more alternations

The baseline is written here, the way a ~300-line GPT script writes it: one fused QKV projection,
`F.scaled_dot_product_attention(is_causal=True)`, tanh-GELU, weight tying, `F.cross_entropy` on
the logits, AdamW with torch's fused kernel where this torch has one for the device (foreach
otherwise), gradient clipping at 1.0. minillm's side is its `CausalLM` (same config: no biases,
learned positions, pre-norm LayerNorm, tanh-GELU, dropout 0) with the optimizer its trainer
builds (`minillm.optim.build_optimizer`) and the same clipping.

Arms: the baseline in fp32 (its recipe runs fp32 on a CPU); minillm in fp32 (the same
arithmetic: what the code costs); and minillm at the precision its trainer picks on this machine by
default (``precision="auto"``: bf16 autocast on a CPU that computes bf16 natively, see
`minillm.distributed.pick_dtype`), when that is not fp32. The headline ratio is the last over the
baseline: each as it trains by default. A step is forward + backward + clip + AdamW + zero_grad on
one batch. The arms alternate in blocks of `--block` steps inside one process, so all see the same
machine load, and the figure is the median over every timed step of each; a ratio below 1 means
minillm is faster. Results go to benchmarks/results/step_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.config import ModelConfig
from minillm.distributed import autocast, pick_dtype
from minillm.model import CausalLM
from minillm.optim import build_optimizer
from minillm.train_config import TrainConfig

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ---------------------------------------------------------------------------------------------
# The baseline: a minimal GPT
# ---------------------------------------------------------------------------------------------


class MinimalBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width, bias=False), nn.LayerNorm(width, bias=False)
        self.qkv = nn.Linear(width, 3 * width, bias=False)  # q, k and v in one matmul
        self.proj = nn.Linear(width, width, bias=False)
        self.fc, self.fc_out = nn.Linear(width, 4 * width, bias=False), nn.Linear(4 * width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.fc_out(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class MinimalGPT(nn.Module):
    def __init__(self, vocab: int, block: int, width: int, layers: int, heads: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(block, width)
        self.blocks = nn.ModuleList(MinimalBlock(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width, bias=False)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "fc_out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.logits(idx)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def fused_adamw(params, lr: float, betas=(0.9, 0.99), weight_decay: float = 0.1) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where this torch has one for the device, else foreach."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, foreach=True)


# ---------------------------------------------------------------------------------------------
# The steps, alternating
# ---------------------------------------------------------------------------------------------


def run(vocab: int, block: int, width: int, layers: int, heads: int, batch: int, rounds: int, per_block: int) -> dict:
    """Median ms per step of the baseline (fp32, as its CPU recipe runs), of minillm in fp32 (the
    same arithmetic), and of minillm at the precision its trainer picks here by default
    (TrainConfig.precision="auto", minillm.distributed.pick_dtype), when that is not fp32."""
    torch.manual_seed(0)
    baseline = MinimalGPT(vocab, block, width, layers, heads).train()
    baseline_opt = fused_adamw(baseline.parameters(), 1e-3)
    config = ModelConfig(arch="decoder", vocab_size=vocab, d_model=width, n_layers=layers, n_heads=heads,
                         max_seq_len=block, pos_encoding="learned", norm="layernorm", norm_placement="pre",
                         activation="gelu_tanh", bias=False, embed_dropout=0.0, attn_dropout=0.0,
                         resid_dropout=0.0, attn_backend="auto", norm_backend="auto")
    default_dtype = pick_dtype("auto", torch.device("cpu"))
    generator = torch.Generator().manual_seed(1)
    data = [torch.randint(0, vocab, (batch, block + 1), generator=generator) for _ in range(8)]

    def baseline_step(i: int) -> float:
        chunk = data[i % len(data)]
        loss = baseline(chunk[:, :-1], chunk[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(baseline.parameters(), 1.0)
        baseline_opt.step()
        baseline_opt.zero_grad(set_to_none=True)
        return loss.item()

    def minillm_step_fn(dtype: torch.dtype):
        model = CausalLM(config).train()
        optimizer = build_optimizer(model, TrainConfig(task="causal-lm", lr=1e-3, weight_decay=0.1))
        device = torch.device("cpu")

        def minillm_step(i: int) -> float:
            chunk = data[i % len(data)]
            with autocast(device, dtype):  # what the Trainer wraps its forward in (none for fp32)
                loss = model(chunk[:, :-1], labels=chunk[:, :-1]).loss  # the model shifts its labels itself
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

        return minillm_step

    steps = {"baseline": baseline_step, "minillm_fp32": minillm_step_fn(torch.float32)}
    if default_dtype != torch.float32:
        steps["minillm_default"] = minillm_step_fn(default_dtype)
    times = {name: [] for name in steps}
    for r in range(rounds + 1):  # round 0 warms every arm up and is not timed
        for name, step in steps.items():
            for i in range(per_block):
                start = time.perf_counter()
                step(r * per_block + i)
                if r:
                    times[name].append(time.perf_counter() - start)
    ms = {name: 1e3 * statistics.median(values) for name, values in times.items()}
    ms.setdefault("minillm_default", ms["minillm_fp32"])
    return {
        "device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "shape": {"vocab": vocab, "block": block, "width": width, "layers": layers,
                                               "heads": heads, "batch": batch},
        "baseline_optimizer": "fused" if baseline_opt.defaults.get("fused") else "foreach",
        "minillm_default_precision": str(default_dtype).removeprefix("torch."),
        "steps_timed_each": len(times["baseline"]),
        "baseline_ms_per_step": ms["baseline"], "minillm_fp32_ms_per_step": ms["minillm_fp32"],
        "minillm_default_ms_per_step": ms["minillm_default"],
        "ratio_fp32_over_baseline": ms["minillm_fp32"] / ms["baseline"],
        "ratio_minillm_over_baseline": ms["minillm_default"] / ms["baseline"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40, help="alternations of the arms (default: %(default)s)")
    parser.add_argument("--block", type=int, default=5, help="steps of one kind in a row (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=65, help="65: a char-level vocabulary")
    args = parser.parse_args()
    result = run(args.vocab, args.seq_len, 128, 4, 4, args.batch, args.rounds, args.block)
    print(f"{result['device']}, torch {result['torch']}; 4 layers, 128 wide, 4 heads, batch {args.batch} x {args.seq_len}")
    print(f"minimal GPT, fp32 ({result['baseline_optimizer']} AdamW):   {result['baseline_ms_per_step']:.2f} ms/step")
    print(f"minillm CausalLM, fp32:                    {result['minillm_fp32_ms_per_step']:.2f} ms/step "
          f"(ratio {result['ratio_fp32_over_baseline']:.3f}: the same arithmetic)")
    if result["minillm_default_precision"] != "float32":
        print(f"minillm CausalLM, its default here ({result['minillm_default_precision']} autocast): "
              f"{result['minillm_default_ms_per_step']:.2f} ms/step")
    print(f"ratio minillm (as it trains by default) / minimal GPT (as its recipe runs): "
          f"{result['ratio_minillm_over_baseline']:.3f} (median of {result['steps_timed_each']} steps each)")
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "step_cpu.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
