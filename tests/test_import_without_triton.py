"""minillm without Triton: the package installs Triton only on Linux, so `import minillm`, the
CLI and a CPU training step must work without it, and asking for a Triton backend must say why
it cannot run. The import checks run in a fresh interpreter, because `triton` may already be
imported into this one (the kernel tests import it)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from minillm import dispatch

# A finder placed first on sys.meta_path: `import triton` and `import triton.<anything>` raise
# ModuleNotFoundError, exactly as on a machine where triton is not installed.
BLOCK_TRITON = """
import importlib.abc
import sys


class _NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoTriton())
for blocked in ("triton", "triton.language"):
    try:
        __import__(blocked)
    except ImportError:
        pass
    else:
        raise AssertionError(f"the test failed to block {blocked}")
"""

# Build a shrunken `tiny` GPT (grouped-query heads, attention dropout on) and take one training
# step's forward and backward with a given attention backend.
TRAIN_STEP = """
import torch
import minillm


def train_step(attn_backend, norm_backend="auto"):
    torch.manual_seed(0)
    config = minillm.preset("tiny", vocab_size=97, d_model=32, n_layers=2, max_seq_len=24, n_kv_heads=2,
                            attn_dropout=0.1, attn_backend=attn_backend, norm_backend=norm_backend)
    model = minillm.build_model(config, "causal-lm").train()
    ids = torch.randint(0, 97, (2, 11))
    out = model(ids, attention_mask=torch.ones_like(ids), labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss), attn_backend
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters()), attn_backend
"""

# Import every minillm module but the kernels, so a new module-level `import triton` anywhere is caught.
IMPORT_ALL = """
import importlib
import pkgutil

for module in pkgutil.walk_packages(minillm.__path__, "minillm."):
    if not module.name.startswith("minillm.kernels"):
        importlib.import_module(module.name)
"""


def _run(code: str, cwd) -> None:
    """Run `code` in a fresh interpreter, from `cwd` so the installed minillm is imported, with
    TRITON_INTERPRET=1 so a CPU tensor is no reason to refuse Triton: a refusal must come from
    the missing package. Fail with the subprocess's output."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                            cwd=cwd)
    assert result.returncode == 0, f"subprocess failed:\n{result.stdout}\n{result.stderr}"


def test_import_and_cpu_training_step_work_without_triton(tmp_path):
    _run(BLOCK_TRITON + TRAIN_STEP + IMPORT_ALL + textwrap.dedent("""
        import contextlib
        import io

        import minillm.cli

        with contextlib.redirect_stdout(io.StringIO()):
            try:
                minillm.cli.main(["--help"])
            except SystemExit as exit:
                assert exit.code == 0, exit.code
        for backend in ("reference", "sdpa", "auto"):
            train_step(backend)
        train_step("reference", norm_backend="torch")
        """), tmp_path)


def test_triton_backends_without_triton_say_it_is_not_installed(tmp_path):
    _run(BLOCK_TRITON + TRAIN_STEP + textwrap.dedent("""
        import pytest

        with pytest.raises(ValueError, match=r"attn_backend='triton' needs Triton, which is not installed.*"
                                             r"attn_backend='auto', 'sdpa' or 'reference'"):
            train_step("triton")
        with pytest.raises(ValueError, match=r"norm_backend='triton' needs Triton, which is not installed.*"
                                             r"norm_backend='auto' or 'torch'"):
            train_step("sdpa", norm_backend="triton")
        """), tmp_path)


def test_cpu_training_step_never_imports_triton(tmp_path):
    """With Triton installed, importing minillm and training on CPU with non-Triton backends
    leaves it unimported: only the `triton` backend loads it."""
    _run(TRAIN_STEP + IMPORT_ALL + textwrap.dedent("""
        import sys

        for backend in ("reference", "sdpa", "auto"):
            train_step(backend)
        loaded = sorted(m for m in sys.modules if m == "triton" or m.startswith(("triton.", "minillm.kernels")))
        assert not loaded, f"imported without being asked for: {loaded}"
        """), tmp_path)


def test_auto_norm_on_cuda_without_triton_uses_torch(monkeypatch):
    """`auto` means best measured: on CUDA without Triton that is torch's norm, silently; with
    Triton, torch too until a committed GPU measurement shows the kernel faster
    (tests/test_dispatch_auto.py checks that rule with hand-made measurements)."""

    class CudaTensor:  # only what the choice reads: device, shape, dtype, requires_grad
        is_cuda = True
        device = torch.device("cuda", 0)
        shape, dtype, requires_grad = torch.Size((8, 4096)), torch.bfloat16, True

    from minillm import measured

    monkeypatch.setattr(measured, "capability", lambda index: "9.0")
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert dispatch._use_triton_norm(CudaTensor(), "auto") is False
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    assert dispatch._use_triton_norm(CudaTensor(), "auto") is False  # no GPU measurement committed
    assert dispatch._use_triton_norm(torch.zeros(2), "auto") is False  # CPU: torch, Triton or not


def test_triton_norm_on_cpu_names_the_norm_backends(monkeypatch):
    """The device refusal suggests backends of the argument's own kind, not attention ones."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(dispatch, "triton_available", lambda: True, raising=False)
    with pytest.raises(ValueError, match=r"norm_backend='triton' needs CUDA.*Use norm_backend='auto' or 'torch' "):
        dispatch.layer_norm(torch.zeros(2, 8), None, None, 1e-5, backend="triton")
