"""The `minillm` command as installed: its version, `python -m minillm`, the configs shipped inside
the package and addressed by name, TOML written by tomli-w, the help texts, and a refused run that
prints its one-line error and nothing else.

Runs go through `minillm.cli.main` as the console script does; `python -m minillm`, the console
script and the wheel build run as subprocesses.
"""

import contextlib
import dataclasses
import importlib.metadata
import io
import random
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import minillm
from minillm import cli, config_io, recipes
from minillm.data import DataConfig
from minillm.train_config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
SHIPPED = ("finetune-bert", "gpt2-124m-gpu", "tiny-bert", "tiny-gpt-cpu")
TINY = ["--model.n_layers=1", "--model.d_model=32", "--model.n_heads=2", "--model.max_seq_len=32",
        "--data.vocab_size=320", "--data.seq_len=32", "--data.val_fraction=0.1", "--train.max_steps=2",
        "--train.warmup_steps=1", "--train.batch_size=4", "--train.eval_every=2", "--train.eval_batches=1",
        "--train.progress=false", "--train.device=cpu"]
# Every kind of character a hand-written TOML string gets wrong: DEL (U+007F, which TOML allows
# only escaped), quotes, backslashes, a newline, a tab, non-ASCII and a character outside the BMP.
AWKWARD = 'del\x7f "quoted" \\back\\slash\\ new\nline\ttab é中 \U0001f600'


def run(*argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `minillm *argv`."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def help_text(*argv) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    assert info.value.code == 0
    return out.getvalue()


def refused_with_one_line(code: int, out: str, err: str, *needles: str) -> None:
    """Exit status 2, nothing on stdout (no config dump), one line on stderr naming the problem."""
    assert code == 2, (out, err)
    assert out == "", out
    assert len(err.splitlines()) == 1 and err.startswith("minillm: error: "), err
    for needle in needles:
        assert needle in err, err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Twenty short documents: enough for a 320-piece tokenizer and a two-step run."""
    root = tmp_path_factory.mktemp("packaging")
    rng = random.Random(0)
    words = "the a module function returns value list string file path object class method error".split()
    (root / "corpus").mkdir()
    for d in range(20):
        text = " ".join(" ".join(rng.choice(words) for _ in range(10)).capitalize() + "." for _ in range(10))
        (root / "corpus" / f"doc{d:02d}.txt").write_text(text + "\n")
    return root


@pytest.fixture(scope="module")
def awkward_run(corpus) -> tuple[Path, list[str]]:
    """A finished two-step run whose out_dir and prepared_dir hold awkward characters."""
    out_dir = corpus / f"run {AWKWARD.replace(chr(10), ' ').replace(chr(9), ' ')}"
    argv = ["pretrain", *TINY, f"--data.inputs={corpus / 'corpus'}", f"--data.prepared_dir={corpus / 'prep'}",
            f"--train.out_dir={out_dir}"]
    code, out, err = run(*argv)
    assert code == 0, err
    return out_dir, argv


# --------------------------------------------------------------------------- version, python -m


def test_version_is_the_package_version():
    code = io.StringIO()
    with contextlib.redirect_stdout(code), pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert code.getvalue() == f"minillm {minillm.__version__}\n"
    assert importlib.metadata.version("minillm-lab") == minillm.__version__
    # one source: pyproject.toml takes the version from minillm.__version__
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "minillm.__version__"}


def test_python_dash_m_is_the_console_script():
    script = Path(sys.executable).parent / "minillm"
    outcomes = {}
    for argv in (["--version"], ["nonsense"]):
        as_module = subprocess.run([sys.executable, "-m", "minillm", *argv], capture_output=True, text=True)
        as_script = subprocess.run([str(script), *argv], capture_output=True, text=True)
        outcomes[argv[0]] = (as_module.returncode, as_module.stdout, as_module.stderr)
        assert outcomes[argv[0]] == (as_script.returncode, as_script.stdout, as_script.stderr)
    assert outcomes["--version"] == (0, f"minillm {minillm.__version__}\n", "")
    assert outcomes["nonsense"][0] == 2 and "invalid choice: 'nonsense'" in outcomes["nonsense"][2]


# --------------------------------------------------------------------------- TOML written by tomli-w


def test_awkward_strings_round_trip_through_the_written_toml(tmp_path):
    configs = config_io.load_configs(recipes.SECTIONS)
    configs["data"] = dataclasses.replace(configs["data"], inputs=[AWKWARD, "plain", "中文/*.txt"],
                                          text_field=AWKWARD, prepared_dir="C:\\data\\x\x7f", tokenizer='"q".model')
    configs["train"] = dataclasses.replace(configs["train"], out_dir=AWKWARD, init_from="runs/\x7f")
    text = config_io.to_toml(configs)
    assert list(tomllib.loads(text)) == ["model", "data", "train"]  # the sections in their order
    assert tomllib.loads(text)["data"]["text_field"] == AWKWARD
    path = config_io.save_configs(configs, tmp_path / "run")
    assert config_io.load_configs(recipes.SECTIONS, path) == configs


def test_the_saved_config_of_a_run_reads_back(awkward_run):
    out_dir, _ = awkward_run
    saved = tomllib.loads((out_dir / "config.toml").read_text(encoding="utf-8"))
    assert saved["train"]["out_dir"] == str(out_dir) and "\x7f" in saved["train"]["out_dir"]
    again = config_io.load_configs(recipes.SECTIONS, out_dir / "config.toml")
    assert again["train"].out_dir == str(out_dir) and again["model"].n_layers == 1
