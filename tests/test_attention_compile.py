"""Ahead-of-time compilation of every shipped attention configuration for sm_80 and sm_90.

No GPU is needed: tests/aot_compile.py compiles in subprocesses with TRITON_INTERPRET unset
(this session sets it, which turns every @triton.jit into an interpreter object), then reads
the PTX and `cuobjdump --dump-resource-usage`. For each architecture, kernel (forward, dK/dV,
dQ), head-dim bucket and configuration, with fp16 and bf16 (fp32 has its own configs), we
assert: it compiles; fp16/bf16 kernels use tensor cores; nothing spills (STACK 0, LOCAL 0);
shared memory fits the architecture.

Two feature sets exist: the plain kernel, and the heaviest one (causal + additive mask +
dropout + varlen, compiled with the shrunken tiles such calls use), whose Philox draws and
mask loads cost the most registers. The default run compiles the plain kernels in fp16 and
bf16. MINILLM_AOT_HEAVY=1 adds the heavy set (fp16) and the fp32 configs: a heavy or fp32
compile takes ~15 s of CPU each, too slow for every test run on a 2-core machine.
"""

import inspect
import os

import pytest
import torch

from aot_compile import SHARED_MEMORY_LIMIT, CompileJob, compile_kernels
from minillm.kernels import attention as A

KERNELS = {"fwd": "_attn_fwd_kernel", "dkdv": "_attn_bwd_dkdv_kernel", "dq": "_attn_bwd_dq_kernel"}
TRITON_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
PLAIN = dict(IS_CAUSAL=False, MASK_KIND=0, HAS_DROPOUT=False, VARLEN=False)
SIZES = ("H", "H_KV", "GROUP")  # upper-case integer arguments
HEAVY = dict(IS_CAUSAL=True, MASK_KIND=2, HAS_DROPOUT=True, VARLEN=True)


def _signature(kernel: str, dtype: torch.dtype) -> tuple[dict[str, str], tuple[str, ...]]:
    """Triton types of a kernel's runtime arguments, and those a real launch marks 16-divisible."""
    fn = getattr(A, KERNELS[kernel])
    params = inspect.signature(getattr(fn, "fn", fn)).parameters
    ty = TRITON_TYPE[dtype]
    signature, divisible = {}, []
    for name, p in params.items():
        if "constexpr" in str(p.annotation):
            continue
        if name in ("LSE", "DELTA"):
            signature[name] = "*fp32"
        elif name.startswith("CU_SEQ"):
            signature[name] = "*i32"
        elif name.isupper() and name not in SIZES:  # Q, K, V, O, DO, DQ, DK, DV, MASK (additive)
            signature[name] = f"*{ty}"
        elif name.startswith("scale") or name == "dropout_p":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
        # Aligned pointers and Q/K/V/O strides (multiples of D) are 16-divisible in practice;
        # mask strides and lengths are arbitrary.
        if signature[name].startswith("*") or (name.startswith("stride_") and not name.startswith("stride_m")):
            divisible.append(name)
    return signature, tuple(divisible)


def _jobs(heavy: bool) -> list[CompileJob]:
    variants = [(torch.float16, PLAIN), (torch.bfloat16, PLAIN)]
    if heavy:
        variants += [(torch.float16, HEAVY), (torch.float32, PLAIN)]
    jobs = []
    for arch in (80, 90):
        for kernel in KERNELS:
            for block_d in (16, 32, 64, 128, 256):
                for dtype, features in variants:
                    signature, divisible = _signature(kernel, dtype)
                    heavy = features is HEAVY
                    for c in A.shipped_configs(arch, kernel, block_d, dtype, masked_or_dropout=heavy):
                        constexprs = dict(HEAD_DIM=block_d, BLOCK_D=block_d, BLOCK_M=c.block_m,
                                          BLOCK_N=c.block_n, UPCAST=False, **features,
                                          PRECISION="ieee" if dtype == torch.float32 else "tf32")
                        jobs.append(CompileJob(f"minillm.kernels.attention:{KERNELS[kernel]}", signature,
                                               constexprs, c.num_warps, c.num_stages, arch, divisible))
    return jobs


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):  # PTX and cubins under pytest's tmp dirs, which it prunes
    heavy = os.environ.get("MINILLM_AOT_HEAVY") == "1"
    return compile_kernels(_jobs(heavy), workers=max(2, min(8, os.cpu_count() or 2)),
                           out_dir=str(tmp_path_factory.mktemp("aot_attention")))


def _is_fp32(info) -> bool:
    return info.job.signature["Q"] == "*fp32"


def test_every_shipped_config_compiles(compiled):
    assert len(compiled) >= 2 * 3 * 5 * 2
    failed = [i.describe() for i in compiled if i.error is not None]
    assert not failed, "\n".join(failed)


def test_half_precision_kernels_use_tensor_cores(compiled):
    # Every fp16/bf16 kernel uses tensor cores: mma.sync on sm_80; on sm_90 wgmma or, where
    # Triton does not emit it (tiles with fewer than 64 rows, e.g. dK/dV at D = 256 and the
    # shrunken D = 256 tiles of masked/dropout calls), mma.sync.
    half = [i for i in compiled if i.error is None and not _is_fp32(i)]
    missing = [i.describe() for i in half if not (i.has_mma or i.has_wgmma)]
    assert not missing, "no tensor-core instructions:\n" + "\n".join(missing)
    assert all(i.has_mma for i in half if i.job.target == 80)


def test_sm90_plain_forward_uses_wgmma(compiled):
    fwd = [i for i in compiled if i.error is None and not _is_fp32(i) and i.job.target == 90
           and i.job.kernel.endswith("_attn_fwd_kernel") and not i.job.constexprs["HAS_DROPOUT"]]
    assert fwd and all(i.has_wgmma for i in fwd), [i.describe() for i in fwd if not i.has_wgmma]


def test_fp32_kernels_are_ieee(compiled):
    # fp32 inputs ask tl.dot for input_precision="ieee": FMA, no TF32 tensor-core instructions.
    fp32 = [i for i in compiled if i.error is None and _is_fp32(i)]
    if os.environ.get("MINILLM_AOT_HEAVY") == "1":
        assert fp32
    assert not any(i.has_mma or i.has_wgmma for i in fp32)


def test_no_register_spills(compiled):
    spills = [i.describe() for i in compiled if i.error is None and (i.stack != 0 or i.local != 0)]
    assert not spills, "register spills:\n" + "\n".join(spills)


def test_shared_memory_fits(compiled):
    over = [i.describe() for i in compiled if i.error is None and i.shared > SHARED_MEMORY_LIMIT[i.job.target]]
    assert not over, "shared memory over the limit:\n" + "\n".join(over)
