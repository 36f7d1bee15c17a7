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


@pytest.fixture(scope="session")
def tiny_gpt_run(tmp_path_factory):
    """(folder, run directory) of a GPT of 2 blocks x 32 wide with 4 heads, pretrained 3 steps by
    `minillm pretrain` on 30 short documents (folder/corpus, shards in folder/prep): a teacher to
    distil, a model to prune, shared by those tests."""
    import contextlib
    import io
    import random

    from minillm import cli

    words = "the a module function returns value list string file path object class method error raises".split()
    root = tmp_path_factory.mktemp("tiny_gpt")
    rng = random.Random(0)
    (root / "corpus").mkdir()
    for d in range(30):
        text = " ".join(" ".join(rng.choice(words) for _ in range(8)).capitalize() + "." for _ in range(10))
        (root / "corpus" / f"doc{d:02d}.txt").write_text(text + "\n")
    out = root / "gpt"
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cli.main(["pretrain", "--model.n_layers=2", "--model.d_model=32", "--model.n_heads=4",
                         "--model.max_seq_len=32", f"--data.inputs={root / 'corpus'}", "--data.vocab_size=320",
                         "--data.seq_len=32", f"--data.prepared_dir={root / 'prep'}", "--data.val_fraction=0.1",
                         "--train.max_steps=3", "--train.warmup_steps=1", "--train.batch_size=4",
                         "--train.eval_batches=2", "--train.progress=false", "--train.device=cpu",
                         f"--train.out_dir={out}"])
    assert code == 0, err.getvalue()
    return root, out
