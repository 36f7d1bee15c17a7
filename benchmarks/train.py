"""Benchmark minillm's training step against a minimal hand-written PyTorch loop.

    python benchmarks/train.py                 # tiny preset on CPU; + gpt2-124m on a GPU
    python benchmarks/train.py --steps 30      # more timed steps

Both sides train the same model (same config, SDPA attention, torch norms) on the same batches
with AdamW, gradient clipping and the same autocast. The hand-written loop is what a tutorial
writes: `loss = model(**batch).loss; loss.backward(); clip; opt.step(); opt.zero_grad()`. The
minillm side is `Trainer.fit()`, with everything it does per step (fetch, schedule, per-token
normalised accumulation, NaN check, logging, progress bookkeeping).

Steps are interleaved in blocks — five minillm steps, then five hand-loop steps run from the
trainer's `on_step_end` hook — so both see the same machine load (the test machines are shared),
and each is timed among steps of its own kind. Reported: the median time
per step, tokens/s = B * T / step time, and on a GPU MFU = flops_per_token(T) * tokens/s / peak,
with flops_per_token = 6 N + 12 L C T (`Model.flops_per_token`) and the peak from the GPU's
bf16 dense data-sheet figure (`minillm.distributed.PEAK_FLOPS`). Without a GPU no MFU is printed.
Results go to benchmarks/results/train_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch

from minillm.config import preset
from minillm.tasks import build_model
from minillm.train_config import TrainConfig
from minillm.distributed import peak_flops, seed_everything
from minillm.trainer import Trainer

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def make_batches(n: int, batch_size: int, seq_len: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def bench(name: str, batch_size: int, seq_len: int, steps: int, device: torch.device, block: int = 5) -> dict:
    config = preset(name, attn_backend="sdpa", norm_backend="torch", max_seq_len=max(seq_len, preset(name).max_seq_len))
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    batches = make_batches(8, batch_size, seq_len, config.vocab_size)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    # --- the hand-written loop: one step, called from the trainer's hook ---------------------
    seed_everything(0)
    plain = build_model(config, "causal-lm").to(device).train()
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=True if device.type == "cuda" else None)

    def plain_step(i: int) -> None:
        batch = {k: v.to(device, non_blocking=True) for k, v in batches[i % len(batches)].items()}
        if dtype == torch.float32:
            loss = plain(**batch).loss
        else:
            with torch.autocast(device.type, dtype=dtype):
                loss = plain(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)
        loss.item()  # the trainer reads its loss every step (NaN check); so does this loop

    # --- minillm: Trainer.fit, timed between consecutive on_step_end calls ---------------------
    # Every `block` trainer steps, the hook runs `block` hand-loop steps. Each side is timed over
    # runs of its own consecutive steps: timing a step of one kind squeezed between steps of the
    # other measured the *same* code 5-9% apart depending on its slot on this machine.
    steps = -(-steps // block) * block  # whole blocks; one more block first, untimed (warmup)
    # Wall time is what a user waits; process CPU time is far less disturbed by other jobs on a
    # shared machine, so it is reported as well (on a GPU, wall time is the one that matters).
    times = {"minillm": [], "plain": []}
    cpu = {"minillm": [], "plain": []}
    mark = {"t": None, "cpu": None}

    def hook(trainer, row) -> None:
        sync()
        now, now_cpu = time.perf_counter(), time.process_time()
        if mark["t"] is not None:
            times["minillm"].append(now - mark["t"])
            cpu["minillm"].append(now_cpu - mark["cpu"])
        if trainer.step % block == 0:
            for i in range(block):
                start, start_cpu = time.perf_counter(), time.process_time()
                plain_step(trainer.step + i)
                sync()
                times["plain"].append(time.perf_counter() - start)
                cpu["plain"].append(time.process_time() - start_cpu)
        mark["t"], mark["cpu"] = time.perf_counter(), time.process_time()

    seed_everything(0)
    model = build_model(config, "causal-lm")
    with tempfile.TemporaryDirectory() as out_dir:
        train = TrainConfig(out_dir=out_dir, task="causal-lm", batch_size=batch_size, max_steps=steps + block + 1,
                            warmup_steps=0, lr=3e-4, precision="bf16" if dtype == torch.bfloat16 else "fp32",
                            eval_every=0, checkpoint_every=0, log_every=10**6, progress=False,
                            device=device.type)
        trainer = Trainer(model, train, batches, hooks={"on_step_end": hook})
        trainer.fit()
    timed = {k: v[block : block + steps] for k, v in times.items()}
    ours, theirs = (statistics.median(timed[k]) for k in ("minillm", "plain"))
    # neighbouring blocks share the machine's load of the moment: compare them pairwise
    medians = {k: [statistics.median(v[j : j + block]) for j in range(0, steps, block)] for k, v in timed.items()}
    paired = sorted(a / b for a, b in zip(medians["minillm"], medians["plain"]))
    q1, q3 = paired[len(paired) // 4], paired[(3 * len(paired)) // 4]
    tokens = batch_size * seq_len
    result = {
        "model": name, "parameters": model.num_parameters(), "batch_size": batch_size, "seq_len": seq_len,
        "dtype": str(dtype).replace("torch.", ""), "steps_timed": steps,
        "minillm_ms_per_step": 1e3 * ours, "plain_ms_per_step": 1e3 * theirs,
        "minillm_tokens_per_s": tokens / ours, "plain_tokens_per_s": tokens / theirs,
        "ratio_minillm_over_plain": ours / theirs, "paired_ratio_median": statistics.median(paired),
        "paired_ratio_q1": q1, "paired_ratio_q3": q3,
        "minillm_cpu_ms_per_step": 1e3 * statistics.median(cpu["minillm"][block : block + steps]),
        "plain_cpu_ms_per_step": 1e3 * statistics.median(cpu["plain"][block : block + steps]),
    }
    peak = peak_flops(device)
    if peak is not None:
        flops = model.flops_per_token(seq_len)
        result.update(peak_flops=peak, minillm_mfu=flops * tokens / ours / peak, plain_mfu=flops * tokens / theirs / peak)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per side (after 5 untimed)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {device_name(device)}  (torch {torch.__version__})")
    runs = [("tiny", 8, 128)]
    if device.type == "cuda":
        runs.append(("gpt2-124m", 8, 1024))
    else:
        print("no GPU: MFU is not reported (it is defined against a GPU's peak FLOP/s)")
    results = []
    print(f"{'model':<10} {'B x T':>9} {'minillm ms/step':>16} {'plain ms/step':>14} {'minillm tok/s':>14} "
          f"{'plain tok/s':>12} {'ratio':>6} {'MFU':>6}")
    for name, batch_size, seq_len in runs:
        r = bench(name, batch_size, seq_len, args.steps, device)
        results.append(r)
        mfu = f"{100 * r['minillm_mfu']:.1f}%" if "minillm_mfu" in r else "-"
        print(f"{name:<10} {f'{batch_size} x {seq_len}':>9} {r['minillm_ms_per_step']:>16.1f} {r['plain_ms_per_step']:>14.1f} "
              f"{r['minillm_tokens_per_s']:>14.0f} {r['plain_tokens_per_s']:>12.0f} {r['ratio_minillm_over_plain']:>6.3f} {mfu:>6}")
    for r in results:
        print(f"{r['model']}: ratio of neighbouring 5-step blocks, median {r['paired_ratio_median']:.3f} "
              f"(quartiles {r['paired_ratio_q1']:.3f} .. {r['paired_ratio_q3']:.3f}); process CPU ms/step "
              f"minillm {r['minillm_cpu_ms_per_step']:.1f}, plain {r['plain_cpu_ms_per_step']:.1f} "
              f"(ratio {r['minillm_cpu_ms_per_step'] / r['plain_cpu_ms_per_step']:.3f})")
    print("ratio = minillm / plain median time per step (<= 1: minillm is no slower), blocks of 5 steps interleaved")
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"train_{device.type}.json")
    with open(path, "w") as f:
        json.dump({"device": device_name(device), "torch": torch.__version__, "results": results}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
