"""The run directory: a failing write is one clear error, and cleans up after itself.

Tiny causal LMs (C=32, 2 layers, V=100) on CPU.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
from pathlib import Path

import pytest
import torch

from minillm import checkpoint as ckpt
from minillm.config import ModelConfig
from minillm.model import build_model
from minillm.trainer import seed_everything


def model(seed: int = 0):
    seed_everything(seed)
    return build_model(ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=2, max_seq_len=16), "causal-lm")


def save(out: Path, step: int, net) -> Path:
    return ckpt.save_checkpoint(out, step, net, {"step": step}, {"task": "causal-lm", "model": net.config})


# =============================================================================================
# A failing write
# =============================================================================================


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
