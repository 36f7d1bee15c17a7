"""Where a run executes: torchrun's processes, the device, the precision, and seeds.

Launched by torchrun (``WORLD_SIZE`` > 1 in the environment), :func:`setup` joins the process
group: NCCL on GPUs, gloo on CPU. The collective helpers below are no-ops in a single process,
so the training loop reads the same either way.
"""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch
import torch.distributed as dist

# Dense bf16/fp16 tensor-core peak FLOP/s by GPU name (vendor data sheets); MFU is measured
# against it (Chowdhery et al., 2022). Longer names first: "H100 PCIe" before "H100".
PEAK_FLOPS = {
    "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12,
    "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12, "V100": 125e12, "T4": 65e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12,
}


def world_size() -> int:
    """Processes of this run (torchrun's WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: str) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; joins the process group."""
    world = world_size()
    if world == 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank


def pick_device(device: str, local_rank: int) -> torch.device:
    """TrainConfig.device ("auto", "cpu", "cuda") as a torch device for this process."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("TrainConfig.device: got 'cuda', but torch sees no CUDA device")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), where bf16 autocast makes
    a training step faster; elsewhere bf16 is emulated and slower than fp32."""
    checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(check() for check in checks if check is not None)


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    """TrainConfig.precision as the autocast dtype ("auto": bf16 on a GPU that has it and on a CPU
    that computes it natively, fp32 elsewhere)."""
    if precision == "auto":
        if device.type == "cuda":
            use_bf16 = torch.cuda.is_bf16_supported()
        else:
            use_bf16 = device.type == "cpu" and cpu_has_native_bf16()
        return torch.bfloat16 if use_bf16 else torch.float32
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("TrainConfig.precision: 'fp16' needs a CUDA device (use 'bf16' or 'fp32' on CPU)")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of a CUDA device by name, None on CPU or an unknown GPU (then no MFU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_FLOPS[key]
    return None


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices); call before building the model."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- collectives


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_sum(value: float, device: torch.device) -> float:
    """The sum of a number over all ranks."""
    if not is_distributed():
        return value
    t = torch.tensor(value, device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is True on one of them."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor(int(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sum_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor summed over all ranks, in place (counts, loss sums, confusion matrices)."""
    if is_distributed():
        for t in tensors.values():
            dist.all_reduce(t)
    return tensors


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def autocast(device: torch.device, dtype: torch.dtype):
    """The autocast context for a run's precision; none at all for fp32 (even a disabled one costs time)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
