"""Ahead-of-time compilation of the layer-norm kernels for sm_80 (A100) and sm_90 (H100).

The interpreter tests check the numbers; these check that the real compiler accepts every
configuration the launchers can pick, that no kernel spills registers, and that shared memory
fits. Compilation runs in subprocesses (see aot_compile.py); all jobs are compiled once per module.
"""

import pytest
from aot_compile import SHARED_MEMORY_LIMIT, TARGETS, CompileJob, compile_kernels

from minillm.kernels import norms as ln

MODULE = "minillm.kernels.norms:"
# Every block size the launchers can choose on a GPU: powers of two from 16 to MAX_BLOCK_N.
BLOCKS = [2**k for k in range(4, ln.MAX_BLOCK_N.bit_length())]


def _fwd_job(target, block, single, dtype="bf16", wdtype="fp32", rms=False, residual=True,
             affine=True, aligned=True):
    ptrs = {"X": dtype, "R": dtype, "H": dtype, "W": wdtype, "B": wdtype, "Y": dtype,
            "Mean": "fp32", "Rstd": "fp32"}
    ints = ["stride_x", "stride_r", "stride_h", "stride_y", "N"]
    signature = {**{k: "*" + v for k, v in ptrs.items()}, **{k: "i32" for k in ints}, "eps": "fp32"}
    constexprs = dict(IS_RMS=rms, HAS_RESIDUAL=residual, HAS_WEIGHT=affine,
                      HAS_BIAS=affine and not rms, BLOCK_N=block, SINGLE_BLOCK=single)
    return CompileJob(MODULE + "_norm_fwd_kernel", signature, constexprs, target=target,
                      divisible_by_16=tuple(ptrs) + tuple(ints) if aligned else (),
                      **ln.launch_config(block))


def _bwd_job(target, block, single, dtype="bf16", wdtype="fp32", rms=False, residual=True,
             affine=True, aligned=True):
    ptrs = {"X": dtype, "W": wdtype, "DY": dtype, "DH": dtype, "DX": dtype, "DW": "fp32",
            "DB": "fp32", "Mean": "fp32", "Rstd": "fp32", "RowSums": "fp32"}
    ints = ["stride_x", "stride_dy", "stride_dh", "stride_dx", "N"]
    signature = {**{k: "*" + v for k, v in ptrs.items()}, **{k: "i32" for k in ints},
                 "M": "i32", "rows_per_program": "i32"}
    constexprs = dict(IS_RMS=rms, HAS_WEIGHT=affine, HAS_BIAS=affine and not rms,
                      HAS_DH=residual, BLOCK_N=block, SINGLE_BLOCK=single)
    return CompileJob(MODULE + "_norm_bwd_kernel", signature, constexprs, target=target,
                      divisible_by_16=tuple(ptrs) + tuple(ints) if aligned else (),
                      **ln.launch_config(block))


def _row_sums_job(target, block, dtype="bf16", wdtype="fp32", rms=False):
    ptrs = {"X": dtype, "W": wdtype, "DY": dtype, "Mean": "fp32", "Rstd": "fp32", "RowSums": "fp32"}
    ints = ["stride_x", "stride_dy", "N"]
    signature = {**{k: "*" + v for k, v in ptrs.items()}, **{k: "i32" for k in ints}}
    constexprs = dict(IS_RMS=rms, HAS_WEIGHT=True, BLOCK_N=block)
    return CompileJob(MODULE + "_norm_bwd_row_sums_kernel", signature, constexprs, target=target,
                      divisible_by_16=tuple(ptrs) + tuple(ints), **ln.launch_config(block))


def _shipped_jobs():
    """Every block size with the heaviest flags (LayerNorm, weight, bias, residual; bf16
    activations, fp32 weights), the loop path, and at the largest block the other variants."""
    big = ln.MAX_BLOCK_N
    jobs = []
    for target in TARGETS:
        for block in BLOCKS:
            jobs += [_fwd_job(target, block, True), _bwd_job(target, block, True)]
        jobs += [_fwd_job(target, big, False), _bwd_job(target, big, False),
                 _row_sums_job(target, big), _row_sums_job(target, big, rms=True)]
        for dtype in ("fp16", "fp32"):
            jobs += [_fwd_job(target, big, True, dtype, dtype), _bwd_job(target, big, True, dtype, dtype)]
        jobs += [_fwd_job(target, big, True, rms=True), _bwd_job(target, big, True, rms=True),
                 _fwd_job(target, big, True, residual=False, affine=False),
                 _bwd_job(target, big, True, residual=False, affine=False),
                 _fwd_job(target, big, True, aligned=False), _bwd_job(target, big, True, aligned=False)]
    return jobs


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):  # PTX and cubins under pytest's tmp dirs, which it prunes
    return compile_kernels(_shipped_jobs(), out_dir=str(tmp_path_factory.mktemp("aot_layer_norm")))


def test_blocks_cover_every_row_length():
    """The launcher never picks a block the compile tests don't build."""
    for n in list(range(1, 70)) + [1023, 1500, 3000, 4096, 8191, 8192, 8193, 16384, 65536, 100_000]:
        block, single = ln.block_config(n, ln.MAX_BLOCK_N)
        assert block in BLOCKS and single == (n <= ln.MAX_BLOCK_N), n


def test_every_shipped_config_compiles(compiled):
    failed = [info.describe() for info in compiled if info.error is not None]
    assert not failed, "\n".join(failed)


def test_no_register_spills(compiled):
    spilled = [info.describe() for info in compiled if info.stack != 0 or info.local != 0]
    assert not spilled, "\n".join(spilled)


def test_shared_memory_fits(compiled):
    for info in compiled:
        assert 0 <= info.shared <= SHARED_MEMORY_LIMIT[info.job.target], info.describe()
