"""benchmarks/gpu_suite.py: the dry run on CPU (Triton's interpreter), its failure path, its budget,
and the README table generated from GPU results.

The dry run is the same code as the GPU run with tiny shapes; running it here is what keeps the
suite working between GPU windows. Its figures are CPU figures and are checked only for presence.
"""

import contextlib
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from minillm import measured

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"test_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def suite():
    return _load("gpu_suite")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of the whole suite as a user starts it: a script, TRITON_INTERPRET not set."""
    out = tmp_path_factory.mktemp("suite")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SUITE), "--out", str(out), "--dry"], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)
    return proc, out


def test_dry_run_writes_every_section_and_the_charts(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu_suite.json").read_text())
    assert result["status"] == "ok" and result["dry"] is True and result["device_type"] == "cpu"
    assert "DRY RUN" in result["note"] and "not GPU figures" in proc.stdout
    assert result["environment"]["triton_interpret"] == "1" and result["environment"]["capability"] is None
    assert result["ceilings"]["copy_gb_per_s"] > 0 and result["ceilings"]["matmul_tflops"] > 0
    cases = result["correctness"]["cases"]
    names = " | ".join(c["case"] for c in cases)
    for kind in ("causal=True", "causal=False", "GQA", "padding", "varlen", "dropout", "layer_norm", "rms_norm",
                 "add_layer_norm", "add_rms_norm"):
        assert kind in names
    assert all(c["status"] == "ok" for c in cases)
    timed = {(r["provider"], r["mode"]) for r in result["attention"]["rows"] if r["tflops"]}
    assert {("minillm", "fwd"), ("minillm", "fwd+bwd"), ("sdpa", "fwd+bwd"), ("sdpa-math", "fwd")} <= timed
    assert "FLOPs fwd = 4*B*H*L^2*D" in result["attention"]["formula"]
    assert "flash-attn" in result["attention"]["missing_providers"]
    norms = {(r["op"], r["provider"], r["mode"]) for r in result["norms"]["rows"] if r["gb_per_s"]}
    for op in ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"):
        assert {(op, "minillm (Triton)", m) for m in ("fwd", "bwd")} | {(op, "torch", "fwd")} <= norms
    assert all(r["pct_of_copy"] > 0 for r in result["norms"]["rows"])
    runs = {(r["attn_backend"], r["norm_backend"]): r for r in result["training"]["runs"]}
    assert runs[("triton", "triton")]["status"] == "ok" and runs[("sdpa", "torch")]["tokens_per_s"] > 0
    assert 0 < runs[("triton", "triton")]["mfu"]
    charts = result["charts"]["files"]
    assert 1 <= len(charts) <= 6 and len(list(out.glob("*.png"))) == len(charts)
    assert all((out / name).stat().st_size > 1000 for name in charts)
    assert result["skipped"] == []  # the default budget fits a dry run
    assert measured.load([out / "gpu_suite.json"]).files == []  # a dry run is never evidence for auto


def test_a_failed_case_stops_the_suite_and_names_it(suite, tmp_path, monkeypatch, capsys):
    """A kernel that is off by 10% fails the first attention case; nothing after it runs."""
    from minillm.kernels import attention as A

    right = A.scaled_dot_product_attention
    monkeypatch.setattr(A, "scaled_dot_product_attention", lambda *a, **kw: right(*a, **kw) * 1.1)
    monkeypatch.setattr(suite, "attention", lambda *a: pytest.fail("timed after a failed check"))
    assert suite.run(Namespace(out=str(tmp_path), budget_s=420.0, dry=True)) == 1
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert result["status"] == "failed" and result["failed_case"] == "attention bf16 D=24 causal=False"
    assert "kernel error" in result["error"] and "attention" not in result
    assert "FAILED attention bf16 D=24 causal=False" in capsys.readouterr().err


def test_the_budget_skips_what_would_not_fit_and_says_so(suite, capsys):
    clock = suite.Clock(budget_s=100.0)
    assert clock.fits("attention", "first shape", None)  # nothing measured yet: run it
    estimate = suite._estimate((10.0, 1e9), 4e9)  # the previous shape: 10 s for a quarter of the work
    assert estimate == pytest.approx(40.0) and clock.fits("attention", "seq=2048", estimate)
    assert not clock.fits("attention", "seq=16384", 60.0)  # 50 s is the attention share
    assert clock.skipped == [{"section": "attention", "what": "seq=16384",
                              "reason": clock.skipped[0]["reason"]}]
    assert "estimated 60.0 s" in clock.skipped[0]["reason"] and "skipped seq=16384" in capsys.readouterr().out
    assert clock.fits("training", "a run", 90.0) and not clock.fits("training", "a longer run", 96.0)


def test_a_spent_budget_skips_every_shape_of_every_section_and_lists_them(suite):
    plan = suite.Plan.make(dry=True)
    clock = suite.Clock(budget_s=1e-9)
    assert suite.attention(plan, clock, suite._timer(plan))["rows"] == []
    assert suite.norms(plan, clock, suite._timer(plan), 1.0)["rows"] == []
    assert suite.training(plan, clock, 1.0)["runs"] == []
    whats = [s["what"] for s in clock.skipped]
    assert whats == ([f"attention seq=16 D=16 causal={c}" for c in (False, True)]
                     + [f"{op} N=256" for op in suite.NORM_OPS]
                     + [f"training attn_backend={a} norm_backend={n}" for a, n in plan.train_backends])


def test_a_backend_that_cannot_run_is_recorded_not_fatal(suite):
    plan = dataclasses.replace(suite.Plan.make(dry=True), train_backends=(("flash", "torch"),))
    section = suite.training(plan, suite.Clock(420.0), 1.0)
    assert section["runs"][0]["status"].startswith("unsupported: ValueError: ModelConfig.attn_backend")

    def refuses(q, k, v, causal):
        raise ValueError("head dim 96 is not compiled here")

    bench = suite._load_benchmark("attention")
    shape = bench.Shape(1, 2, 16, 16, True, "fp32")
    row = suite._attention_row(bench, "other", refuses, contextlib.nullcontext, shape, "fwd", plan, suite._timer(plan))
    assert row["status"] == "unsupported: ValueError: head dim 96 is not compiled here" and row["ms"] is None
    assert row["seq"] == 16 and row["provider"] == "other"


def test_charts_are_skipped_with_the_reason_without_matplotlib(suite, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    charts = suite.charts({"dry": True, "environment": {"device": "CPU"}}, tmp_path)
    assert charts["files"] == [] and charts["skipped"].startswith("matplotlib not installed")


def test_dry_needs_the_interpreter_set_before_triton(suite, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(SystemExit):
        suite.main(["--out", "x", "--dry"])
    assert "--dry needs TRITON_INTERPRET=1" in capsys.readouterr().err


def test_bench_gpu_runs_the_suite(tmp_path, monkeypatch, capfd):
    from minillm import cli

    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "gpu_suite.py").write_text("import sys; print('SUITE', sys.argv[1:])\n")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "gpu", "--out", "d", "--dry"]) == 0
    assert "SUITE ['--out', 'd', '--dry']" in capfd.readouterr().out


def test_readme_table_is_generated_from_the_gpu_results(tmp_path):
    """The README's block is what the generator prints today (no GPU file: it says so), and a GPU
    result becomes rows of ours against the baseline."""
    table = _load("readme_table")
    readme = (ROOT / "README.md").read_text()
    assert table.readme_with_table(readme, table.table()) == readme
    assert "No GPU measurement yet" in table.table()
    gpu = {"dry": False, "device_type": "cuda", "date": "2026-12-02", "command": "gpu_suite.py --out x",
           "environment": {"device": "NVIDIA H200", "capability": "9.0", "torch": "2.6", "triton": "3.2"},
           "ceilings": {"copy_gb_per_s": 4000.0, "matmul_tflops": 700.0},
           "attention": {"rows": [dict(provider=p, mode="fwd+bwd", head_dim=128, causal=True, seq=4096, tflops=t)
                                  for p, t in (("minillm", 300.0), ("sdpa", 400.0))]},
           "norms": {"rows": [dict(provider=p, op="rms_norm", mode="fwd+bwd", hidden=4096, gb_per_s=g)
                              for p, g in (("minillm (Triton)", 3000.0), ("torch", 1500.0))]},
           "training": {"model": "gpt2-124m", "runs": [dict(attn_backend="triton", norm_backend="triton",
                                                            status="ok", tokens_per_s=400000.0, mfu=0.4)]}}
    path = tmp_path / "gpu_suite_h200" / "gpu_suite.json"
    path.parent.mkdir()
    path.write_text(json.dumps(gpu))
    text = table.table([path])
    assert "**NVIDIA H200** (compute capability 9.0" in text
    assert "| attention fwd+bwd, TFLOP/s vs SDPA | D=128 causal seq=4096 | 300.0 | 400.0 | 0.75 |" in text
    assert "| rms_norm fwd+bwd, GB/s vs torch | N=4096 | 3000 | 1500 | 2.00 |" in text
    assert "| training gpt2-124m, tokens/s (MFU) | attn triton, norm triton | 400,000 (40.0%) | | |" in text
