"""Test-wide setup.

TRITON_INTERPRET must be set before any module defining `@triton.jit` functions is imported:
the decorator decides between compiling and interpreting when it runs. With it set, every
Triton kernel runs on CPU tensors through numpy, so kernels are checked on machines with no GPU.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402  (after TRITON_INTERPRET, before anything imports triton)
import torch  # noqa: E402


@pytest.fixture
def one_thread():
    """Run a test with one intra-op thread: on a small, shared machine, training loops of tiny
    models run several times faster than with threads contending for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def free_port() -> int:
    """A TCP port free on this machine now, for a torchrun rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
