"""Benchmark minillm's quantized matmul (int8 / int4 weights) against dequantize-then-matmul and fp16.

    python benchmarks/quant_matmul.py            # full sweep
    python benchmarks/quant_matmul.py --quick    # fewer shapes and repetitions

Providers, for y = x w^T with x (M, K) and w (N, K):
    minillm (Triton)        kernels/quant_matmul.py: codes read once, dequantized in registers
    dequantize + matmul     minillm.quantize.quant_matmul_reference: the whole weight dequantized
                            (in float32), then torch.matmul
    fp16 matmul             torch.matmul with the weight already in x's dtype (the unquantized baseline)
Shapes are those of LLM projections (K -> N: 4096 -> 4096, 4096 -> 11008, 11008 -> 4096) at M = 1
(one token decoding) and M = 16, 256 (batched decoding, prefill). Decoding is bound by reading the
weight, so the figure of merit is GB/s of the bytes a perfect kernel moves:

    bytes = N*K*b/8 (codes) + N*G*(4 + z) (scales, zero points) + M*K*s (x) + M*N*s (y)
    with b bits a weight, G = K / group_size groups a row, z = 1 with zero points, s bytes of x's dtype;
    the fp16 matmul reads N*K*s weight bytes instead. GB/s = bytes / time / 1e9.

Writes CSV and JSON labelled with the device to benchmarks/results/. Without a GPU the Triton
kernel cannot run: the program says so, times only the PyTorch providers at small shapes and
labels every figure CPU. It never prints a GPU number it did not measure.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys

import torch

from minillm.quantize import dequantize_weight, quant_matmul_reference, quantize_weight

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from layer_norm import bench  # noqa: E402  (one timing rule for the kernel benchmarks: do_bench on a GPU)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
VARIANTS = [(8, "symmetric", None), (8, "asymmetric", None), (4, "symmetric", 128), (4, "asymmetric", 128)]


def bytes_moved(m, n, k, bits, group_size, zeros, act_bytes):
    """The bytes formula of the module docstring; bits=None: the weight in x's dtype (fp16 matmul)."""
    activations = m * k * act_bytes + m * n * act_bytes
    if bits is None:
        return n * k * act_bytes + activations
    groups = k // (group_size or k)
    return n * k * bits // 8 + n * groups * (4 + (1 if zeros else 0)) + activations


def device_label(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def run(args):
    if torch.cuda.is_available():
        device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
        shapes = [(4096, 4096), (4096, 11008), (11008, 4096)]
        rows = [1, 16, 256]
        reps = 25 if args.quick else 100
    else:
        print("No GPU present: the Triton kernel needs a CUDA device and is not timed here.\n"
              "Timing only the PyTorch providers (dequantize + matmul, float matmul) at small shapes;\n"
              "every figure below is CPU, in float32 (CPU half-precision matmuls are not representative).")
        device, dtype = torch.device("cpu"), torch.float32
        shapes = [(1024, 1024)] if args.quick else [(1024, 1024), (1024, 2816)]
        rows = [1, 16]
        reps = 5 if args.quick else 20
    label = device_label(device)
    act_bytes = torch.finfo(dtype).bits // 8
    print(f"device: {label}   activations: {dtype}")
    print(f"{'K':>6}{'N':>7}{'M':>5}  {'weights':<22}{'provider':<22}{'ms':>9}{'GB/s':>9}")
    records = []
    gen = torch.Generator().manual_seed(0)
    for k, n in shapes:
        w = torch.randn(n, k, generator=gen) * 0.02
        for m in rows:
            x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
            w_float = w.to(device=device, dtype=dtype)
            exact = torch.matmul(x.float(), w.to(device).t())
            # (provider, bits, scheme, group, fn, what it must match: the float product, or for
            # quantized weights the float product with the dequantized weight)
            cases = [("fp16 matmul" if dtype == torch.float16 else f"{str(dtype)[6:]} matmul", None, None, None,
                      lambda: torch.matmul(x, w_float.t()), exact)]
            for bits, scheme, group in VARIANTS:
                q = quantize_weight(w, bits, group, scheme)
                qw, scales = q.qweight.to(device), q.scales.to(device)
                zeros = None if q.zeros is None else q.zeros.to(device)
                deq = dequantize_weight(qw, scales, zeros, bits, q.group_size)
                expected = torch.matmul(x.float(), deq.t())
                cases.append(("dequantize + matmul", bits, scheme, group,
                              lambda qw=qw, s=scales, z=zeros, b=bits, g=q.group_size:
                              quant_matmul_reference(x, qw, s, z, b, g), expected))
                if device.type == "cuda":
                    from minillm.kernels.quant_matmul import quant_matmul

                    cases.append(("minillm (Triton)", bits, scheme, group,
                                  lambda qw=qw, s=scales, z=zeros, b=bits, g=q.group_size: quant_matmul(x, qw, s, z, b, g),
                                  expected))
            for provider, bits, scheme, group, fn, expected in cases:
                with torch.no_grad():
                    err = (fn().float() - expected).abs().max().item()
                    if err > 0.02 * expected.abs().max().item() + 0.02:  # a wrong result stops the run
                        raise AssertionError(f"{provider} int{bits} {scheme}: error {err:.3g} against fp32")
                    t = bench(fn, device, reps)
                weights = "float" if bits is None else (f"int{bits} {scheme[:4]} " +
                                                        ("per-channel" if group is None else f"g{group}"))
                gbs = bytes_moved(m, n, k, bits, group, scheme == "asymmetric", act_bytes) / t / 1e9
                records.append(dict(device=label, device_type=device.type, k=k, n=n, m=m, weights=weights,
                                    provider=provider, dtype=str(dtype), ms=t * 1e3, gb_per_s=gbs))
                print(f"{k:>6}{n:>7}{m:>5}  {weights:<22}{provider:<22}{t * 1e3:>9.3f}{gbs:>9.1f}")
    save(records, label, device)


def save(records, label, device):
    os.makedirs(RESULTS, exist_ok=True)
    slug = "".join(c if c.isalnum() else "_" for c in label.split(" (")[0]).strip("_").lower()
    stem = os.path.join(RESULTS, f"quant_matmul_{slug}")
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    with open(stem + ".json", "w") as f:
        json.dump({"device": label, "torch": torch.__version__, "results": records}, f, indent=1)
    print(f"wrote {stem}.csv and {stem}.json ({device.type})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                        help="activation dtype on GPU (CPU uses float32)")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
