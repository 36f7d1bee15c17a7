"""benchmarks/defaults_sweep.py at --quick size (its JSON, table and chart), its --only refusal,
and the clock that recipes.train hands to the Trainer (what gives the sweep its CPU-time budget)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from minillm import recipes
from minillm.config import ModelConfig
from minillm.data import DataConfig
from minillm.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "benchmarks" / "defaults_sweep.py"


def test_quick_sweep_writes_the_table_json_and_chart(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(SWEEP), "--quick", "--work", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((out / "defaults_sweep_cpu.json").read_text())
    assert result["clock"] == "time.process_time" and result["threads"] == 1 and result["cpu_minutes"] == 0.01
    assert result["command"] == f"python benchmarks/defaults_sweep.py --quick --work {tmp_path / 'work'} --out {out}"
    rows = result["rows"]
    assert [(r["setting"], r["value"], r["seed"]) for r in rows] == [("default", "seed 0", 0), ("lr", "4e-3", 0)]
    assert rows[1]["overrides"] == {"train.lr": "4e-3"}
    for row in rows:
        # a budget of 0.6 CPU-seconds: a step or more, stopped by the budget, scored in nats/char
        assert row["stopped"] == "max_minutes" and row["steps"] >= 1 and row["train_cpu_seconds"] >= 0.6
        assert row["tokens"] == row["steps"] * 8 * 64  # batch 8 x seq_len 64 of the recipe, every step
        assert 0 < row["nats_per_char"] < math.log(512) and row["parameters"] > 0
    # the same model and data, another learning rate: the same parameter count, another score
    assert rows[0]["parameters"] == rows[1]["parameters"] and rows[0]["nats_per_char"] != rows[1]["nats_per_char"]

    table = (out / "defaults_sweep_cpu.md").read_text().splitlines()
    header = table.index("| setting | value | nats/char | delta vs default | steps | tokens | parameters |")
    default, lr = table[header + 2].split(" | "), table[header + 3].split(" | ")
    assert default[:4] == ["| default", "seed 0", f"{rows[0]['nats_per_char']:.4f}", "+0.0000"]
    assert lr[:5] == ["| lr", "4e-3", f"{rows[1]['nats_per_char']:.4f}",
                      f"{rows[1]['nats_per_char'] - rows[0]['nats_per_char']:+.4f}", str(rows[1]["steps"])]
    assert f"Command: `{result['command']}`" in table
    assert "Noise: the default did not run at both seeds." in table
    assert "| lr | 4e-3 |" in done.stdout  # the table is printed too
    assert (out / "defaults_sweep_cpu.png").stat().st_size > 0
    assert not list(out.glob("*.partial*"))


def test_only_names_a_known_variant():
    done = subprocess.run([sys.executable, str(SWEEP), "--only", "lr=5e-3", "--work", "unused", "--out", "unused"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode != 0 and "--only lr=5e-3: unknown lr=5e-3" in done.stderr
    assert "lr=4e-3" in done.stderr and "Traceback" not in done.stderr


LINES = [f"{word} number {i} and a few more words of line {i}." for i, word in
         enumerate(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"] * 5)]


@pytest.mark.usefixtures("one_thread")
def test_recipes_train_budgets_the_time_of_the_clock_it_is_given(tmp_path):
    """A fake clock that moves 25 s at each reading: a 1-minute budget is spent in a few steps (a
    real one would take a minute), and the run saves the fake clock's seconds."""
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    readings = []

    def clock() -> float:
        readings.append(25.0 * len(readings))
        return readings[-1]

    model = ModelConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=2, max_seq_len=16)
    data = DataConfig(inputs=[str(path)], text_split="lines", prepared_dir=str(tmp_path / "prepared"), vocab_size=320,
                      seq_len=16)
    train = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=0, max_minutes=1.0, batch_size=4, eval_every=0,
                        progress=False, warmup_steps=1)
    result = recipes.train(model, data, train, echo=None, num_samples=0, clock=clock)
    summary = result["summary"]
    # readings: 0 (start), then per step one at its start and one at its stop check
    assert summary["stopped"] == "max_minutes" and summary["steps"] == 2 and len(readings) == 5
    assert summary["train_seconds"] == 100.0  # the last reading (4 x 25 s) less the first
