"""Quantized copies of one checkpoint: size on disk, held-out loss, and generation latency.

    python benchmarks/quantize.py --checkpoint runs/pretrain-gpt
    python benchmarks/quantize.py --checkpoint runs/pretrain-gpt --quick     # int8 and int4 symmetric only

For the float checkpoint and each variant (int8 per channel and int4 in groups of --group-size,
symmetric and asymmetric), written with minillm.checkpoint.quantize_checkpoint into a temporary
directory: model.safetensors' size, the metrics `minillm evaluate` reports (recipes.evaluate,
the checkpoint's own held-out data, --max-batches batches), and the median seconds to decode
--new-tokens tokens greedily after a short prompt, with the KV cache, batch 1 (ms per token).

The latency is measured on the device the model runs on here. On CPU a quantized layer runs
through the reference (dequantize the whole weight, then torch.matmul), which is slower than the
float layer: that figure is labelled CPU and says nothing about the Triton kernel, which needs a
GPU (benchmarks/quant_matmul.py times it there). Writes a JSON file to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from minillm import checkpoint as ckpt
from minillm import recipes
from minillm.generation import generate

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = [(8, "symmetric"), (8, "asymmetric"), (4, "symmetric"), (4, "asymmetric")]


def decode_seconds_per_token(model, tokenizer, new_tokens: int, reps: int, device) -> float:
    """Median seconds per generated token: greedy, batch 1, KV cache, EOS ignored."""
    prompt = torch.tensor([tokenizer.encode("Return the")], device=device)  # (1, T)
    times = []
    with torch.no_grad():
        generate(model, prompt, max_new_tokens=2)  # warm-up
        for _ in range(reps):
            t0 = time.perf_counter()
            out = generate(model, prompt, max_new_tokens=new_tokens)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) / (out.shape[1] - prompt.shape[1]))
    return statistics.median(times)


def measure(path, label, args, device) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):  # evaluate prints its line; we print a table
        metrics = recipes.evaluate(path, max_batches=args.max_batches, device=device.type)
    model, _, tokenizer = ckpt.load_model(path)
    model.to(device)
    seconds = decode_seconds_per_token(model, tokenizer, args.new_tokens, args.reps, device)
    size = (ckpt.resolve_checkpoint(path) / ckpt.WEIGHTS).stat().st_size
    loss = metrics.get("val_loss")
    return {"weights": label, "bytes": size, "val_loss": loss, "ms_per_token": seconds * 1e3}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a causal-LM checkpoint or run directory")
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size (default: %(default)s)")
    parser.add_argument("--max-batches", type=int, default=0, help="evaluate batches (default: 0, all)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per timing (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=5, help="timings per variant (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="only int8 and int4 symmetric")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    print(f"device: {label}; quantized layers run through "
          f"{'the Triton kernel' if device.type == 'cuda' else 'the PyTorch reference (dequantize, then matmul)'}")
    rows = [measure(args.checkpoint, "float32", args, device)]
    variants = [(8, "symmetric"), (4, "symmetric")] if args.quick else VARIANTS
    with tempfile.TemporaryDirectory() as tmp:
        for bits, scheme in variants:
            group = None if bits == 8 else args.group_size
            out = ckpt.quantize_checkpoint(args.checkpoint, Path(tmp) / f"int{bits}-{scheme}", bits, group, scheme)
            grouping = "per channel" if group is None else f"groups of {group}"
            rows.append(measure(out, f"int{bits} {scheme}, {grouping}", args, device))
    base = rows[0]
    print(f"{'weights':<34}{'model.safetensors':>18}{'val_loss':>10}{'change':>9}{'ms/token':>10}")
    for row in rows:
        change = row["val_loss"] - base["val_loss"]
        print(f"{row['weights']:<34}{row['bytes'] / 1e6:>14.3f} MB{row['val_loss']:>10.4f}{change:>+9.4f}"
              f"{row['ms_per_token']:>10.2f}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"quantize_{device.type}.json"
    path.write_text(json.dumps({"device": label, "checkpoint": str(args.checkpoint), "torch": torch.__version__,
                                "new_tokens": args.new_tokens, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path} ({device.type})")


if __name__ == "__main__":
    main()
