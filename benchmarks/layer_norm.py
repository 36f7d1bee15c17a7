"""Benchmark minillm's Triton LayerNorm/RMSNorm against torch and torch.compile.

    python benchmarks/layer_norm.py            # full sweep
    python benchmarks/layer_norm.py --quick    # fewer sizes and repetitions

Normalisation is memory-bound, so the figure of merit is bandwidth: GB/s of the bytes a perfect
kernel must move (formula printed below; the same for every provider), and that as a
percentage of the device's copy bandwidth, measured in the same run by a device-to-device copy.
Writes CSV, JSON and a PNG chart labelled with the device to benchmarks/results/.

Without a GPU the Triton kernels cannot run: the program says so, times only the PyTorch
providers at small sizes and labels every figure CPU. It never prints a GPU number it did not
measure.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BYTES_FORMULA = (
    "bytes moved, M rows of N elements of s bytes, P parameter vectors (2 for layer_norm: w, b;\n"
    "1 for rms_norm: w) of s_w bytes:\n"
    "  forward:  read x, write y                 = 2*M*N*s + P*N*s_w\n"
    "  backward: read x and dy, write dx; read w,\n"
    "            write dw (and db)              = 3*M*N*s + (1 + P)*N*s_w\n"
    "  GB/s = bytes / time / 1e9; per-row statistics (8 bytes a row) are left out")


def bytes_moved(op, mode, m, n, dtype, wdtype):
    s, sw = torch.finfo(dtype).bits // 8, torch.finfo(wdtype).bits // 8
    p = 2 if op == "layer_norm" else 1
    return 2 * m * n * s + p * n * sw if mode == "forward" else 3 * m * n * s + (1 + p) * n * sw


def bench(fn, device, reps):
    """Median seconds per call. On a GPU triton's do_bench (CUDA events, L2 flushed between
    calls, so small problems cannot run from cache); on CPU wall-clock time."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=reps * 4, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device, reps):
    """GB/s of dst.copy_(src): 2 bytes moved per byte copied."""
    nbytes = (1 << 30) if device.type == "cuda" else (1 << 27)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / bench(lambda: dst.copy_(src), device, reps) / 1e9


def providers(op, n, device, include_ours=None):
    """name -> f(x, w, b) for this op and row length. include_ours: time minillm's kernels
    (default: on CUDA only; benchmarks/gpu_suite.py --dry asks for them under the interpreter)."""
    if op == "layer_norm":
        def eager(x, w, b):
            return F.layer_norm(x, (n,), w, b)
    else:
        def eager(x, w, b):
            return F.rms_norm(x, (n,), w)
    # Timing the backward alone re-runs it on one retained graph; compiled backwards that donate
    # their saved buffers refuse that, so donation is turned off for this benchmark.
    try:
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
    except (ImportError, AttributeError):  # older torch (2.4): no donation to turn off
        pass
    out = {"torch": eager, "torch.compile": torch.compile(eager, dynamic=False)}
    if device.type == "cuda" if include_ours is None else include_ours:
        from minillm.kernels import norms as ours

        if op == "layer_norm":
            out["minillm (Triton)"] = lambda x, w, b: ours.layer_norm(x, (n,), w, b)
        else:
            out["minillm (Triton)"] = lambda x, w, b: ours.rms_norm(x, (n,), w)
    return out


def run_case(op, provider, fn, m, n, dtype, wdtype, device, reps):
    """Forward and backward seconds for one provider, after checking it against torch."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, n, device=device, dtype=dtype, generator=gen).requires_grad_()
    w = (1 + 0.1 * torch.randn(n, device=device, generator=gen)).to(wdtype).requires_grad_()
    b = (0.1 * torch.randn(n, device=device, generator=gen)).to(wdtype).requires_grad_()
    dy = torch.randn(m, n, device=device, dtype=dtype, generator=gen)
    params = [x, w, b] if op == "layer_norm" else [x, w]
    y = fn(x, w, b)
    expected = (F.layer_norm(x.float(), (n,), w.float(), b.float()) if op == "layer_norm"
                else F.rms_norm(x.float(), (n,), w.float()))
    err = (y.float() - expected).abs().max().item()
    if err > 0.1:
        raise AssertionError(f"{provider} {op} M={m} N={n}: max error {err:.3g} against torch fp32")
    t_fwd = bench(lambda: fn(x, w, b), device, reps)
    t_bwd = bench(lambda: torch.autograd.grad(y, params, dy, retain_graph=True), device, reps)
    return t_fwd, t_bwd


def device_label(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    parser.add_argument("--rows", type=int, default=None, help="rows M (default 4096 on GPU)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"],
                        help="activation dtype on GPU (weights are float32); CPU uses float32")
    args = parser.parse_args()

    if torch.cuda.is_available():
        device = torch.device("cuda")
        dtype, wdtype = getattr(torch, args.dtype), torch.float32
        rows = args.rows or 4096
        hidden = [1024, 4096, 16384] if args.quick else [1024, 2048, 4096, 8192, 16384]
        reps = 25 if args.quick else 100
    else:
        print("No GPU present: the Triton kernels need a CUDA device and are not timed here.\n"
              "Timing only the PyTorch providers at small sizes; every figure below is CPU.\n"
              "(CPU working sets this small stay in cache, so '% copy' can exceed 100.)")
        device = torch.device("cpu")
        dtype = wdtype = torch.float32
        rows = args.rows or 256
        hidden = [1024] if args.quick else [1024, 4096]
        reps = 5 if args.quick else 20
    label = device_label(device)
    print(f"device: {label}   dtype: {dtype} (weights {wdtype})   rows M = {rows}")
    print(BYTES_FORMULA)
    copy_gbs = copy_bandwidth(device, reps)
    print(f"copy bandwidth (dst.copy_(src), {device.type}): {copy_gbs:.1f} GB/s\n")

    records = []
    print(f"{'op':<11}{'N':>6}  {'provider':<17}{'mode':<9}{'ms':>9}{'GB/s':>9}{'% copy':>8}")
    for op in ("layer_norm", "rms_norm"):
        for n in hidden:
            for provider, fn in providers(op, n, device).items():
                try:
                    t_fwd, t_bwd = run_case(op, provider, fn, rows, n, dtype, wdtype, device, reps)
                except AssertionError:  # a wrong result stops the run
                    raise
                except Exception as e:  # torch.compile without a working toolchain, for instance
                    print(f"{op:<11}{n:>6}  {provider:<17}unavailable: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:100]}")
                    continue
                for mode, t in (("forward", t_fwd), ("backward", t_bwd)):
                    gbs = bytes_moved(op, mode, rows, n, dtype, wdtype) / t / 1e9
                    records.append(dict(device=label, device_type=device.type, op=op, provider=provider,
                                        mode=mode, rows=rows, hidden=n, dtype=str(dtype), ms=t * 1e3,
                                        gb_per_s=gbs, pct_of_copy=100 * gbs / copy_gbs))
                    print(f"{op:<11}{n:>6}  {provider:<17}{mode:<9}{t * 1e3:>9.3f}{gbs:>9.1f}"
                          f"{100 * gbs / copy_gbs:>7.0f}%")
    if device.type == "cuda":
        summarize_targets(records)
    save(records, label, device, copy_gbs)


def summarize_targets(records):
    """Issue 4's targets: >= 85% of copy bandwidth at N >= 4096, and ahead of torch everywhere."""
    ours = [r for r in records if r["provider"] == "minillm (Triton)"]
    for r in ours:
        torch_ms = next((t["ms"] for t in records if t["provider"] == "torch" and
                         all(t[k] == r[k] for k in ("op", "mode", "hidden"))), None)
        bw_ok = r["hidden"] < 4096 or r["pct_of_copy"] >= 85
        faster = torch_ms is not None and r["ms"] < torch_ms
        print(f"target {r['op']:<11}{r['mode']:<9}N={r['hidden']:<6} {r['pct_of_copy']:5.0f}% of copy "
              f"{'ok' if bw_ok else 'BELOW 85%'}; vs torch {'faster' if faster else 'NOT faster'}")


def save(records, label, device, copy_gbs):
    os.makedirs(RESULTS, exist_ok=True)
    slug = "".join(c if c.isalnum() else "_" for c in label.split(" (")[0]).strip("_").lower()
    stem = os.path.join(RESULTS, f"layer_norm_{slug}")
    if records:
        with open(stem + ".csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    with open(stem + ".json", "w") as f:
        json.dump({"device": label, "copy_gb_per_s": copy_gbs, "bytes_formula": BYTES_FORMULA,
                   "torch": torch.__version__, "results": records}, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {stem}.csv/.json (matplotlib not installed: no chart)")
        return
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for row, op in enumerate(("layer_norm", "rms_norm")):
        for col, mode in enumerate(("forward", "backward")):
            ax = axes[row][col]
            for provider in dict.fromkeys(r["provider"] for r in records):
                pts = [(r["hidden"], r["gb_per_s"]) for r in records
                       if r["op"] == op and r["mode"] == mode and r["provider"] == provider]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=provider)
            ax.axhline(copy_gbs, color="grey", linestyle="--", label="copy bandwidth")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{op} {mode}")
            ax.set_xlabel("hidden size N")
            ax.set_ylabel("GB/s")
            ax.legend(fontsize=8)
    rows = records[0]["rows"] if records else "?"
    fig.suptitle(f"minillm norms, {label}, M = {rows} rows, {records[0]['dtype'] if records else ''}")
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=120)
    print(f"wrote {stem}.csv, {stem}.json, {stem}.png ({device.type})")


if __name__ == "__main__":
    main()
