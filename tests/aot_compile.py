"""Ahead-of-time compilation of Triton kernels for real GPUs, on a machine without one.

The test session runs with TRITON_INTERPRET=1 (see conftest.py), so every `@triton.jit`
object imported in the test process is an interpreter object and cannot be compiled. This
helper therefore compiles in fresh Python subprocesses with TRITON_INTERPRET unset:

    infos = compile_kernels([
        CompileJob("minillm.kernels.norms:_some_kernel",
                   signature={"X": "*fp16", "N": "i32"}, constexprs={"BLOCK_N": 1024},
                   num_warps=4, target=90),
    ])
    assert infos[0].error is None and infos[0].stack == 0 and infos[0].local == 0

Each job is compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`,
its cubin is inspected with `cuobjdump --dump-resource-usage` (shipped in the triton wheel),
and its PTX is searched for tensor-core instructions. Jobs are split across `workers`
subprocesses that run side by side; Triton's on-disk cache makes repeated runs fast.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

# Shared memory one block may use (opt-in maximum), in bytes.
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}  # A100: 163 KiB, H100: 227 KiB
TARGETS = (80, 90)


@dataclass(frozen=True)
class CompileJob:
    kernel: str  # "package.module:function" naming a @triton.jit function
    signature: dict[str, str]  # every runtime argument -> Triton type, e.g. "*fp16", "i32", "fp32"
    constexprs: dict[str, object] = field(default_factory=dict)  # tl.constexpr arguments -> value
    num_warps: int = 4
    num_stages: int = 3
    target: int = 90  # compute capability: 80 (A100) or 90 (H100)
    # Arguments the launcher's JIT would mark 16-divisible (aligned pointers, strides that are
    # multiples of 16); the hint enables vectorised loads, so it changes the code and registers.
    divisible_by_16: tuple[str, ...] = ()


@dataclass(frozen=True)
class CompiledInfo:
    job: CompileJob
    error: str | None  # the compiler's message when compilation failed, else None
    registers: int = -1  # per thread (cuobjdump REG)
    stack: int = -1  # bytes of stack per thread; > 0 means spills
    local: int = -1  # bytes of local memory per thread; > 0 means spills
    static_shared: int = -1  # cuobjdump SHARED: statically declared shared memory
    shared: int = -1  # metadata.shared: shared memory Triton requests at launch, bytes
    has_mma: bool = False  # PTX contains mma.sync (sm_80-style tensor cores)
    has_wgmma: bool = False  # PTX contains wgmma.mma_async (sm_90 warpgroup MMA)
    ptx_path: str = ""  # the PTX, kept on disk for inspection

    def describe(self) -> str:
        j = self.job
        return (f"{j.kernel} sm_{j.target} warps={j.num_warps} stages={j.num_stages} "
                f"constexprs={j.constexprs}: " + (self.error or
                f"REG={self.registers} STACK={self.stack} LOCAL={self.local} shared={self.shared}"))


def compile_kernels(jobs: list[CompileJob], workers: int = 2, out_dir: str | None = None,
                    timeout: float = 600) -> list[CompiledInfo]:
    """Compile `jobs` in `workers` parallel subprocesses; return one CompiledInfo per job, in order."""
    out_dir = out_dir or tempfile.mkdtemp(prefix="aot_compile_")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
    chunks = [list(range(w, len(jobs), workers)) for w in range(workers)]
    procs = []
    for w, idx in enumerate(chunks):
        if not idx:
            continue
        spec = os.path.join(out_dir, f"jobs_{w}.json")
        if os.path.exists(os.path.join(out_dir, f"results_{w}.json")):
            os.remove(os.path.join(out_dir, f"results_{w}.json"))  # never read a stale run
        with open(spec, "w") as f:
            json.dump([{"index": i, **dataclasses.asdict(jobs[i])} for i in idx], f)
        cmd = [sys.executable, os.path.abspath(__file__), spec, out_dir]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    results: dict[int, dict] = {}
    for p in procs:
        log, _ = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"AOT compile worker failed (rc={p.returncode}):\n{log.decode()[-4000:]}")
    for w in range(len(chunks)):
        path = os.path.join(out_dir, f"results_{w}.json")
        if os.path.exists(path):
            with open(path) as f:
                results.update({r["index"]: r for r in json.load(f)})
    return [CompiledInfo(job=job, **{k: v for k, v in results[i].items() if k != "index"})
            for i, job in enumerate(jobs)]


def _resource_usage(cubin_path: str) -> dict:
    """Parse `cuobjdump --dump-resource-usage` for the single kernel in a cubin."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    text = subprocess.run([tool, "--dump-resource-usage", cubin_path], check=True,
                          capture_output=True, text=True).stdout
    line = next(ln for ln in text.splitlines() if "REG:" in ln)
    usage = dict(item.split(":", 1) for item in line.split() if ":" in item)
    return {"registers": int(usage["REG"]), "stack": int(usage["STACK"]),
            "local": int(usage["LOCAL"]), "static_shared": int(usage["SHARED"])}


def _worker(spec_path: str, out_dir: str) -> None:
    """Subprocess entry point: compile every job in `spec_path`, write results next to it."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = []
    for job in json.load(open(spec_path)):
        module_name, fn_name = job["kernel"].split(":")
        fn = getattr(importlib.import_module(module_name), fn_name)
        signature = dict(job["signature"], **{k: "constexpr" for k in job["constexprs"]})
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in job["divisible_by_16"]}
        try:
            compiled = triton.compile(
                ASTSource(fn=fn, signature=signature, constexprs=job["constexprs"], attrs=attrs),
                target=GPUTarget("cuda", job["target"], 32),
                options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]})
        except Exception as e:  # the compiler's message is the useful part of a failure
            results.append({"index": job["index"], "error": f"{type(e).__name__}: {e}"[-3000:]})
            continue
        stem = os.path.join(out_dir, f"{fn_name}_{job['index']}_sm{job['target']}")
        with open(stem + ".cubin", "wb") as f:
            f.write(compiled.asm["cubin"])
        ptx = compiled.asm["ptx"]
        with open(stem + ".ptx", "w") as f:
            f.write(ptx)
        results.append({"index": job["index"], "error": None, **_resource_usage(stem + ".cubin"),
                        "shared": int(compiled.metadata.shared), "has_mma": "mma.sync" in ptx,
                        "has_wgmma": "wgmma.mma_async" in ptx, "ptx_path": stem + ".ptx"})
    worker_id = os.path.basename(spec_path).removeprefix("jobs_").removesuffix(".json")
    with open(os.path.join(out_dir, f"results_{worker_id}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
