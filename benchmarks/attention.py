"""Benchmark minillm's fused attention against every PyTorch SDPA backend and the reference.

    python benchmarks/attention.py            # full sweep
    python benchmarks/attention.py --quick    # a few shapes, for a smoke run

Providers: `minillm` (the Triton kernel, CUDA only), `sdpa-flash`, `sdpa-efficient`,
`sdpa-cudnn`, `sdpa-math` (each forced with torch.nn.attention.sdpa_kernel; a backend the
device does not offer for a shape is recorded as unsupported), and `reference` (the explicit
PyTorch reference, skipped above --reference-max-seq because it materialises L x L).
Modes: fwd, bwd, fwd+bwd. Reported: milliseconds, TFLOP/s and peak memory, where

    FLOPs(fwd) = 4 * B * H * Lq * Lk * D      (two matmuls of 2 * Lq * Lk * D each)
    FLOPs(bwd) = 2.5 * FLOPs(fwd)             (five matmuls: recompute QK^T, dV, dP, dQ, dK)
    FLOPs(fwd+bwd) = 3.5 * FLOPs(fwd);  causal: every figure halved.

Results go to benchmarks/results/attention_<device>_<time>.{csv,json,png}, labelled with the
device. Without a GPU the script says so, runs only the PyTorch paths at small CPU-sized
shapes, labels everything CPU, and reports no GPU figure.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from minillm.kernels.attention import attention_reference, scaled_dot_product_attention

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


@dataclass
class Shape:
    batch: int
    heads: int
    seq: int
    head_dim: int
    causal: bool
    dtype: str


@dataclass
class Row:
    device: str
    provider: str
    mode: str
    batch: int
    heads: int
    seq: int
    head_dim: int
    causal: bool
    dtype: str
    ms: float | None
    tflops: float | None
    peak_mem_mib: float | None
    status: str  # "ok", "unsupported: ...", "oom", "skipped: ..."


def flops(s: Shape, mode: str) -> float:
    f = 4.0 * s.batch * s.heads * s.seq * s.seq * s.head_dim * FLOP_FACTOR[mode]
    return f / 2 if s.causal else f


def providers(device: torch.device, include_ours: bool | None = None) -> dict:
    """name -> (function(q, k, v, causal), context manager factory).

    include_ours: time minillm's kernel (default: on CUDA only; benchmarks/gpu_suite.py --dry
    asks for it on CPU, where it runs in Triton's interpreter)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa = lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    out = {}
    if device.type == "cuda" if include_ours is None else include_ours:
        out["minillm"] = (lambda q, k, v, causal: scaled_dot_product_attention(q, k, v, is_causal=causal), nullcontext)
    backends = [("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION),
                ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-math", SDPBackend.MATH)]
    for name, backend in backends:
        if device.type == "cpu" and name in ("sdpa-efficient", "sdpa-cudnn"):
            continue  # CUDA-only backends: PyTorch's CPU build offers flash (its CPU kernel) and math
        out[name] = (sdpa, (lambda b=backend: sdpa_kernel(b)))
    out["reference"] = (lambda q, k, v, causal: attention_reference(q, k, v, is_causal=causal), nullcontext)
    return out


def _timer(device: torch.device, warmup: int, rep: int):
    """Returns time_ms(fn): median milliseconds of fn()."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=warmup * 5, rep=rep * 10, return_mode="median")

    def cpu_time(fn):
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(rep):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)

    return cpu_time


def run_one(name, fn, ctx, s: Shape, mode: str, device, time_ms, label: str) -> Row:
    dtype = DTYPES[s.dtype]
    gen = torch.Generator(device=device).manual_seed(0)
    make = lambda: torch.randn(s.batch, s.heads, s.seq, s.head_dim, device=device, dtype=dtype, generator=gen)
    q, k, v, do = make(), make(), make(), make()
    row = dict(device=label, provider=name, mode=mode, **asdict(s))
    try:
        with ctx():
            if mode == "fwd":
                with torch.no_grad():
                    call = lambda: fn(q, k, v, s.causal)
                    call()
            else:
                q, k, v = (t.requires_grad_() for t in (q, k, v))
                if mode == "bwd":
                    out = fn(q, k, v, s.causal)
                    call = lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
                else:
                    call = lambda: torch.autograd.grad(fn(q, k, v, s.causal), (q, k, v), do)
                call()
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            ms = time_ms(call)
            peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError is newer than torch 2.4
        return Row(**row, ms=None, tflops=None, peak_mem_mib=None, status="oom")
    except RuntimeError as e:  # an SDPA backend that does not support this device/shape/dtype
        return Row(**row, ms=None, tflops=None, peak_mem_mib=None, status=f"unsupported: {str(e).splitlines()[0][:80]}")
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return Row(**row, ms=ms, tflops=flops(s, mode) / (ms * 1e-3) / 1e12, peak_mem_mib=peak, status="ok")


def shapes(args, on_gpu: bool) -> list[Shape]:
    out = []
    for dtype in args.dtypes:
        for d in args.head_dims:
            for causal in args.causal:
                if on_gpu:
                    # Long sequences at a fixed 16k tokens per batch, plus small-batch/short cases.
                    heads = 2048 // d
                    for seq in args.seqs:
                        out.append(Shape(max(1, 16384 // seq), heads, seq, d, causal, dtype))
                    for batch, seq in ((1, 128), (2, 256)):
                        out.append(Shape(batch, heads, seq, d, causal, dtype))
                else:
                    for seq in args.seqs:
                        out.append(Shape(1, 4, seq, d, causal, dtype))
    return out


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def write_results(rows: list[Row], label: str, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower()
    stem = os.path.join(out_dir, f"attention_{slug}_{time.strftime('%Y%m%d-%H%M%S')}")
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    with open(stem + ".json", "w") as f:
        json.dump({"device": label, "flops": "fwd 4*B*H*Lq*Lk*D; bwd 2.5x; fwd+bwd 3.5x; causal halved",
                   "rows": [asdict(r) for r in rows]}, f, indent=1)
    _plot(rows, label, stem + ".png")
    return stem


def _plot(rows: list[Row], label: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = sorted({(r.dtype, r.head_dim, r.causal) for r in rows})
    modes = [m for m in MODES if any(r.mode == m for r in rows)]
    fig, axes = plt.subplots(len(modes), len(combos), figsize=(4 * len(combos), 3.2 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        for j, (dtype, d, causal) in enumerate(combos):
            ax = axes[i][j]
            for provider in dict.fromkeys(r.provider for r in rows):
                pts = sorted((r.seq, r.tflops) for r in rows if r.provider == provider and r.mode == mode
                             and (r.dtype, r.head_dim, r.causal) == (dtype, d, causal) and r.status == "ok")
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{mode} {dtype} D={d}{' causal' if causal else ''}", fontsize=9)
            ax.set_xlabel("sequence length")
            ax.set_ylabel("TFLOP/s")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Attention on {label}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few small shapes: a smoke run")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of fwd,bwd,fwd+bwd")
    p.add_argument("--dtypes", default="bf16,fp16", help="comma list of bf16,fp16,fp32")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--seqs", default=None, help="comma list of sequence lengths")
    p.add_argument("--causal", default="0,1", help="comma list of 0/1")
    p.add_argument("--providers", default=None, help="comma list to keep (default: all)")
    p.add_argument("--reference-max-seq", type=int, default=4096, help="skip the L x L reference above this")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rep", type=int, default=20)
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    label = device_label(device)
    if not on_gpu:
        print("No GPU present: timing only the PyTorch paths on CPU at small CPU-sized shapes. "
              "These are CPU figures; no GPU figure is reported.")
    default_seqs = ("512,1024,2048,4096,8192,16384" if on_gpu else "128,256,512")
    if args.quick:
        default_seqs = "1024,4096" if on_gpu else "128,256"
        args.head_dims = args.head_dims if args.head_dims != "64,128" else ("128" if on_gpu else "64")
        args.dtypes = args.dtypes if args.dtypes != "bf16,fp16" else "bf16"
        args.warmup, args.rep = min(args.warmup, 2), min(args.rep, 5)
    args.seqs = [int(x) for x in (args.seqs or default_seqs).split(",")]
    args.head_dims = [int(x) for x in args.head_dims.split(",")]
    args.dtypes = args.dtypes.split(",")
    args.causal = [bool(int(x)) for x in args.causal.split(",")]
    modes = args.modes.split(",")
    for m in modes:
        if m not in MODES:
            p.error(f"--modes: {m!r} is not one of {MODES}")

    provs = providers(device)
    if args.providers:
        provs = {k: v for k, v in provs.items() if k in args.providers.split(",")}
    time_ms = _timer(device, args.warmup, args.rep)
    print(f"device: {label}")
    print("FLOPs: fwd = 4*B*H*Lq*Lk*D; bwd = 2.5 x fwd; fwd+bwd = 3.5 x fwd; causal halves each")
    header = f"{'provider':<15} {'mode':<8} {'dtype':<5} {'B':>3} {'H':>3} {'seq':>6} {'D':>4} {'causal':>6} {'ms':>10} {'TFLOP/s':>8} {'peak MiB':>9}  status"
    print(header)
    rows = []
    for s in shapes(args, on_gpu):
        for mode in modes:
            for name, (fn, ctx) in provs.items():
                if name == "reference" and s.seq > args.reference_max_seq:
                    rows.append(Row(label, name, mode, **asdict(s), ms=None, tflops=None, peak_mem_mib=None,
                                    status=f"skipped: seq > --reference-max-seq {args.reference_max_seq}"))
                    continue
                r = run_one(name, fn, ctx, s, mode, device, time_ms, label)
                rows.append(r)
                fmt = lambda x, f: format(x, f) if x is not None else "-"
                print(f"{name:<15} {mode:<8} {s.dtype:<5} {s.batch:>3} {s.heads:>3} {s.seq:>6} {s.head_dim:>4} "
                      f"{str(s.causal):>6} {fmt(r.ms, '10.3f')} {fmt(r.tflops, '8.4f')} "
                      f"{fmt(r.peak_mem_mib, '9.1f')}  {r.status}", flush=True)
    stem = write_results(rows, label, args.out_dir)
    print(f"wrote {stem}.csv, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
