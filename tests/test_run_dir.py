"""The run directory: a replaced run is kept until the new run's first checkpoint and put back,
byte for byte, when the new run fails or is killed before it; leftovers of a killed save are
cleaned when the next run starts; a bad out_dir and a failing write are one clear error each.

Tiny causal LMs (C=32, 2 layers, V=100) trained for a step or two on CPU.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from minillm import checkpoint as ckpt
from minillm.config import ModelConfig
from minillm.tasks import build_model
from minillm.train_config import TrainConfig
from minillm.trainer import Trainer, seed_everything

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def model(seed: int = 0):
    seed_everything(seed)
    return build_model(ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=2, max_seq_len=16), "causal-lm")


BATCHES = [{"input_ids": torch.randint(7, 100, (2, 8), generator=torch.Generator().manual_seed(i)),
            "labels": torch.randint(7, 100, (2, 8), generator=torch.Generator().manual_seed(i + 10))} for i in range(3)]


def config(out_dir: Path, **overrides) -> TrainConfig:
    fields = dict(out_dir=str(out_dir), max_steps=2, warmup_steps=0, checkpoint_every=1, eval_every=0, log_every=1,
                  progress=False)
    return TrainConfig(**{**fields, **overrides})


def save(out: Path, step: int, net) -> Path:
    return ckpt.save_checkpoint(out, step, net, {"step": step}, {"task": "causal-lm", "model": net.config})


def snapshot(directory: Path) -> dict[str, object]:
    """Every entry under `directory`: a file's bytes, a symlink's target, or "dir"."""
    entries = {}
    for path in sorted(directory.rglob("*")):
        name = str(path.relative_to(directory))
        if path.is_symlink():
            entries[name] = ("symlink", os.readlink(path))
        elif path.is_dir():
            entries[name] = "dir"
        else:
            entries[name] = path.read_bytes()
    return entries


def fit_failing(trainer: Trainer, error: type[BaseException]) -> list[str]:
    """trainer.fit(), which must raise `error`; returns the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught, pytest.raises(error):
        warnings.simplefilter("always")
        trainer.fit()
    return [str(w.message) for w in caught]


BACK = "the previous run is back in place (latest checkpoint step_000002)"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """Run A: two steps, a checkpoint at each, `best` and the metrics. Tests copy it."""
    out = tmp_path_factory.mktemp("a") / "run"
    trainer = Trainer(model(seed=0), config(out), BATCHES)
    trainer.fit()
    ckpt.mark_best(out, out / "step_000001")
    return out


@pytest.fixture
def run_a(finished_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out, symlinks=True)
    return out


# =============================================================================================
# overwrite=True keeps the previous run until the new run's first checkpoint
# =============================================================================================


def test_a_replacing_run_interrupted_before_its_first_checkpoint_puts_the_previous_run_back(run_a):
    before = snapshot(run_a)

    def interrupt(trainer, row):
        raise KeyboardInterrupt

    trainer = Trainer(model(seed=1), config(run_a, overwrite=True, max_steps=3), BATCHES,
                      hooks={"on_step_end": interrupt})
    said = fit_failing(trainer, KeyboardInterrupt)
    assert snapshot(run_a) == before  # same `latest`, `best`, weights, metrics, events; nothing of the new run
    assert any(BACK in message for message in said)


def test_a_replacing_run_that_diverges_before_its_first_checkpoint_puts_the_previous_run_back(run_a):
    before = snapshot(run_a)

    def poison(trainer, row):  # step 2's loss is NaN
        with torch.no_grad():
            trainer.raw_model.decoder.blocks[0].mlp.fc_in.weight.fill_(float("inf"))

    trainer = Trainer(model(seed=1), config(run_a, overwrite=True, max_steps=5, checkpoint_every=0), BATCHES,
                      hooks={"on_step_end": poison})
    said = fit_failing(trainer, FloatingPointError)
    assert snapshot(run_a) == before
    assert any(BACK in message for message in said)


def test_the_previous_run_goes_at_the_new_runs_first_checkpoint(run_a):
    a_latest, a_weights = (run_a / "latest").read_text(), (run_a / "step_000001" / ckpt.WEIGHTS).read_bytes()
    seen = []

    def before_first_save(trainer, row):
        if trainer.step == 1:  # still kept, exactly as it was
            seen.append((run_a / ".previous-run" / "latest").read_text() == a_latest)
        if trainer.step == 2:
            raise KeyboardInterrupt  # after the first checkpoint: nothing to put back

    def after_save(trainer, path):
        seen.append(not (run_a / ".previous-run").exists())

    trainer = Trainer(model(seed=1), config(run_a, overwrite=True, max_steps=3), BATCHES,
                      hooks={"on_step_end": before_first_save, "on_checkpoint": after_save})
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert seen == [True, True]
    assert sorted(p.name for p in run_a.iterdir()) == ["config.toml", "latest", "metrics.csv", "metrics.jsonl",
                                                        "step_000001", "tensorboard"]
    assert (run_a / "step_000001" / ckpt.WEIGHTS).read_bytes() != a_weights  # the new run's
    assert len((run_a / "metrics.jsonl").read_text().splitlines()) == 2  # its steps 1 and 2


KILLED_REPLACEMENT = textwrap.dedent("""
    import os, signal, sys, torch
    from minillm.config import ModelConfig
    from minillm.tasks import build_model
    from minillm.train_config import TrainConfig
    from minillm.trainer import Trainer
    out, when = sys.argv[1], sys.argv[2]
    if when != "mid_run":
        os.environ["MINILLM_CHECKPOINT_CRASH_AT"] = when  # a kill while moving the previous run in or out
    torch.manual_seed(1)
    model = build_model(ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=2, max_seq_len=16), "causal-lm")

    def fail(trainer, row):
        if when == "mid_run":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("the new run fails before its first checkpoint")

    batches = [{"input_ids": torch.randint(7, 100, (2, 8)), "labels": torch.randint(7, 100, (2, 8))}]
    config = TrainConfig(out_dir=out, max_steps=3, warmup_steps=0, checkpoint_every=0, eval_every=0,
                         progress=False, overwrite=True)
    Trainer(model, config, batches, hooks={"on_step_end": fail}).fit()
""")


@pytest.mark.parametrize("when", ["keeping_previous_run", "mid_run", "restoring_previous_run"])
def test_sigkill_while_replacing_a_run_loses_nothing(run_a, when):
    """Killed while moving the previous run aside, while training before the first checkpoint, or
    while putting the previous run back: the next start restores it exactly."""
    before = snapshot(run_a)
    result = subprocess.run([sys.executable, "-c", KILLED_REPLACEMENT, str(run_a), when], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr
    assert (run_a / ".previous-run").exists() or (run_a / ".previous-run.tmp").exists()  # killed mid-way
    with pytest.warns(UserWarning, match=re.escape(BACK)):
        assert ckpt.prepare_run_dir(run_a, resume=True, overwrite=False) == run_a / "step_000002"
    assert snapshot(run_a) == before


def test_a_kill_after_the_new_runs_first_checkpoint_completes_the_replacement(run_a):
    ckpt.prepare_run_dir(run_a, resume=False, overwrite=True)  # the previous run moves aside...
    new = save(run_a, 1, model(seed=1))  # ...and the new run is killed before finish_replacement
    assert (run_a / ".previous-run").is_dir()
    assert ckpt.prepare_run_dir(run_a, resume=True, overwrite=False) == new
    assert sorted(p.name for p in run_a.iterdir()) == ["latest", "step_000001"]


@pytest.mark.parametrize("outcome", ["fails", "checkpoints"])
def test_a_probe_stage_belongs_to_the_run_that_trained_it(run_a, tmp_path, outcome):
    """The order a fine-tune with a probe takes (recipes.train): the Trainer prepares out_dir (the
    previous run, probe included, moves aside), the probe trains in out_dir/probe (before_training),
    then the run, which fails before its first checkpoint (everything of the previous run comes
    back, no trace of the new probe) or checkpoints (only the new run and its probe stay)."""
    shutil.copytree(run_a, tmp_path / "probe-a", symlinks=True)
    shutil.move(tmp_path / "probe-a", run_a / "probe")
    before = snapshot(run_a)
    probes = []

    def probe(net) -> None:
        Trainer(net, config(run_a / "probe", max_steps=1), BATCHES).fit()
        probes.append(snapshot(run_a / "probe"))

    def stop(trainer, row) -> None:
        raise KeyboardInterrupt

    hooks = {"on_step_end": stop} if outcome == "fails" else {}
    trainer = Trainer(model(seed=2), config(run_a, overwrite=True, max_steps=1), BATCHES, before_training=probe,
                      hooks=hooks)
    if outcome == "fails":
        assert any(BACK in w for w in fit_failing(trainer, KeyboardInterrupt))
        assert snapshot(run_a) == before
    else:
        trainer.fit()
        assert sorted(p.name for p in run_a.iterdir()) == ["config.toml", "latest", "metrics.csv", "metrics.jsonl",
                                                           "metrics.png", "probe", "step_000001", "tensorboard"]
        assert snapshot(run_a / "probe") == probes[0]


def test_replacing_without_a_probe_sets_the_previous_runs_probe_aside_too(run_a, tmp_path):
    shutil.copytree(run_a, tmp_path / "probe-a", symlinks=True)
    shutil.move(tmp_path / "probe-a", run_a / "probe")
    before = snapshot(run_a)
    ckpt.prepare_run_dir(run_a, resume=False, overwrite=True)
    assert not (run_a / "probe").exists() and (run_a / ".previous-run" / "probe" / "latest").is_file()
    with pytest.warns(UserWarning, match="back in place"):
        ckpt.restore_previous_run(run_a)
    assert snapshot(run_a) == before


# =============================================================================================
# Leftovers of a killed save
# =============================================================================================


@pytest.mark.parametrize("resume", [True, False])
def test_leftovers_of_a_killed_save_are_cleaned_when_the_next_run_starts(run_a, resume):
    # what SIGKILL leaves mid-save (see test_checkpoint.test_sigkill_during_save_keeps_the_previous_checkpoint)
    (run_a / ".tmp-step_000003").mkdir()
    (run_a / ".tmp-step_000003" / ckpt.WEIGHTS).write_bytes(b"")
    (run_a / ".latest.tmp").write_text("step_000003\n")
    os.symlink("step_000003", run_a / ".best.tmp")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        trainer = Trainer(model(), config(run_a, max_steps=3, resume=resume, overwrite=not resume), BATCHES)
    assert trainer.step == (2 if resume else 0)
    assert [str(w.message) for w in said] == (["resume: applying train.max_steps: 2 -> 3"] if resume else [])
    left = sorted(p.name for p in run_a.iterdir() if p.name.startswith((".tmp", ".latest", ".best")))
    assert left == []


# =============================================================================================
# A bad out_dir, a failing write
# =============================================================================================


def test_out_dir_that_is_a_file_or_under_one_is_refused_before_training(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ckpt.RunDirError, match=f"TrainConfig.out_dir: {tmp_path / 'file'} is a file, not a directory"):
        Trainer(model(), config(tmp_path / "file"), BATCHES)
    with pytest.raises(ckpt.RunDirError, match=f"TrainConfig.out_dir: {tmp_path / 'file' / 'run'} is under "
                                               f"{tmp_path / 'file'}, which is a file"):
        Trainer(model(), config(tmp_path / "file" / "run"), BATCHES)
    assert (tmp_path / "file").read_text() == "not a directory"


def test_read_only_out_dir_is_refused_before_training(run_a, monkeypatch):
    """Tests run as root, for whom chmod does not make a directory read-only: the filesystem's
    refusal is simulated where files are opened for writing, os.open."""
    before = snapshot(run_a)
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(run_a)) and args[0] & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    expected = rf"TrainConfig.out_dir: cannot write into {run_a} \(Read-only file system\)"
    with pytest.raises(ckpt.RunDirError, match=expected):
        Trainer(model(), config(run_a, max_steps=3, resume=True), BATCHES)
    monkeypatch.undo()
    assert snapshot(run_a) == before


def check_failed_save(out: Path, err: ckpt.RunDirError, code: int, first) -> None:
    message = str(err)
    assert isinstance(err, OSError) and err.errno == code and "\n" not in message
    assert message.startswith(f"checkpoint: could not write {out / 'step_000002'} ([Errno {code}] {os.strerror(code)}")
    assert message.endswith(f"the previous checkpoint {out / 'step_000001'} is intact")
    assert sorted(p.name for p in out.iterdir()) == ["latest", "step_000001"]  # no .tmp-step_000002 left
    loaded, _, _ = ckpt.load_model(out)
    assert all(torch.equal(value, first.state_dict()[name]) for name, value in loaded.state_dict().items())


def test_a_save_that_fills_the_file_size_limit_cleans_up_and_names_the_intact_checkpoint(tmp_path):
    """A real failed write: RLIMIT_FSIZE makes the kernel refuse to grow a file (EFBIG), as a full
    disk refuses with ENOSPC; safetensors and torch.save would report it as their own errors."""
    first = model(seed=0)
    save(tmp_path, 1, first)
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))  # the weights need ~120 KB
    try:
        with pytest.raises(ckpt.RunDirError) as caught:
            save(tmp_path, 2, model(seed=1))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    check_failed_save(tmp_path, caught.value, errno.EFBIG, first)


@pytest.mark.parametrize("code, call", [(errno.ENOSPC, "fsync"), (errno.EROFS, "mkdir")])
def test_a_save_refused_by_the_filesystem_cleans_up_and_names_the_intact_checkpoint(tmp_path, monkeypatch, code, call):
    """A full disk reported when the data is flushed; a filesystem remounted read-only mid-run."""
    first = model(seed=0)
    save(tmp_path, 1, first)
    real = getattr(os, call)

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, call, refuse)
    with pytest.raises(ckpt.RunDirError) as caught:
        save(tmp_path, 2, model(seed=1))
    monkeypatch.setattr(os, call, real)
    check_failed_save(tmp_path, caught.value, code, first)
