"""The three-way tolerance rule that every kernel check uses: the tests and benchmarks/gpu_suite.py.

A kernel at low precision cannot match an exact answer exactly, so "close enough" is measured
against PyTorch doing the same job at the same precision. Three results are computed:

    ours    the kernel's output (or gradient), at the inputs' dtype
    same    PyTorch's own implementation at that dtype
    ref     the reference in float64

and the kernel passes when, in max norm,

    |ours - ref| <= factor * |same - ref| + floor

with FlashAttention's factors: OUTPUT_FACTOR = 2 for outputs, GRAD_FACTOR = 3 for gradients.
The floor absorbs about one unit in the last place where PyTorch's own error happens to be tiny
(and Triton's interpreter truncating fp32 -> fp16/bf16 casts instead of rounding). Attention's
floor is absolute (its outputs are averages of values of size ~1); the norms' floor is scaled by
the reference's magnitude, since a norm's output grows with its weight.

Torch only: importing this never imports Triton, so it runs wherever the checks run (CPU tests
under TRITON_INTERPRET=1, or a GPU). A failed check raises ToleranceError, an AssertionError
whose message names the case, the tensor and both errors.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

OUTPUT_FACTOR, GRAD_FACTOR = 2, 3
ATTENTION_FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-6}
NORM_FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-6}  # x max(1, |ref|)


class ToleranceError(AssertionError):
    """A kernel result outside the three-way bound; the message names the case."""


def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64; 0 for empty tensors."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_three_way(what: str, ours: torch.Tensor, same: torch.Tensor, ref: torch.Tensor, factor: float,
                    floor: float) -> None:
    """Raise ToleranceError unless |ours - ref| <= factor * |same - ref| + floor (max norm)."""
    if not torch.isfinite(ours).all():
        raise ToleranceError(f"{what}: non-finite values")
    err, torch_err = max_abs_error(ours, ref), max_abs_error(same, ref)
    if not err <= factor * torch_err + floor:
        raise ToleranceError(f"{what}: kernel error {err:.3e} > {factor} x torch's {torch_err:.3e} "
                             f"+ floor {floor:.3e}")


# ---------------------------------------------------------------------------------------------
# Attention: fn(q, k, v) -> out, checked forward and for dQ, dK, dV
# ---------------------------------------------------------------------------------------------


def outputs_and_grads(fn: Callable, q, k, v, do, dtype) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Output and (dQ, dK, dV) of fn on fresh leaf copies of q, k, v cast to dtype."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, do.to(dtype))
    return out.detach(), grads


def attention_three_way(kernel_fn: Callable, reference_fn: Callable, q, k, v, do, label: str = ""):
    """Check the output and all three gradients of kernel_fn against reference_fn.

    kernel_fn(q, k, v) runs the kernel; reference_fn(q, k, v) runs the reference in whatever
    dtype its inputs have (q's dtype for PyTorch's own error, float64 for the oracle).
    Returns the kernel's output and gradients."""
    dtype = q.dtype
    out, grads = outputs_and_grads(kernel_fn, q, k, v, do, dtype)
    ref_out, ref_grads = outputs_and_grads(reference_fn, q, k, v, do, torch.float64)
    low_out, low_grads = outputs_and_grads(reference_fn, q, k, v, do, dtype)
    floor = ATTENTION_FLOOR[dtype]
    check_three_way(f"{label} out", out, low_out, ref_out, OUTPUT_FACTOR, floor)
    for name, got, ref, low in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads):
        check_three_way(f"{label} {name}", got, low, ref, GRAD_FACTOR, floor)
    return out, grads


# ---------------------------------------------------------------------------------------------
# Norms: fn(*inputs) -> one output or a tuple, checked for every output and every input's gradient
# ---------------------------------------------------------------------------------------------


def leaves(*tensors, dtype=None) -> list:
    """Fresh leaf copies requiring grad (None stays None), optionally cast."""
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def run_with_grads(fn: Callable, inputs: Sequence, grad_outputs: Sequence) -> tuple[tuple, list]:
    """Outputs of fn(*inputs) as a tuple, and the gradients of every non-None input."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grad_outputs)])
    return outs, [t.grad for t in inputs if t is not None]


def check_norm_three_way(what: str, ours, same, ref, factor: float, dtype: torch.dtype) -> None:
    """The rule with the norms' floor, scaled by the reference's magnitude."""
    if ours.shape != ref.shape or ours.dtype != same.dtype:
        raise ToleranceError(f"{what}: got shape {tuple(ours.shape)} {ours.dtype}, expected "
                             f"{tuple(ref.shape)} {same.dtype}")
    floor = NORM_FLOOR[dtype] * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    check_three_way(what, ours, same, ref, factor, floor)


def norm_three_way(name: str, kernel_fn: Callable, torch_fn: Callable, ref_fn: Callable, inputs: Sequence,
                   grad_outputs: Sequence, dtype: torch.dtype, names: Sequence[str]) -> None:
    """Run the kernel, torch at the inputs' dtypes and the reference in float64; compare every
    output and the gradient of every input that is not None (`names` labels the inputs)."""
    ours, our_grads = run_with_grads(kernel_fn, leaves(*inputs), grad_outputs)
    same, same_grads = run_with_grads(torch_fn, leaves(*inputs), grad_outputs)
    ref, ref_grads = run_with_grads(ref_fn, leaves(*inputs, dtype=torch.float64), grad_outputs)
    for i, (o, s, r) in enumerate(zip(ours, same, ref)):
        check_norm_three_way(f"{name} output {i}", o, s, r, OUTPUT_FACTOR, dtype)
    present = [n for n, t in zip(names, inputs) if t is not None]
    if len(our_grads) != len(present) or any(g is None for g in our_grads):
        raise ToleranceError(f"{name}: a gradient is missing (inputs {present})")
    for n, o, s, r in zip(present, our_grads, same_grads, ref_grads):
        check_norm_three_way(f"{name} d{n}", o, s, r, GRAD_FACTOR, dtype)
