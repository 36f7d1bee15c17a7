"""The one place that decides how attention, normalisation and quantized matmuls run.

The model calls `attention(...)`, `layer_norm(...)` and `rms_norm(...)` from here and never knows
how a kernel is launched; kernels never import model code. Each function takes a `backend` name
from the model config and picks an implementation by backend, device and dtype:

attention backends
    reference  the explicit `softmax(QK^T / sqrt(d_k)) V` in PyTorch (minillm/attention.py)
    sdpa       torch.nn.functional.scaled_dot_product_attention (flash / efficient / cuDNN / math)
    triton     minillm's fused FlashAttention-2 kernel (CUDA tensors; CPU tensors only when the
               Triton interpreter is on, which is how the tests run it)
    auto       triton on CUDA for the shapes where a committed GPU measurement (docs/measured/, written
               by benchmarks/gpu_suite.py) shows it at least as fast as SDPA on this GPU generation;
               sdpa everywhere else, and everywhere on CPU. The rule, the shape key and the files it
               reads are in minillm/measured.py. Inside torch.compile auto is sdpa (the measurements
               are of eager calls). No GPU measurement is committed yet, so today auto is sdpa
               everywhere.

norm backends
    torch      torch.nn.functional.layer_norm / rms_norm
    triton     minillm's fused norm kernels (same device rule as attention)
    auto       triton on CUDA where Triton is installed and a committed GPU measurement shows it at least
               as fast as torch for this op, dtype and hidden size on this GPU generation (same rule
               and files as attention, minillm/measured.py); torch elsewhere: on CPU, inside
               torch.compile (which fuses norms with their neighbours), on CUDA without Triton (no
               error, no warning: auto means "the best measured here", not "Triton"), and today
               everywhere, since no GPU measurement is committed yet.

The `triton` backends call minillm's public kernel functions (kernels/attention.py's
scaled_dot_product_attention, kernels/norms.py's layer_norm and rms_norm), which check their
inputs and run as the torch custom ops of kernels/ops.py (`torch.ops.minillm.attention_forward`,
`norm_forward`, each with its backward registered). So `torch.compile(model, fullgraph=True)` traces
a model on the `triton` backends in one graph, forward and backward, with the kernels as opaque
nodes. The device rule is the same eager and compiled: CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1 (the kernels then run in Triton's interpreter); a CPU tensor without it is
refused rather than quietly given another implementation.

Triton is optional (the package installs it on Linux only) and imported only when a Triton kernel
is about to run: `import minillm`, the reference, sdpa and torch backends, and `auto` on CPU never
import it. Asking for `triton` where it is not installed raises a ValueError that says so and
names the backends to use instead.

quantized matmul backends (QuantizedLinear.backend, minillm.quantized)
    reference  dequantize the whole weight, then torch.matmul (minillm/quantize.py)
    triton     minillm's kernel, dequantizing in registers (kernels/quant_matmul.py; same device rule)
    auto       triton on CUDA when Triton is installed and the kernel takes the layer's group size
               (a whole row, or a multiple of its K tile), the reference elsewhere.

A backend that cannot run the inputs it is given raises a ValueError; nothing falls back silently.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from minillm import measured
from minillm.attention import attention_reference
from minillm.quantize import quant_matmul_reference

_ATTENTION_INSTEAD = "attn_backend='auto', 'sdpa' or 'reference'"
_NORM_INSTEAD = "norm_backend='auto' or 'torch'"


@functools.cache
def triton_available() -> bool:
    """Whether `import triton` works here; asked only when a Triton kernel might run."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_can_run(x: torch.Tensor) -> bool:
    """Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    return x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _require_triton(x: torch.Tensor, what: str, instead: str) -> None:
    """Raise unless `what`='triton' can run on x; `instead` names the other backends of its kind."""
    if not triton_available():
        raise ValueError(
            f"{what}='triton' needs Triton, which is not installed (`import triton` fails; minillm "
            f"installs it on Linux only). Use {instead} instead."
        )
    if not _triton_can_run(x):
        raise ValueError(
            f"{what}='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); got device {x.device}. "
            f"Use {instead} on this device."
        )


def _mode(x: torch.Tensor) -> str:
    """"fwd+bwd" when autograd will run this op's backward, else "fwd" (a key of minillm/measured.py)."""
    return "fwd+bwd" if torch.is_grad_enabled() and x.requires_grad else "fwd"


def _auto_attention(query, key, attn_mask, dropout_p, is_causal) -> str:
    """sdpa, or triton where minillm/measured.py's committed measurements show it winning."""
    if not query.is_cuda or attn_mask is not None or dropout_p > 0.0 or not triton_available():
        return "sdpa"
    if torch.compiler.is_compiling():
        return "sdpa"  # the measurements are of eager calls; the compiler traces SDPA natively
    if key is not None and (key.shape[1] != query.shape[1] or key.shape[2] != query.shape[2]):
        return "sdpa"  # grouped-query heads or Lq != Lk: not what the suite measures
    wins = measured.committed().attention_wins(
        measured.capability(query.device.index or 0), measured.dtype_name(query.dtype), query.shape[-1],
        is_causal, _mode(query), query.shape[2])
    return "triton" if wins else "sdpa"


def resolve_attention_backend(backend: str, query: torch.Tensor, key: torch.Tensor | None = None, *,
                              attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                              is_causal: bool = False) -> str:
    """Map "auto" to a concrete backend for these inputs; check the others can run here.

    key=None means self-attention (key shaped like query)."""
    if backend == "auto":
        return _auto_attention(query, key, attn_mask, dropout_p, is_causal)
    if backend == "triton":
        _require_triton(query, "attn_backend", _ATTENTION_INSTEAD)
    elif backend not in ("reference", "sdpa"):
        raise ValueError(f"attn_backend: got {backend!r}, expected one of 'auto', 'reference', 'sdpa', 'triton'")
    return backend


def attention(
    query: torch.Tensor,  # (B, H, Tq, D)
    key: torch.Tensor,  # (B, Hkv, Tk, D)
    value: torch.Tensor,  # (B, Hkv, Tk, D)
    *,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,  # multiplier of Q K^T; None = 1 / sqrt(D)
    backend: str = "auto",
) -> torch.Tensor:  # (B, H, Tq, D)
    """softmax(Q K^T * scale + mask) V with grouped-query heads, by the chosen backend.

    attn_mask: bool (True = attend) or additive float, broadcastable to (B, H, Tq, Tk)."""
    enable_gqa = query.shape[1] != key.shape[1]
    chosen = resolve_attention_backend(backend, query, key, attn_mask=attn_mask, dropout_p=dropout_p,
                                       is_causal=is_causal)
    options = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    if enable_gqa:  # passed only when needed: torch 2.4's SDPA has no enable_gqa argument
        options["enable_gqa"] = True
    if chosen == "reference":
        return attention_reference(query, key, value, **options)
    if chosen == "sdpa":
        if query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16):
            return _cpu_sdpa_in_fp32(query, key, value, options)
        return F.scaled_dot_product_attention(query, key, value, **options)
    from minillm.kernels.attention import scaled_dot_product_attention

    return scaled_dot_product_attention(query, key, value, **options)


def _cpu_sdpa_in_fp32(query, key, value, options: dict) -> torch.Tensor:
    """SDPA of bf16/fp16 inputs on a CPU, computed in fp32 and returned in the inputs' dtype.

    torch's CPU attention kernels are slower in half precision than in fp32: at the tiny GPT's
    shapes, bf16 autocast made its backward 5x slower (2.8 ms against 0.53 ms per call) and the whole
    training step spent 41% of its time there (benchmarks/step.py, under torch.profiler). The
    matmuls around it stay in bf16, where they are faster. Autocast is off inside, so it cannot cast
    the fp32 inputs back down."""
    mask = options["attn_mask"]
    if mask is not None and mask.is_floating_point():
        options = {**options, "attn_mask": mask.float()}  # an additive mask takes the scores' dtype
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), **options)
    return out.to(query.dtype)


def _use_triton_norm(x: torch.Tensor, backend: str, op: str = "layer_norm") -> bool:
    if backend == "auto":
        # Under torch.compile, Inductor fuses torch's norm with its neighbours; our kernel would be
        # an opaque custom op that it cannot fuse.
        if not x.is_cuda or torch.compiler.is_compiling() or not triton_available():
            return False
        return measured.committed().norm_wins(measured.capability(x.device.index or 0),
                                              op, measured.dtype_name(x.dtype), _mode(x), x.shape[-1])
    if backend == "triton":
        _require_triton(x, "norm_backend", _NORM_INSTEAD)
        return True
    if backend == "torch":
        return False
    raise ValueError(f"norm_backend: got {backend!r}, expected one of 'auto', 'torch', 'triton'")


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, backend: str = "auto"
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dimension."""
    if _use_triton_norm(x, backend):
        from minillm.kernels.norms import layer_norm as triton_layer_norm

        return triton_layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, backend: str = "auto") -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension."""
    if _use_triton_norm(x, backend, "rms_norm"):
        from minillm.kernels.norms import rms_norm as triton_rms_norm

        return triton_rms_norm(x, (x.shape[-1],), weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


_QUANT_INSTEAD = "backend='auto' or 'reference'"


def resolve_quant_backend(backend: str, x: torch.Tensor, group_size: int, in_features: int) -> str:
    """'triton' or 'reference' for a quantized matmul of x. auto: the Triton kernel on CUDA when
    Triton is installed and the kernel takes this group size (kernels/quant_matmul.py:
    `kernel_supports`), else the reference (dequantize the weight, then torch.matmul)."""
    if backend == "auto":
        if not (x.is_cuda and triton_available()):
            return "reference"
        from minillm.kernels.quant_matmul import kernel_supports

        return "triton" if kernel_supports(group_size, in_features) else "reference"
    if backend == "triton":
        _require_triton(x, "quant backend", _QUANT_INSTEAD)
        return "triton"
    if backend == "reference":
        return "reference"
    raise ValueError(f"quant backend: got {backend!r}, expected one of 'auto', 'reference', 'triton'")


def quant_matmul(
    x: torch.Tensor,  # (..., K)
    qweight: torch.Tensor,  # (N, K) int8/uint8, or (N, K/2) uint8 packed int4
    scales: torch.Tensor,  # (N, K / group_size)
    zeros: torch.Tensor | None,  # (N, K / group_size) uint8, asymmetric only
    bits: int,
    group_size: int,
    backend: str = "auto",
) -> torch.Tensor:  # (..., N)
    """x @ w'^T with w' the dequantized weight (minillm.quantize), by the chosen backend."""
    in_features = qweight.shape[-1] * (2 if bits == 4 else 1)
    if resolve_quant_backend(backend, x, group_size, in_features) == "reference":
        return quant_matmul_reference(x, qweight, scales, zeros, bits, group_size)
    from minillm.kernels.quant_matmul import quant_matmul as triton_quant_matmul

    return triton_quant_matmul(x, qweight, scales, zeros, bits, group_size)
