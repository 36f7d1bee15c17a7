"""Ahead-of-time compilation of the quantized-matmul kernel for sm_80 (A100) and sm_90 (H100).

The interpreter tests check the numbers; these check that the real compiler accepts the tiles
the launcher picks (kernels/quant_matmul.py: DECODE_TILE, PREFILL_TILE, NARROW_TILE), that
nothing spills registers, that shared memory fits, and that fp16/bf16 products run on tensor
cores (fp32 runs exact-fp32 FMA, input_precision="ieee", by design). Weight rows 16-byte aligned
are compiled with the divisibility hints Triton's JIT gives them (K, N, strides multiples of 16);
the narrow tile also without any (K = 1500, say).

The default run compiles, per architecture, each tile with zero points (int8 and int4 on the
decode and prefill tiles; fp32 and an unaligned bf16 on the narrow one): 12 compiles, ~30 s on
2 cores. MINILLM_AOT_HEAVY=1 adds every bit width and scheme, fp16, and the K step of 32.
"""

import os

import pytest
from aot_compile import SHARED_MEMORY_LIMIT, TARGETS, CompileJob, compile_kernels

from minillm.kernels import quant_matmul as Q

KERNEL = "minillm.kernels.quant_matmul:_quant_matmul_kernel"
ALIGNED = ("X", "W", "Scales", "Zeros", "Y", "stride_xm", "stride_wn", "K", "N")
UNALIGNED = ("X", "W", "Scales", "Zeros", "Y")  # torch's allocations are aligned; sizes are not


def _job(target, tile, block_k, bits=4, zeros=True, dtype="bf16", aligned=True):
    block_m, block_n, warps, stages = tile
    codes = "i8" if bits == 8 and not zeros else "u8"
    signature = {"X": f"*{dtype}", "W": f"*{codes}", "Scales": "*fp32", "Zeros": "*u8", "Y": f"*{dtype}",
                 **{name: "i32" for name in ("M", "N", "K", "stride_xm", "stride_wn", "group_size")}}
    constexprs = dict(BITS=bits, HAS_ZEROS=zeros, ZERO=8 if bits == 4 else 0, BLOCK_M=block_m, BLOCK_N=block_n,
                      BLOCK_K=block_k, UPCAST=False, PRECISION="ieee" if dtype == "fp32" else "tf32")
    return CompileJob(KERNEL, signature, constexprs, num_warps=warps, num_stages=stages, target=target,
                      divisible_by_16=ALIGNED if aligned else UNALIGNED)


def _shipped_jobs(heavy: bool):
    jobs = []
    for target in TARGETS:
        for tile in (Q.DECODE_TILE, Q.PREFILL_TILE):
            jobs += [_job(target, tile, 64, 8, True), _job(target, tile, 64, 4, True)]
            if heavy:
                jobs += [_job(target, tile, 64, 8, False), _job(target, tile, 64, 4, False),
                         _job(target, tile, 32), _job(target, tile, 64, dtype="fp16")]
        jobs += [_job(target, Q.NARROW_TILE, 32, 4, True, "fp32"),
                 _job(target, Q.NARROW_TILE, 32, 8, True, "bf16", aligned=False)]
        if heavy:
            jobs += [_job(target, Q.NARROW_TILE, 32, 8, False, "bf16", aligned=False),
                     _job(target, Q.NARROW_TILE, 32, 4, True, "bf16", aligned=False),
                     _job(target, Q.NARROW_TILE, 32, 8, True, "fp32", aligned=False),
                     _job(target, Q.NARROW_TILE, 32, 8, False, "fp16")]
    return jobs


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):  # PTX and cubins under pytest's tmp dirs, which it prunes
    heavy = os.environ.get("MINILLM_AOT_HEAVY") == "1"
    return compile_kernels(_shipped_jobs(heavy=heavy), out_dir=str(tmp_path_factory.mktemp("aot_quant_matmul")))


def test_every_shipped_config_compiles(compiled):
    failed = [info.describe() for info in compiled if info.error is not None]
    assert not failed, "\n".join(failed)


def test_no_register_spills(compiled):
    spilled = [info.describe() for info in compiled if info.stack != 0 or info.local != 0]
    assert not spilled, "\n".join(spilled)


def test_shared_memory_fits(compiled):
    for info in compiled:
        assert 0 <= info.shared <= SHARED_MEMORY_LIMIT[info.job.target], info.describe()


def test_half_precision_uses_tensor_cores(compiled):
    for info in compiled:
        if info.job.signature["X"] != "*fp32":
            assert info.has_mma or info.has_wgmma, info.describe()


def test_compiled_tiles_are_the_launchers():
    """Every tile and K step the launcher picks on a GPU is one compiled above."""
    import torch

    tiles = {Q.DECODE_TILE: (32, 64), Q.PREFILL_TILE: (32, 64), Q.NARROW_TILE: (32,)}
    for m in (1, 16, 17, 4096):
        for group, k in ((32, 4096), (128, 4096), (4096, 4096), (1500, 1500), (96, 96)):
            for dtype in (torch.bfloat16, torch.float32):
                for bits in (8, 4):
                    c = Q.launch_config(m, group, k, dtype, k * bits // 8, interpreting=False)
                    tile = (c.block_m, c.block_n, c.num_warps, c.num_stages)
                    assert tile in tiles and c.block_k in tiles[tile], (m, group, k, dtype, bits, c)
                    assert group == k or group % c.block_k == 0
