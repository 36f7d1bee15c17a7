"""Which shapes minillm's Triton kernels have been *measured* to win: the rule behind `auto`.

`attn_backend="auto"` and `norm_backend="auto"` (minillm/dispatch.py) pick minillm's Triton
kernels only where a committed GPU measurement shows them at least as fast as what would run
otherwise, on the same GPU generation; everywhere else they pick SDPA / torch. The evidence is
the JSON that benchmarks/gpu_suite.py writes, committed under docs/measured/ as

    docs/measured/gpu_suite_<name>/gpu_suite.json     (what `--out docs/measured/gpu_suite_<name>` writes)
    docs/measured/gpu_suite_<name>.json               (a result file committed on its own)

A file counts only if it was measured on CUDA (`"dry": false`, `"device_type": "cuda"`); a dry
run on CPU is never evidence. The files are read once, on the first `auto` choice for a CUDA
tensor, and cached for the life of the process; CPU tensors never get here.

The shape key
-------------
attention  (compute capability "major.minor", dtype, head dim D, causal, mode, seq bucket)
norms      (compute capability, op "layer_norm"/"rms_norm", dtype, mode, hidden bucket)

mode is "fwd+bwd" when autograd will need the backward (grad enabled and the input requires
grad), "fwd" otherwise. The bucket is the measured size nearest to the actual one on a log2
scale (ties go to the smaller), and only within a factor of 2 of the measured range: a length
of 300 looks up 256 or 512, whichever is nearer, and a length of 100 when the smallest measured
is 512 has no bucket. Ours "wins" a key when its time is at most the baseline's:

    attention  provider "minillm" vs provider "sdpa" (torch's SDPA with its own backend choice,
               which is exactly what `auto` would otherwise run)
    norms      provider "minillm (Triton)" vs provider "torch" (eager F.layer_norm / F.rms_norm)

Several files measuring the same key must all agree for ours to win. Attention with a mask, with
dropout, with grouped-query heads or with Lq != Lk is not what the suite measures, so `auto`
keeps SDPA there. No file, no key, no bucket: SDPA / torch.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

OURS_ATTENTION, BASELINE_ATTENTION = "minillm", "sdpa"
OURS_NORM, BASELINE_NORM = "minillm (Triton)", "torch"
MEASURED_DIR = Path(__file__).resolve().parent.parent / "docs" / "measured"


def dtype_name(dtype: torch.dtype) -> str:
    """"bf16", "fp16", "fp32": the names the suite's rows use."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def _nearest(size: int, measured: list[int]) -> int | None:
    """The measured size nearest to `size` in log2, None outside [smallest / 2, largest * 2]."""
    if not measured or size < measured[0] / 2 or size > measured[-1] * 2:
        return None
    return min(measured, key=lambda m: (abs(math.log2(size / m)), m))


@dataclass
class Measurements:
    """Per shape key (without its size), {measured size: ours at least as fast as the baseline}."""

    wins: dict[tuple, dict[int, bool]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def _record(self, key: tuple, size: int, ours_wins: bool) -> None:
        sizes = self.wins.setdefault(key, {})
        sizes[size] = sizes.get(size, True) and ours_wins  # every file must agree

    def _lookup(self, key: tuple, size: int) -> bool:
        sizes = self.wins.get(key)
        bucket = _nearest(size, sorted(sizes)) if sizes else None
        return bucket is not None and sizes[bucket]

    def attention_wins(self, capability: str, dtype: str, head_dim: int, causal: bool, mode: str, seq: int) -> bool:
        return self._lookup(("attention", capability, dtype, head_dim, causal, mode), seq)

    def norm_wins(self, capability: str, op: str, dtype: str, mode: str, hidden: int) -> bool:
        return self._lookup(("norm", capability, op, dtype, mode), hidden)


def result_files(folder: Path = MEASURED_DIR) -> list[Path]:
    """The suite's result files under `folder`, in both committed layouts, sorted."""
    return sorted([*folder.glob("gpu_suite_*/gpu_suite.json"), *folder.glob("gpu_suite_*.json")])


def load(paths) -> Measurements:
    """Read suite result files; files from a dry run or without CUDA are skipped."""
    found = Measurements()
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        if result.get("dry", True) or result.get("device_type") != "cuda":
            continue
        capability = result["environment"]["capability"]
        found.files.append(str(path))
        attention = [r for r in result.get("attention", {}).get("rows", []) if r.get("ms") is not None]
        times = {(r["provider"], r["dtype"], r["head_dim"], r["causal"], r["mode"], r["seq"]): r["ms"]
                 for r in attention}
        for (provider, *shape), ours_ms in times.items():
            baseline_ms = times.get((BASELINE_ATTENTION, *shape))
            if provider == OURS_ATTENTION and baseline_ms is not None:
                dtype, head_dim, causal, mode, seq = shape
                found._record(("attention", capability, dtype, head_dim, causal, mode), seq, ours_ms <= baseline_ms)
        norms = [r for r in result.get("norms", {}).get("rows", []) if r.get("ms") is not None]
        times = {(r["provider"], r["op"], r["dtype"], r["mode"], r["hidden"]): r["ms"] for r in norms}
        for (provider, *shape), ours_ms in times.items():
            baseline_ms = times.get((BASELINE_NORM, *shape))
            if provider == OURS_NORM and baseline_ms is not None:
                op, dtype, mode, hidden = shape
                found._record(("norm", capability, op, dtype, mode), hidden, ours_ms <= baseline_ms)
    return found


@functools.cache
def committed() -> Measurements:
    """The committed measurements (docs/measured/), read once per process."""
    return load(result_files())


@functools.cache
def capability(device_index: int) -> str:
    """"major.minor" of a CUDA device, e.g. "9.0" for H100/H200, "8.0" for A100."""
    major, minor = torch.cuda.get_device_capability(device_index)
    return f"{major}.{minor}"
