"""The learning-rate schedule fitted to a time budget (TrainConfig.max_steps=0 with max_minutes).

The schedule is checked as a plain function (warmup, stable, cooldown to min_lr at the end of the
budget), then inside the Trainer driven by a fake clock that a hook advances by a fixed number of
seconds per step: the logged rates must be the function's values at those times, the run must
stop at the budget with its rate at min_lr, and a run cut in two and resumed must log the same
rates, losses and weights as one uninterrupted run (the checkpoint carries the training time).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from minillm.config import ModelConfig
from minillm.data import CausalLMCollator
from minillm.metrics import read_metrics
from minillm.optim import lr_at, schedule_cut, schedule_summary
from minillm.tasks import build_model
from minillm.train_config import TrainConfig
from minillm.trainer import Trainer, seed_everything

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

V, T = 64, 12
SECONDS_PER_STEP = 6.0  # what the fake clock advances after every step


def wsd(**overrides) -> TrainConfig:
    """A time-fitted WSD config: 1 minute, warmup 4 steps, cooldown over the last 25%."""
    fields = dict(out_dir="unused", max_steps=0, max_minutes=1.0, schedule="wsd", cooldown_fraction=0.25,
                  lr=1.0, min_lr_ratio=0.1, warmup_steps=4)
    return TrainConfig(**{**fields, **overrides})


# =============================================================================================
# The schedule as a function of (step, elapsed seconds)
# =============================================================================================


def test_time_fitted_wsd_warms_up_stays_then_decays_to_min_lr_at_the_budget():
    config = wsd()
    assert config.time_fitted
    # warmup by steps: (step + 1) / 4 of the peak, whatever the time
    assert [lr_at(s, config, 0.5 * s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # stable at the peak until 75% of the 60 s budget
    assert lr_at(10, config, 30.0) == 1.0 and lr_at(50, config, 45.0) == 1.0
    # linear cooldown over the last 15 s: half way (52.5 s) is half way between 1.0 and 0.1
    assert lr_at(60, config, 52.5) == pytest.approx(0.55)
    assert lr_at(70, config, 60.0) == pytest.approx(0.1)  # min_lr at the end of the budget
    assert lr_at(80, config, 75.0) == pytest.approx(0.1)  # and past it
    # the time, not the step, drives the decay: the same step at another time gets another rate
    assert lr_at(20, config, 50.0) != lr_at(20, config, 55.0)
    # a warmup that has not finished when the cooldown starts hands over to the decay where they cross
    assert lr_at(1, wsd(warmup_steps=100), 59.0) == pytest.approx(min(2 / 100, 0.1 + 0.9 * (1 / 15)))


def test_time_fitted_cosine_and_linear_span_the_whole_budget():
    cosine, linear = wsd(schedule="cosine"), wsd(schedule="linear")
    assert lr_at(10, cosine, 30.0) == pytest.approx(0.1 + 0.9 * 0.5)  # cos(pi / 2) = 0
    assert lr_at(10, linear, 15.0) == pytest.approx(0.1 + 0.9 * 0.75)
    assert lr_at(10, cosine, 60.0) == pytest.approx(0.1) and lr_at(10, linear, 60.0) == pytest.approx(0.1)


def test_wsd_over_steps():
    config = TrainConfig(out_dir="unused", max_steps=104, warmup_steps=4, schedule="wsd", cooldown_fraction=0.5,
                         lr=1.0, min_lr_ratio=0.0)
    assert not config.time_fitted
    assert lr_at(3, config) == 1.0 and lr_at(54, config) == 1.0  # stable for the first half after warmup
    assert lr_at(79, config) == pytest.approx(0.5) and lr_at(104, config) == 0.0


def test_time_fitted_schedule_needs_the_elapsed_time():
    with pytest.raises(ValueError, match=r"lr_at: a time-fitted schedule \(max_steps=0\) needs elapsed_s"):
        lr_at(3, wsd())


@pytest.mark.parametrize("fields, match", [
    ({"max_steps": 0}, r"TrainConfig.max_minutes: got None, expected a positive number of minutes when max_steps=0"),
    ({"max_steps": -1}, r"TrainConfig.max_steps: got -1, expected an integer >= 0"),
    ({"schedule": "wsd", "cooldown_fraction": 0.0}, r"TrainConfig.cooldown_fraction: got 0.0, expected a number in \(0, 1\]"),
    ({"schedule": "wsd", "cooldown_fraction": 1.5}, r"TrainConfig.cooldown_fraction: got 1.5"),
    ({"schedule": "step"}, r"TrainConfig.schedule: got 'step', expected one of \('cosine', 'linear', 'constant', 'wsd'\)"),
])
def test_schedule_settings_are_validated(fields, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(out_dir="unused", **fields)


def test_cooldown_fraction_has_no_effect_outside_wsd():
    assert "cooldown_fraction" in TrainConfig(out_dir="unused").fields_without_effect()
    assert "cooldown_fraction" not in wsd().fields_without_effect()


def test_the_report_says_time_fitted_and_decayed():
    config = wsd()
    assert schedule_cut(config, step=11, lr=0.1) is None  # the budget is the horizon: nothing was cut
    line = schedule_summary(config, last_lr=0.1, elapsed_s=66.0)
    assert "time-fitted to max_minutes=1" in line and "ended decayed, 100% of the decay done" in line
    assert "NOT decayed" in schedule_summary(config, last_lr=1.0, elapsed_s=30.0)
    stepped = TrainConfig(out_dir="unused", max_steps=100, max_minutes=1.0)
    assert "max_steps=0" in schedule_cut(stepped, step=10, lr=5e-4)  # the warning points at the fix


# =============================================================================================
# In the Trainer, with a fake clock
# =============================================================================================


class FakeClock:
    """Seconds that move only when a test says so."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Windows(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        self.rows = np.random.default_rng(seed).integers(5, V, size=(n, T))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.rows[i]}


def make_model():
    seed_everything(0)
    return build_model(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, max_seq_len=T, resid_dropout=0.1),
                       "causal-lm")


def fit(tmp_path, name: str, clock: FakeClock, stop_at: int | None = None, **overrides) -> tuple[Trainer, dict]:
    def advance(trainer, row):
        clock.now += SECONDS_PER_STEP
        if trainer.step == stop_at:
            trainer.should_stop = True

    config = wsd(**{"out_dir": str(tmp_path / name), "lr": 3e-3, "batch_size": 4, "log_every": 1, "eval_every": 0,
                    "checkpoint_every": 0, "progress": False, **overrides})
    trainer = Trainer(make_model(), config, Windows(32, 1), Windows(4, 2), collate_fn=CausalLMCollator(),
                      hooks={"on_step_end": advance}, clock=clock)
    return trainer, trainer.fit()


def train_rows(out_dir) -> list[dict]:
    return [r for r in read_metrics(out_dir / "metrics.jsonl") if r["kind"] == "train"]


def test_trainer_follows_the_clock_and_ends_at_min_lr(tmp_path):
    trainer, summary = fit(tmp_path, "run", FakeClock())
    # 6 s a step, 60 s budget: the 11th step is the first to end past it (66 s > 60 s)
    assert summary["stopped"] == "max_minutes" and summary["steps"] == 11
    assert summary["train_seconds"] == 66.0
    lrs = [r["lr"] for r in train_rows(tmp_path / "run")]
    config = trainer.config
    # step s starts at 6 s and is expected to end 6 s later (the last step's duration; none before step 0)
    ends = [0.0] + [SECONDS_PER_STEP * (s + 1) for s in range(1, 11)]
    assert lrs == pytest.approx([lr_at(s, config, t) for s, t in enumerate(ends)], rel=1e-12)
    assert lrs[:4] == pytest.approx([0.75e-3, 1.5e-3, 2.25e-3, 3e-3])  # warmup
    assert lrs[4:7] == pytest.approx([3e-3] * 3)  # stable up to 45 s (step 6 ends at 42 s)
    assert lrs[7] == pytest.approx(3e-4 + 2.7e-3 * 4 / 5)  # step 7 ends at 48 s: 3 of the 15 cooldown seconds
    assert lrs[-1] == pytest.approx(config.min_lr) and summary["last_lr"] == lrs[-1]  # the step that ends the budget
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_resume_of_a_time_fitted_run_is_exact(tmp_path):
    """Cut at step 8 (48 s, in the cooldown), resume with the same clock: the same rates, losses and
    weights as the uninterrupted run, which needs the checkpoint to carry the 48 s already trained
    and the last step's 6 s."""
    full, _ = fit(tmp_path, "full", FakeClock())
    clock = FakeClock()
    _, summary = fit(tmp_path, "cut", clock, stop_at=8)
    assert summary["stopped"] == "hook" and summary["train_seconds"] == 48.0
    resumed, summary = fit(tmp_path, "cut", clock, resume=True)
    assert resumed.step == 11 and summary["stopped"] == "max_minutes"
    expected, got = train_rows(tmp_path / "full"), train_rows(tmp_path / "cut")
    assert [r["step"] for r in got] == list(range(1, 12))
    assert [r["lr"] for r in got] == [r["lr"] for r in expected]
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]
    assert not math.isclose(expected[0]["loss"], expected[-1]["loss"])  # the losses did move
    for name, value in full.raw_model.state_dict().items():
        assert torch.equal(value, resumed.raw_model.state_dict()[name]), name


def test_a_run_that_ends_in_its_warmup_is_not_called_decayed():
    config = TrainConfig(out_dir="unused", max_steps=600, warmup_steps=30, lr=2e-3)
    line = schedule_summary(config, last_lr=lr_at(0, config), elapsed_s=5.0, steps=1)
    assert "ended in its warmup (step 1 of warmup_steps=30)" in line and "NOT decayed" in line
    assert "ended decayed" not in line


def test_a_time_fitted_bar_counts_the_budget_and_shows_the_step(tmp_path, capsys):
    _, summary = fit(tmp_path, "bar", FakeClock(), progress=True)
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    # the budget is 60 s; the last step started at 60 s (10 steps of 6 s): the bar is full, with the step
    assert "60/60" in last and f"step={summary['steps']}" in last, last
