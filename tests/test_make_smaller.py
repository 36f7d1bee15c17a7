"""benchmarks/make_smaller.py at its --quick size: every arm gets a row, and the table, CSV, JSON
and chart are written; `minillm bench make-smaller` runs it."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "make_smaller.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("make_smaller", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_one_row_per_arm(tiny_gpt_run, tmp_path, one_thread):
    _, teacher = tiny_gpt_run
    results = tmp_path / "results"
    summary = load_benchmark().main(["--quick", "--teacher", str(teacher), "--out", str(tmp_path / "runs"),
                                     "--results", str(results)])
    methods = [r["method"] for r in summary["rows"]]
    assert methods[:4] == ["teacher", "student, no teacher (alpha=0)", "student, distilled (T=2, alpha=0.5)",
                           "student, distilled from teacher blocks"]
    assert methods[4:7] == ["pruned, unstructured, 50%", "pruned, heads, 50%", "pruned, mlp, 50%"]
    assert methods[7].startswith("quantized")  # the rows of h-quant's quantize_checkpoint, or the row saying it is missing
    rows = {r["method"]: r for r in summary["rows"]}
    teacher_row, student = rows["teacher"], rows["student, no teacher (alpha=0)"]
    assert student["parameters"] < teacher_row["parameters"] and student["size_bytes"] < teacher_row["size_bytes"]
    assert rows["pruned, heads, 50%"]["parameters"] < teacher_row["parameters"]
    assert rows["pruned, unstructured, 50%"]["parameters"] == teacher_row["parameters"]
    for r in summary["rows"][:7]:
        assert r["val_loss"] > 0 and r["tokens_per_s"] > 0
    table = (results / "make_smaller_quick_cpu.md").read_text()
    assert "| method | parameters | size on disk | val loss (nats/token) | CPU tokens/s | note |" in table
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 2 + len(methods)
    with open(results / "make_smaller_quick_cpu.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == methods
    assert json.loads((results / "make_smaller_quick_cpu.json").read_text())["rows"][0]["method"] == "teacher"
    assert (results / "make_smaller_quick_cpu.png").stat().st_size > 0


def test_a_missing_teacher_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as info:
        load_benchmark().main(["--quick", "--teacher", str(tmp_path / "nowhere"), "--results", str(tmp_path)])
    assert info.value.code == 2


def test_bench_make_smaller_runs_the_script(capfd):
    from minillm import cli

    assert cli.main(["bench", "make-smaller", "--help"]) == 0
    out = capfd.readouterr().out
    assert "make_smaller.py --help" in out and "--quick" in out and "--teacher" in out


def test_quantization_rows_are_the_quantized_teacher(tiny_gpt_run, tmp_path):
    """The int8 and int4 rows load what minillm.checkpoint.quantize_checkpoint wrote: smaller files,
    a loss near the teacher's."""
    from minillm import checkpoint as ckpt

    _, teacher = tiny_gpt_run
    bench = load_benchmark()
    teacher_dir = ckpt.resolve_checkpoint(teacher)
    scorer = bench.Scorer(teacher_dir, eval_batches=1, batch=2, repeats=1)
    rows = bench.quantize_arms(teacher_dir, tmp_path, scorer)
    assert [r["method"] for r in rows] == ["quantized, int8", "quantized, int4"]
    assert all(ckpt.read_configs(tmp_path / f"quantized-int{b}")["quantization"]["bits"] == b for b in (8, 4))
    full = (teacher_dir / ckpt.WEIGHTS).stat().st_size
    assert all(0 < r["size_bytes"] < full and r["tokens_per_s"] > 0 for r in rows)
    assert all(r["val_loss"] > 0 for r in rows)
