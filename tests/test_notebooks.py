"""The notebooks: committed without outputs, and each one runs top to bottom on the CPU.

Every notebook reads one size knob, MINILLM_NOTEBOOK_SIZE ("full" for a learner, "ci" here), and
writes only under MINILLM_NOTEBOOK_RUN_DIR (here a pytest temp dir; for a learner ../runs/). The
notebooks import minillm and define no library code (no classes; see /STYLE.md).

The execution harness is itself tested: a notebook with a failing cell must fail it, and a
notebook saved with outputs must be reported.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
from nbclient.exceptions import CellExecutionError  # noqa: E402
from nbformat.v4 import new_code_cell, new_notebook, new_output  # noqa: E402

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = [
    "01_attention_from_scratch.ipynb",
    "02_pretrain_tiny_gpt_and_bert.ipynb",
    "03_finetune.ipynb",
    "04_attention_kernels_vs_sdpa.ipynb",
]
CELL_TIMEOUT_S = 900  # generous: CI machines are slow and shared; a whole notebook takes well under a minute there


def output_problems(nb) -> list[str]:
    """Why this notebook is not stripped: code cells with outputs or an execution count."""
    problems = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if cell.get("outputs"):
            problems.append(f"cell {i} has {len(cell.outputs)} output(s)")
        if cell.get("execution_count") is not None:
            problems.append(f"cell {i} has execution_count {cell.execution_count}")
    return problems


def execute(nb, run_dir: Path, monkeypatch) -> None:
    """Run every cell in a fresh python3 kernel, cwd = notebooks/, with the CI size."""
    monkeypatch.setenv("MINILLM_NOTEBOOK_SIZE", "ci")
    monkeypatch.setenv("MINILLM_NOTEBOOK_RUN_DIR", str(run_dir))
    # One intra-op thread: on a busy or shared CPU, torch's default (one thread per core) can make
    # the small training runs several times slower through contention, not faster.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK_DIR)}}
    )
    client.execute()


def test_expected_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert output_problems(nb) == [], f"{path.name}: strip outputs before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_reads_size_knob_and_defines_no_classes(path):
    nb = nbformat.read(path, as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert code and "MINILLM_NOTEBOOK_SIZE" in code[0], f"{path.name}: the first code cell must read the size knob"
    for source in code:
        assert not re.search(r"^\s*class\s", source, re.M), f"{path.name}: library code belongs in minillm/, not here"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_and_runs_again(path, tmp_path, monkeypatch):
    """Top to bottom, then once more into the same run directory, as "Restart & Run All" does."""
    before = _repo_files()
    for attempt in ("first", "second"):
        nb = nbformat.read(path, as_version=4)
        execute(nb, tmp_path, monkeypatch)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert errors == [], f"{path.name}, {attempt} run"
        figures = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
        assert figures, f"{path.name} drew no figure inline"
    assert _repo_files() == before, f"{path.name} wrote into the repository tree"


def _repo_files() -> set[str]:
    """Files a notebook could litter: the top of the repository and notebooks/ (its cwd).

    Not the whole tree: other work (tests, benchmarks) may write elsewhere while this runs.
    """
    root = NOTEBOOK_DIR.parent
    top = {p.name for p in root.iterdir() if p.is_file()}
    inside = {str(p.relative_to(root)) for p in NOTEBOOK_DIR.rglob("*") if ".ipynb_checkpoints" not in p.parts}
    return top | inside


def test_harness_fails_on_a_cell_error(tmp_path, monkeypatch):
    nb = new_notebook(cells=[new_code_cell("x = 1"), new_code_cell("assert x == 2, 'wrong on purpose'")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    with pytest.raises(CellExecutionError, match="wrong on purpose"):
        execute(nb, tmp_path, monkeypatch)


def test_output_check_catches_outputs():
    cell = new_code_cell("print(1)", execution_count=3, outputs=[new_output("stream", name="stdout", text="1\n")])
    nb = new_notebook(cells=[new_code_cell("pass"), cell])
    assert output_problems(nb) == ["cell 1 has 1 output(s)", "cell 1 has execution_count 3"]
