"""GPU evidence in one command: minillm's kernels and trainer, checked and timed, within a budget.

    python benchmarks/gpu_suite.py --out docs/measured/gpu_suite_h200          # on a GPU (~7 minutes)
    python benchmarks/gpu_suite.py --out /tmp/suite --dry                      # CPU, Triton's interpreter
    minillm bench gpu --out DIR [--budget-s 420] [--dry]                       # the same

Needs only what a GPU machine already has (torch >= 2.4, triton >= 3.2) and
`pip install --no-deps --no-build-isolation -e .`; no network. matplotlib and flash-attn are
used when installed and recorded as missing when not.

Sections, in order
1. Start-up: versions, GPU name, compute capability, SM count, clocks, and the two ceilings every
   later figure is read against, both measured here:
       copy bandwidth  GB/s = 2 * bytes / time of dst.copy_(src) (a read and a write per byte)
       matmul          TFLOP/s = 2 * N^3 / time of an N x N x N bf16 matmul (N = 8192)
2. Correctness, before any timing: the attention kernel forward and backward (fp16, bf16, fp32;
   head dims 64, 128, 256 and 80; causal and not; grouped-query heads; a padding mask with an
   empty sequence; packed variable-length sequences; dropout reproducible from torch's seed) and
   the norms (LayerNorm, RMSNorm, and both with the fused residual add), each against a float64
   reference by the three-way rule of the tests (minillm/kernels/tolerance.py). The first
   failure stops the suite: the JSON and the exit status (1) name the case.
3. Attention: minillm's kernel against torch's SDPA as it chooses (`sdpa`, what `auto` would
   otherwise run), each SDPA backend forced (flash, efficient, cuDNN, math) and flash-attn when
   installed; bf16, B * seq = 16384 tokens, heads = 2048 / D, seq 512 .. 16384, D 64 and 128,
   causal and not, forward and forward+backward. FLOPs (benchmarks/attention.py):
       fwd = 4 * B * H * L^2 * D (QK^T and PV, 2 * L^2 * D each);  fwd+bwd = 3.5 x fwd
       (the backward recomputes QK^T and computes dV, dP, dQ, dK);  causal: half of each.
4. Norms: LayerNorm, RMSNorm and their fused residual adds, forward and backward, against torch
   and torch.compile; 4096 rows, hidden 1024 .. 16384, bf16 activations, fp32 weights. GB/s of
   the bytes a perfect kernel moves (s bytes an element, s_w a weight, P = 2 or 1 vectors):
       plain  fwd 2*M*N*s + P*N*s_w,  bwd 3*M*N*s + (1+P)*N*s_w      (benchmarks/layer_norm.py)
       fused  fwd 4*M*N*s + P*N*s_w,  bwd 4*M*N*s + (1+P)*N*s_w      (reads x and residual,
              writes the output and the new residual; the backward also reads its gradient)
   and that as a percentage of the measured copy bandwidth.
5. Training: gpt2-124m, 30 timed steps after 3 untimed, batch 8 x 1024 tokens, bf16 autocast,
   fused AdamW, through minillm's Trainer, with attn_backend sdpa / triton x norm_backend
   torch / triton: tokens/s = B * T / median step time, MFU = 6N + 12LCT FLOPs per token
   (Model.flops_per_token) x tokens/s / the measured matmul ceiling, and peak memory.

Output, all in --out: gpu_suite.json (every figure, the environment, the command and the date,
what was skipped and why) and at most six PNG charts (attention TFLOP/s vs seq, forward and
forward+backward; norms GB/s vs hidden, forward and backward; training tokens/s).

--budget-s (default 420) bounds the whole run. Sections get a share of it (attention up to 50%,
norms up to 72% of the budget since the start, training the rest) and run their shapes from
small to large; before each shape the time it will take is estimated from the time the previous
shape took (for attention scaled by the FLOP ratio; for norms as it is, since each figure is a
fixed 100 ms of repeats plus a compile that does not grow with the size; for training the
previous backend pair's time), and a shape that would overrun its section's share is skipped,
recorded and printed.

--dry runs the same code on CPU with tiny shapes: the Triton kernels in Triton's interpreter
(TRITON_INTERPRET=1 is set below, before anything imports triton), fp32 instead of bf16 where
CPU matmuls need it, torch.compile skipped (minutes of C++ compiling on a small CPU). The JSON
says "dry": true and "device_type": "cpu": none of its figures is a GPU figure, and
minillm/measured.py never reads it as one. The tests run it (tests/test_gpu_suite.py).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--dry" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"  # before torch and minillm.kernels import triton

import argparse  # noqa: E402  (after TRITON_INTERPRET)
import datetime  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from minillm import measured  # noqa: E402
from minillm.files import write_atomic  # noqa: E402
from minillm.kernels import tolerance  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULT_NAME = "gpu_suite.json"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ATTENTION_MODES = ("fwd", "fwd+bwd")
NORM_OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
TRAIN_BACKENDS = (("sdpa", "torch"), ("triton", "triton"), ("triton", "torch"), ("sdpa", "triton"))
SHARE = {"attention": 0.50, "norms": 0.72, "training": 1.0}  # of the budget, since the start
RESERVE_S = 5.0  # kept back from the last section for the charts and the JSON


def _load_benchmark(name: str):
    """A sibling benchmark script as a module (benchmarks/ is not a package), loaded once."""
    module_name = f"minillm_benchmark_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, HERE / f"{name}.py")
        sys.modules[module_name] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
        spec.loader.exec_module(sys.modules[module_name])
    return sys.modules[module_name]


@dataclass(frozen=True)
class Plan:
    """Every size the suite uses: the GPU's, or tiny ones for --dry (fewer of them: the
    interpreter runs a kernel in about a second on a shared CPU, so --dry checks one of each kind)."""

    dry: bool
    device: torch.device
    matmul_n: int
    matmul_dtype: str
    check_dtypes: tuple[str, ...]
    check_head_dims: tuple[int, ...]  # of the dtype x head dim x causal grid
    check_len: int  # sequence length of the attention correctness cases
    check_hidden: tuple[int, ...]
    attention_dtype: str
    attention_tokens: int  # B * seq
    attention_heads: int | None  # None: 2048 // D
    attention_seqs: tuple[int, ...]
    attention_head_dims: tuple[int, ...]
    norm_rows: int
    norm_hidden: tuple[int, ...]
    norm_dtype: str
    train_model: str
    train_overrides: tuple[tuple[str, int], ...]  # ModelConfig fields changed from the preset
    train_backends: tuple[tuple[str, str], ...]  # (attn_backend, norm_backend)
    train_batch: int
    train_seq: int
    train_steps: int
    train_warmup: int
    train_precision: str

    @staticmethod
    def make(dry: bool) -> "Plan":
        if dry:
            return Plan(True, torch.device("cpu"), 256, "fp32", ("bf16",), (24,), 9, (100,), "fp32", 32, 2, (16,),
                        (16,), 16, (256,), "fp32", "tiny", (("n_layers", 1), ("d_model", 32), ("n_heads", 2)),
                        TRAIN_BACKENDS[:2], 1, 16, 1, 1, "fp32")
        return Plan(False, torch.device("cuda"), 8192, "bf16", tuple(DTYPES), (64, 128, 256, 80), 300,
                    (1023, 4096, 16384), "bf16", 16384, None, (512, 1024, 2048, 4096, 8192, 16384), (64, 128), 4096,
                    (1024, 2048, 4096, 8192, 16384), "bf16", "gpt2-124m", (), TRAIN_BACKENDS, 8, 1024, 30, 3, "bf16")


class CaseFailed(Exception):
    """A correctness case failed: the suite stops and names it."""

    def __init__(self, case: str, error: BaseException):
        super().__init__(f"{case}: {type(error).__name__}: {error}")
        self.case = case


class Clock:
    """Seconds since the start, each section's share of the budget, and what was skipped."""

    def __init__(self, budget_s: float):
        self.start, self.budget_s, self.skipped = time.perf_counter(), budget_s, []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self, section: str) -> float:
        reserve = RESERVE_S if SHARE[section] == 1.0 else 0.0
        return SHARE[section] * self.budget_s - reserve - self.elapsed()

    def fits(self, section: str, what: str, estimate_s: float | None) -> bool:
        """Whether `what` (estimated to take estimate_s; None: unknown) fits the section's share;
        a skip is recorded and printed."""
        left = self.left(section)
        if left > 0 and (estimate_s is None or estimate_s <= left):
            return True
        reason = (f"budget: {section} has {max(left, 0):.0f} s left of --budget-s {self.budget_s:.0f}"
                  + ("" if estimate_s is None else f", estimated {estimate_s:.1f} s"))
        self.skipped.append({"section": section, "what": what, "reason": reason})
        print(f"  skipped {what} ({reason})", flush=True)
        return False


def _estimate(previous: tuple[float, float] | None, work: float) -> float | None:
    """Time of a shape of `work` units from (seconds, work) of the previous one; None without one."""
    return None if previous is None else previous[0] * work / previous[1]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timer(plan: Plan):
    """time_ms(fn): median milliseconds (triton's do_bench on a GPU, 25 ms warm-up, 100 ms of
    repeats; one timed call on CPU, after the call each benchmark makes to check its result)."""
    attention_bench = _load_benchmark("attention")
    return attention_bench._timer(plan.device, *((0, 1) if plan.dry else (5, 10)))


# ---------------------------------------------------------------------------------------------
# 1. Start-up
# ---------------------------------------------------------------------------------------------


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _clocks() -> dict:
    """Current and maximum SM and memory clocks (MHz) from nvidia-smi, or why they are missing."""
    query = "clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit"
    try:
        line = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-i", "0"],
                              capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        return {"unavailable": f"nvidia-smi: {type(error).__name__}: {error}"}
    return dict(zip(("sm_mhz", "max_sm_mhz", "memory_mhz", "max_memory_mhz", "power_limit_w"),
                    (v.strip() for v in line.split(","))))


def environment(plan: Plan) -> dict:
    env = {
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "triton": _version("triton"), "flash_attn": _version("flash_attn"),
        "matplotlib": _version("matplotlib"), "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "cpu_threads": torch.get_num_threads(),
    }
    if plan.device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, capability=measured.capability(0), sm_count=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1), clocks=_clocks())
    else:
        env.update(device=f"CPU ({platform.processor() or platform.machine()})", capability=None)
    return env


def ceilings(plan: Plan, time_ms) -> dict:
    """The measured copy bandwidth and matmul throughput."""
    norm_bench = _load_benchmark("layer_norm")
    copy = norm_bench.copy_bandwidth(plan.device, 1 if plan.dry else 25)
    n, dtype = plan.matmul_n, DTYPES[plan.matmul_dtype]
    a = torch.randn(n, n, device=plan.device, dtype=dtype)
    b = torch.randn(n, n, device=plan.device, dtype=dtype)
    ms = time_ms(lambda: a @ b)
    return {"copy_gb_per_s": copy, "copy_formula": "2 * bytes / time of dst.copy_(src)",
            "matmul_tflops": 2 * n**3 / (ms * 1e-3) / 1e12, "matmul_formula": f"2 * N^3 / time, N = {n}",
            "matmul_dtype": plan.matmul_dtype}


# ---------------------------------------------------------------------------------------------
# 2. Correctness
# ---------------------------------------------------------------------------------------------


def _qkv(plan: Plan, B, H, H_kv, L, D, dtype, seed):
    g = torch.Generator(device=plan.device).manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, device=plan.device, generator=g).to(dtype)  # noqa: E731
    return make(B, H, L, D), make(B, H_kv, L, D), make(B, H_kv, L, D), make(B, H, L, D)


def attention_cases(plan: Plan) -> dict:
    """case name -> a function that raises when the case fails."""
    from minillm.kernels import attention as A

    L, cases = plan.check_len, {}
    for dtype_name in plan.check_dtypes:
        for D in plan.check_head_dims:
            for causal in (False, True):
                def case(dtype=DTYPES[dtype_name], D=D, causal=causal):
                    q, k, v, do = _qkv(plan, 2, 2, 2, L, D, dtype, seed=D)
                    tolerance.attention_three_way(lambda *t: A.scaled_dot_product_attention(*t, is_causal=causal),
                                                  lambda *t: A.attention_reference(*t, is_causal=causal),
                                                  q, k, v, do, label="")
                cases[f"attention {dtype_name} D={D} causal={causal}"] = case

    def gqa():
        q, k, v, do = _qkv(plan, 2, 4, 2, L, 64, torch.bfloat16, seed=1)
        tolerance.attention_three_way(
            lambda *t: A.scaled_dot_product_attention(*t, is_causal=True, enable_gqa=True),
            lambda *t: A.attention_reference(*t, is_causal=True, enable_gqa=True), q, k, v, do, label="")

    def padding():
        q, k, v, do = _qkv(plan, 3, 2, 2, L, 64, torch.float16, seed=2)
        lengths = torch.tensor([L, 0, L // 3], device=plan.device)  # batch 1: no keys at all
        mask = (torch.arange(L, device=plan.device)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, L)
        out, grads = tolerance.attention_three_way(
            lambda *t: A.scaled_dot_product_attention(*t, attn_mask=mask),
            lambda *t: A.attention_reference(*t, attn_mask=mask), q, k, v, do, label="")
        if not ((out[1] == 0).all() and all((g[1] == 0).all() for g in grads)):
            raise AssertionError("fully masked rows must give exactly 0 output and 0 gradients")

    def varlen():
        lengths = [L, 1, L // 2 + 3]
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=plan.device)
        total, H, D = sum(lengths), 2, 64
        q, k, v, do = (t[0].transpose(0, 1) for t in _qkv(plan, 1, H, H, total, D, torch.bfloat16, seed=3))
        sequence = torch.repeat_interleave(torch.arange(len(lengths), device=plan.device),
                                           torch.tensor(lengths, device=plan.device))  # (T,) which sequence
        position = torch.arange(total, device=plan.device) - cu[sequence]  # (T,) position in it
        # One packed sequence, block-diagonal and causal within each block: the independent oracle.
        mask = (sequence[:, None] == sequence[None, :]) & (position[None, :] <= position[:, None])  # (T, T)

        def packed_reference(q_, k_, v_):  # (T, H, D) -> (1, H, T, D) and back
            out = A.attention_reference(*(t.transpose(0, 1)[None] for t in (q_, k_, v_)), attn_mask=mask)
            return out[0].transpose(0, 1)

        tolerance.attention_three_way(
            lambda *t: A.flash_attn_varlen(*t, cu, cu, max(lengths), max(lengths), causal=True),
            packed_reference, q, k, v, do, label="")

    def dropout():
        q, k, v, do = _qkv(plan, 2, 2, 2, L, 64, torch.float16, seed=4)
        run = lambda: tolerance.outputs_and_grads(  # noqa: E731
            lambda *t: A.scaled_dot_product_attention(*t, dropout_p=0.2), q, k, v, do, torch.float16)
        torch.manual_seed(7)
        first = run()
        torch.manual_seed(7)
        again = run()
        other = run()
        same = [torch.equal(a, b) for a, b in zip((first[0], *first[1]), (again[0], *again[1]))]
        if not all(same):
            raise AssertionError(f"the same torch seed gave different results (out, dq, dk, dv equal: {same})")
        if torch.equal(first[0], other[0]) or not torch.isfinite(first[0]).all():
            raise AssertionError("a new seed gave the same dropout (or the output is not finite)")

    cases.update({"attention GQA 4 over 2 heads bf16": gqa, "attention padding mask fp16": padding,
                  "attention varlen causal bf16": varlen, "attention dropout reproducible fp16": dropout})
    return cases


def _norm_checks(plan: Plan, dtype: torch.dtype, n: int) -> dict:
    """op -> (ours, torch at the inputs' dtype, float64 reference, inputs, grad outputs, input names)."""
    from minillm.kernels import norms as N

    eps, g = 1e-5, torch.Generator(device=plan.device).manual_seed(n)
    make = lambda *shape: torch.randn(*shape, device=plan.device, generator=g)  # noqa: E731
    x, r, dy, dh = (make(67, n).to(dtype) for _ in range(4))  # 67 rows: not a multiple of anything
    w, b = (1 + 0.5 * make(n)).to(dtype), (0.5 * make(n)).to(dtype)

    def layer(t, w_, b_):
        return F.layer_norm(t, (n,), w_, b_, eps)

    def rms(t, w_):
        return F.rms_norm(t, (n,), w_, eps)

    def torch_add(norm):
        def add_then_norm(x_, r_, *params):
            h = x_ + r_  # torch rounds the sum to the inputs' dtype before normalising
            return norm(h, *params).to(x_.dtype), h
        return add_then_norm

    return {
        "layer_norm": (lambda x_, w_, b_: N.layer_norm(x_, (n,), w_, b_, eps), layer, layer, [x, w, b], [dy], "xwb"),
        "rms_norm": (lambda x_, w_: N.rms_norm(x_, (n,), w_, eps), rms, rms, [x, w], [dy], "xw"),
        "add_layer_norm": (lambda x_, r_, w_, b_: N.add_layer_norm(x_, r_, w_, b_, eps), torch_add(layer),
                           lambda x_, r_, w_, b_: N.add_layer_norm_reference(x_, r_, w_, b_, eps),
                           [x, r, w, b], [dy, dh], ["x", "residual", "w", "b"]),
        "add_rms_norm": (lambda x_, r_, w_: N.add_rms_norm(x_, r_, w_, eps), torch_add(rms),
                         lambda x_, r_, w_: N.add_rms_norm_reference(x_, r_, w_, eps),
                         [x, r, w], [dy, dh], ["x", "residual", "w"]),
    }


def norm_cases(plan: Plan) -> dict:
    """case name -> a function that raises when the case fails."""
    cases = {}
    for dtype_name in plan.check_dtypes:
        dtype = DTYPES[dtype_name]
        for n in plan.check_hidden:
            for op, check in _norm_checks(plan, dtype, n).items():
                name = f"{op} {dtype_name} N={n}"
                cases[name] = (lambda name=name, check=check, dtype=dtype:
                               tolerance.norm_three_way(name, *check[:5], dtype, check[5]))
    return cases


def correctness(plan: Plan) -> dict:
    """Run every case; the first failure raises CaseFailed naming it."""
    results = []
    for name, case in {**attention_cases(plan), **norm_cases(plan)}.items():
        start = time.perf_counter()
        try:
            case()
            _synchronize(plan.device)
        except Exception as error:  # any failure of a kernel here stops the suite, named
            raise CaseFailed(name, error) from error
        results.append({"case": name, "status": "ok", "seconds": round(time.perf_counter() - start, 3)})
    print(f"  {len(results)} cases passed", flush=True)
    return {"rule": "|ours - ref64| <= k * |torch - ref64| + floor; k = 2 outputs, 3 gradients "
                    "(minillm/kernels/tolerance.py)", "cases": results}


# ---------------------------------------------------------------------------------------------
# 3. Attention
# ---------------------------------------------------------------------------------------------


def _attention_providers(plan: Plan, attention_bench) -> tuple[dict, dict]:
    """(name -> (fn, context), name -> why it is missing)."""
    found = attention_bench.providers(plan.device, include_ours=True)
    found.pop("reference")  # the L x L reference is sdpa-math written out; sdpa-math is timed instead
    found["sdpa"] = (lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal), nullcontext)
    missing = {}
    if plan.device.type != "cuda":
        missing.update({"sdpa-efficient": "CUDA only", "sdpa-cudnn": "CUDA only", "flash-attn": "CUDA only"})
    else:
        try:
            from flash_attn import flash_attn_func

            found["flash-attn"] = (lambda q, k, v, causal: flash_attn_func(  # (B, L, H, D) views, no copies
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2), nullcontext)
        except ImportError as error:
            missing["flash-attn"] = f"not installed ({error})"
    return found, missing


def _attention_row(attention_bench, name, fn, context, shape, mode, plan: Plan, time_ms) -> dict:
    """benchmarks/attention.py's run_one (which records what SDPA refuses), also recording any other
    error of a provider (a compile error, an argument it refuses) instead of ending the section."""
    try:
        row = asdict(attention_bench.run_one(name, fn, context, shape, mode, plan.device, time_ms, ""))
    except Exception as error:
        row = dict(provider=name, mode=mode, **asdict(shape), ms=None, tflops=None, peak_mem_mib=None,
                   status=f"unsupported: {type(error).__name__}: {str(error).splitlines()[0][:100]}")
    row.pop("device", None)
    return row


def attention(plan: Plan, clock: Clock, time_ms) -> dict:
    attention_bench = _load_benchmark("attention")
    providers, missing = _attention_providers(plan, attention_bench)
    rows, previous = [], {}
    for seq in plan.attention_seqs:  # small to large, so the budget drops the largest shapes
        for D in plan.attention_head_dims:
            for causal in (False, True):
                heads = plan.attention_heads or 2048 // D
                shape = attention_bench.Shape(plan.attention_tokens // seq, heads, seq, D, causal, plan.attention_dtype)
                work = attention_bench.flops(shape, "fwd+bwd")
                what = f"attention seq={seq} D={D} causal={causal}"
                if not clock.fits("attention", what, _estimate(previous.get((D, causal)), work)):
                    continue
                start = time.perf_counter()
                for mode in ATTENTION_MODES:
                    for name, (fn, context) in providers.items():
                        row = _attention_row(attention_bench, name, fn, context, shape, mode, plan, time_ms)
                        rows.append(row)
                        print(f"  {name:<15}{mode:<8} seq={seq:<6} D={D:<4} causal={causal!s:<6} "
                              + (f"{row['ms']:9.3f} ms {row['tflops']:8.2f} TFLOP/s" if row["ms"] else row["status"]),
                              flush=True)
                previous[(D, causal)] = (time.perf_counter() - start, work)
    return {"formula": "FLOPs fwd = 4*B*H*L^2*D; fwd+bwd = 3.5 x fwd; causal halves both; TFLOP/s = FLOPs / time",
            "dtype": plan.attention_dtype, "tokens_per_batch": plan.attention_tokens,
            "heads": plan.attention_heads or "2048 / D", "providers": list(providers), "missing_providers": missing,
            "rows": rows}


# ---------------------------------------------------------------------------------------------
# 4. Norms
# ---------------------------------------------------------------------------------------------


def _norm_bytes(op: str, mode: str, m: int, n: int, s: int, s_w: int) -> int:
    """Bytes a perfect kernel moves (the formulas in the module docstring)."""
    p = 2 if "layer" in op else 1
    activations = {"fwd": 2, "bwd": 3} if not op.startswith("add_") else {"fwd": 4, "bwd": 4}
    return activations[mode] * m * n * s + (p if mode == "fwd" else 1 + p) * n * s_w


def _norm_providers(plan: Plan, norm_bench, op: str, n: int) -> tuple[dict, dict]:
    """(name -> fn(x, residual, w, b) returning a tuple of outputs, name -> why it is missing).

    The plain ops are benchmarks/layer_norm.py's providers; the fused residual adds are torch's
    add-then-norm (eager and compiled as one function, so Inductor may fuse the add) and ours."""
    from minillm.kernels import norms as N

    base = op.removeprefix("add_")
    plain = norm_bench.providers(base, n, plan.device, include_ours=True)  # fn(x, w, b)
    missing = {}
    if plan.dry:
        plain.pop("torch.compile")
        missing["torch.compile"] = "skipped in --dry: compiling C++ on a small CPU takes minutes"
    if not op.startswith("add_"):
        return {name: (lambda x, r, w, b, fn=fn: (fn(x, w, b),)) for name, fn in plain.items()}, missing
    eager = plain["torch"]

    def torch_add_norm(x, r, w, b):
        h = x + r
        return eager(h, w, b), h

    fused = {"torch": torch_add_norm}
    if "torch.compile" in plain:
        fused["torch.compile"] = torch.compile(torch_add_norm, dynamic=False)
    if base == "layer_norm":
        fused[measured.OURS_NORM] = lambda x, r, w, b: N.add_layer_norm(x, r, w, b)
    else:
        fused[measured.OURS_NORM] = lambda x, r, w, b: N.add_rms_norm(x, r, w)
    return fused, missing


def _norm_case(plan: Plan, fn, op: str, n: int, time_ms) -> tuple[float, float]:
    """(forward ms, backward ms) of one provider, after checking its output against fp32 torch."""
    dtype = DTYPES[plan.norm_dtype]
    g = torch.Generator(device=plan.device).manual_seed(n)
    x, r, dy = (torch.randn(plan.norm_rows, n, device=plan.device, generator=g, dtype=torch.float32).to(dtype)
                for _ in range(3))
    w = (1 + 0.1 * torch.randn(n, device=plan.device, generator=g)).requires_grad_()
    b = (0.1 * torch.randn(n, device=plan.device, generator=g)).requires_grad_()
    x.requires_grad_(), r.requires_grad_()
    outs = fn(x, r, w, b)
    h = (x + r).float() if op.startswith("add_") else x.float()
    expected = (F.layer_norm(h, (n,), w.float(), b.float()) if "layer" in op else F.rms_norm(h, (n,), w.float()))
    error = (outs[0].float() - expected).abs().max().item()
    if not error <= 0.1:
        raise AssertionError(f"{op} N={n}: max error {error:.3g} against torch in fp32")
    params = [x, r, w, b] if op.startswith("add_") else [x, w, b]
    params = [p for p in params if not ("rms" in op and p is b)]
    forward = time_ms(lambda: fn(x, r, w, b))
    grads = [dy.to(o.dtype) for o in outs]
    backward = time_ms(lambda: torch.autograd.grad(outs, params, grads, retain_graph=True))
    return forward, backward


def norms(plan: Plan, clock: Clock, time_ms, copy_gb_per_s: float) -> dict:
    norm_bench = _load_benchmark("layer_norm")
    dtype = DTYPES[plan.norm_dtype]
    s, s_w = dtype.itemsize, torch.float32.itemsize
    rows, previous, missing = [], {}, {}
    for n in plan.norm_hidden:
        for op in NORM_OPS:
            # do_bench times a fixed 100 ms per figure and compiling does not grow with N: the
            # previous size's time is the estimate (work 1 per size), not a multiple of it.
            work = 1.0
            if not clock.fits("norms", f"{op} N={n}", _estimate(previous.get(op), work)):
                continue
            start = time.perf_counter()
            providers, why = _norm_providers(plan, norm_bench, op, n)
            missing.update(why)
            for name, fn in providers.items():
                common = dict(op=op, provider=name, hidden=n, rows=plan.norm_rows, dtype=plan.norm_dtype)
                try:
                    forward, backward = _norm_case(plan, fn, op, n, time_ms)
                except AssertionError:
                    raise
                except Exception as error:  # torch.compile without a working toolchain, for instance
                    rows.append(dict(common, mode="fwd+bwd", ms=None, gb_per_s=None, pct_of_copy=None,
                                     status=f"unsupported: {type(error).__name__}: {str(error).splitlines()[0][:100]}"))
                    print(f"  {op:<15}N={n:<6} {name:<17} {rows[-1]['status']}", flush=True)
                    continue
                for mode, ms in (("fwd", forward), ("bwd", backward), ("fwd+bwd", forward + backward)):
                    moved = (_norm_bytes(op, "fwd", plan.norm_rows, n, s, s_w) if mode != "bwd" else 0) + \
                            (_norm_bytes(op, "bwd", plan.norm_rows, n, s, s_w) if mode != "fwd" else 0)
                    gb_per_s = moved / (ms * 1e-3) / 1e9
                    rows.append(dict(common, mode=mode, ms=ms, gb_per_s=gb_per_s,
                                     pct_of_copy=100 * gb_per_s / copy_gb_per_s, status="ok"))
                print(f"  {op:<15}N={n:<6} {name:<17} fwd {forward:8.3f} ms bwd {backward:8.3f} ms "
                      f"({rows[-3]['pct_of_copy']:.0f}% / {rows[-2]['pct_of_copy']:.0f}% of copy)", flush=True)
            previous[op] = (time.perf_counter() - start, work)
    return {"formula": "plain fwd 2*M*N*s + P*N*s_w, bwd 3*M*N*s + (1+P)*N*s_w; fused residual fwd "
                       "4*M*N*s + P*N*s_w, bwd 4*M*N*s + (1+P)*N*s_w; P = 2 (LayerNorm) or 1 (RMSNorm); "
                       "GB/s = bytes / time",
            "weights_dtype": "fp32", "copy_gb_per_s": copy_gb_per_s, "missing_providers": missing, "rows": rows}


# ---------------------------------------------------------------------------------------------
# 5. Training
# ---------------------------------------------------------------------------------------------


def _train_one(plan: Plan, attn_backend: str, norm_backend: str, matmul_tflops: float) -> dict:
    from minillm.config import preset
    from minillm.distributed import seed_everything
    from minillm.tasks import build_model
    from minillm.train_config import TrainConfig
    from minillm.trainer import Trainer

    train_bench = _load_benchmark("train")
    seed_everything(0)
    config = preset(plan.train_model, attn_backend=attn_backend, norm_backend=norm_backend,
                    max_seq_len=max(plan.train_seq, preset(plan.train_model).max_seq_len), **dict(plan.train_overrides))
    model = build_model(config, "causal-lm")
    batches = train_bench.make_batches(8, plan.train_batch, plan.train_seq, config.vocab_size)
    step_ends = []

    def on_step_end(trainer, info) -> None:
        _synchronize(plan.device)
        step_ends.append(time.perf_counter())

    if plan.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out_dir:
        train = TrainConfig(out_dir=out_dir, task="causal-lm", batch_size=plan.train_batch,
                            max_steps=plan.train_warmup + plan.train_steps, warmup_steps=0, lr=3e-4,
                            precision=plan.train_precision, eval_every=0, checkpoint_every=0, log_every=10**6,
                            progress=False, device=plan.device.type)
        Trainer(model, train, batches, hooks={"on_step_end": on_step_end}).fit()
    step_s = statistics.median(b - a for a, b in zip(step_ends[plan.train_warmup - 1 :], step_ends[plan.train_warmup:]))
    tokens_per_s = plan.train_batch * plan.train_seq / step_s
    flops_per_token = model.flops_per_token(plan.train_seq)
    return {"attn_backend": attn_backend, "norm_backend": norm_backend, "ms_per_step": 1e3 * step_s,
            "tokens_per_s": tokens_per_s, "mfu": flops_per_token * tokens_per_s / (matmul_tflops * 1e12),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if plan.device.type == "cuda" else None,
            "status": "ok"}


def training(plan: Plan, clock: Clock, matmul_tflops: float) -> dict:
    runs, previous = [], None
    for attn_backend, norm_backend in plan.train_backends:
        what = f"training attn_backend={attn_backend} norm_backend={norm_backend}"
        if not clock.fits("training", what, previous):
            continue
        start = time.perf_counter()
        try:
            run = _train_one(plan, attn_backend, norm_backend, matmul_tflops)
        except Exception as error:  # a backend this machine cannot run: recorded, the others still run
            run = {"attn_backend": attn_backend, "norm_backend": norm_backend,
                   "status": f"unsupported: {type(error).__name__}: {str(error).splitlines()[0][:120]}"}
        runs.append(run)
        previous = time.perf_counter() - start
        print(f"  {what}: " + (f"{run['tokens_per_s']:,.0f} tokens/s, MFU {100 * run['mfu']:.1f}%"
                               if run["status"] == "ok" else run["status"]), flush=True)
    return {"model": plan.train_model, "overrides": dict(plan.train_overrides), "batch": plan.train_batch,
            "seq": plan.train_seq, "steps_timed": plan.train_steps, "steps_untimed": plan.train_warmup,
            "precision": plan.train_precision,
            "optimizer": "AdamW, fused (minillm/optim.py)",
            "mfu_formula": "flops_per_token (6N + 12LCT) * tokens/s / measured matmul TFLOP/s", "runs": runs}


# ---------------------------------------------------------------------------------------------
# Charts and the run
# ---------------------------------------------------------------------------------------------


def charts(result: dict, out: Path) -> dict:
    """At most six PNGs; none, with the reason, when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        return {"skipped": f"matplotlib not installed ({error})", "files": []}
    label = f"{result['environment']['device']}" + (" -- DRY RUN on CPU, not GPU figures" if result["dry"] else "")
    files = []

    def save(fig, name, title):
        fig.suptitle(f"{title}\n{label}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        files.append(name)

    rows = result.get("attention", {}).get("rows", [])
    combos = sorted({(r["head_dim"], r["causal"]) for r in rows})
    for mode in ATTENTION_MODES:
        if not combos:
            break
        fig, axes = plt.subplots(1, len(combos), figsize=(4 * len(combos), 3.4), squeeze=False)
        for ax, (D, causal) in zip(axes[0], combos):
            for provider in dict.fromkeys(r["provider"] for r in rows):
                points = sorted((r["seq"], r["tflops"]) for r in rows if r["provider"] == provider and r["mode"] == mode
                                and (r["head_dim"], r["causal"]) == (D, causal) and r["tflops"] is not None)
                if points:
                    ax.plot(*zip(*points), marker="o", label=provider)
            ax.set(xscale="log", xlabel="sequence length", ylabel="TFLOP/s", title=f"D={D} causal={causal}")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        save(fig, f"attention_{mode.replace('+', '_')}.png", f"attention {mode}, {result['attention']['dtype']}")
    rows = result.get("norms", {}).get("rows", [])
    for mode in ("fwd", "bwd"):
        if not rows:
            break
        fig, axes = plt.subplots(1, len(NORM_OPS), figsize=(16, 3.4), squeeze=False)
        for ax, op in zip(axes[0], NORM_OPS):
            for provider in dict.fromkeys(r["provider"] for r in rows):
                points = sorted((r["hidden"], r["gb_per_s"]) for r in rows if r["op"] == op and r["mode"] == mode
                                and r["provider"] == provider and r["gb_per_s"] is not None)
                if points:
                    ax.plot(*zip(*points), marker="o", label=provider)
            ax.axhline(result["norms"]["copy_gb_per_s"], color="grey", linestyle="--", label="copy")
            ax.set(xscale="log", xlabel="hidden size", ylabel="GB/s", title=op)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        save(fig, f"norms_{mode}.png", f"norms {mode}, {result['norms']['rows'][0]['dtype']}")
    runs = [r for r in result.get("training", {}).get("runs", []) if r["status"] == "ok"]
    if runs:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        names = [f"attn {r['attn_backend']}\nnorm {r['norm_backend']}" for r in runs]
        bars = ax.bar(names, [r["tokens_per_s"] for r in runs])
        for bar, r in zip(bars, runs):
            ax.annotate(f"MFU {100 * r['mfu']:.1f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set(ylabel="tokens/s")
        save(fig, "training.png", f"training {result['training']['model']}, {result['training']['precision']}")
    return {"files": files}


def run(args) -> int:
    plan = Plan.make(args.dry)
    if plan.dry:  # tiny shapes: threads only contend (several times slower on a small shared CPU)
        torch.set_num_threads(1)
    if not plan.dry and not torch.cuda.is_available():
        raise SystemExit("gpu_suite: no CUDA device here; run with --dry for the CPU check of the same code")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock(args.budget_s)
    result = {"dry": plan.dry, "device_type": plan.device.type,
              "note": ("DRY RUN on CPU through Triton's interpreter with tiny shapes: no figure here is a GPU "
                       "figure" if plan.dry else "measured on the GPU named in environment"),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "budget_s": args.budget_s, "status": "running"}
    time_ms = _timer(plan)

    def write() -> None:
        result["elapsed_s"], result["skipped"] = round(clock.elapsed(), 1), clock.skipped
        write_atomic(out / RESULT_NAME, json.dumps(result, indent=1, default=str) + "\n")

    print("== start-up", flush=True)
    result["environment"] = environment(plan)
    result["ceilings"] = ceilings(plan, time_ms)
    for key, value in {**result["environment"], **result["ceilings"]}.items():
        print(f"  {key}: {value}")
    print("== correctness", flush=True)
    start = time.perf_counter()
    try:
        result["correctness"] = correctness(plan)
        result["correctness"]["seconds"] = round(time.perf_counter() - start, 1)
    except CaseFailed as failure:
        result.update(status="failed", failed_case=failure.case, error=str(failure))
        write()
        print(f"gpu_suite: FAILED {failure} (wrote {out / RESULT_NAME})", file=sys.stderr)
        return 1
    sections = (("attention", lambda: attention(plan, clock, time_ms)),
                ("norms", lambda: norms(plan, clock, time_ms, result["ceilings"]["copy_gb_per_s"])),
                ("training", lambda: training(plan, clock, result["ceilings"]["matmul_tflops"])))
    for name, section in sections:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        try:
            result[name] = section()
            result[name]["seconds"] = round(time.perf_counter() - start, 1)
        except AssertionError as error:  # a wrong result while timing: as much a failure as a case
            result.update(status="failed", failed_case=name, error=str(error))
            write()
            print(f"gpu_suite: FAILED {name}: {error}", file=sys.stderr)
            return 1
        except Exception as error:  # one section that cannot run here is recorded, the others still run
            result[name] = {"status": f"unsupported: {type(error).__name__}: {str(error).splitlines()[0][:200]}"}
            print(f"  {result[name]['status']}", flush=True)
        write()
    result["charts"] = charts(result, out)
    if "skipped" in result["charts"]:
        print(f"charts: {result['charts']['skipped']}")
    result["status"] = "ok"
    write()
    print(f"wrote {out / RESULT_NAME} and {len(result['charts']['files'])} charts in {clock.elapsed():.0f} s; "
          f"skipped {len(clock.skipped)} shapes" + (" (dry run: CPU, not GPU figures)" if plan.dry else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", required=True, help="folder for gpu_suite.json and the charts")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="seconds for the whole run; the largest shapes are skipped to fit (default 420)")
    parser.add_argument("--dry", action="store_true",
                        help="CPU, Triton's interpreter, tiny shapes: checks the code path, no GPU figures")
    args = parser.parse_args(argv)
    if not args.budget_s > 0:
        parser.error(f"--budget-s: must be > 0 seconds, got {args.budget_s}")
    if args.dry and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--dry needs TRITON_INTERPRET=1 before triton is imported: run this file as a script "
                     "(python benchmarks/gpu_suite.py --dry), which sets it")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
