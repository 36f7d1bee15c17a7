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
import shutil
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


# --------------------------------------------------------------------------- shipped configs


def test_the_shipped_configs_are_package_data():
    assert sorted(config_io.shipped_configs()) == list(SHIPPED)
    for name, path in config_io.shipped_configs().items():
        assert path.name == f"{name}.toml" and path.is_file()
        assert Path(minillm.__file__).parent / "configs" / path.name == path
    assert not (REPO / "configs").exists()  # one copy, inside the package


def test_the_wheel_holds_the_shipped_configs(tmp_path):
    """A real build (`pip wheel . --no-deps`, without build isolation: no network here), of a copy
    of what the wheel is built from, so that the build leaves nothing in the checkout."""
    source = tmp_path / "source"
    for folder in ("minillm", "kernels"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("minillm_lab-*.whl")
    assert wheel.name.startswith(f"minillm_lab-{minillm.__version__}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"minillm/configs/{name}.toml" for name in SHIPPED} <= names
    assert {"minillm/__main__.py", "minillm/cli.py", "minillm/kernels/attention.py"} <= names
    metadata = zipfile.ZipFile(wheel).read(f"minillm_lab-{minillm.__version__}.dist-info/METADATA").decode()
    assert "Requires-Dist: tomli-w" in metadata


def test_each_shipped_config_starts_with_its_one_line_description():
    for name, path in config_io.shipped_configs().items():
        first = path.read_text(encoding="utf-8").splitlines()[0]
        description = config_io.config_description(path)
        assert first == f"# {description}" and 20 < len(description) <= 90, (name, first)


def test_a_config_is_found_by_name_or_by_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = config_io.shipped_configs()["tiny-gpt-cpu"]
    assert config_io.find_config("tiny-gpt-cpu") == shipped
    assert config_io.find_config(str(shipped)) == shipped
    (tmp_path / "tiny-gpt-cpu").write_text("[train]\nlr = 0.5\n")  # a file of that name wins: it is a path
    assert config_io.find_config("tiny-gpt-cpu") == Path("tiny-gpt-cpu")
    by_name = recipes.configs("pretrain", None, "tiny-bert", {})[0]
    by_path = recipes.configs("pretrain", None, str(config_io.shipped_configs()["tiny-bert"]), {})[0]
    assert by_name == by_path and by_name["train"].task == "mlm-nsp"


def test_pretrain_takes_a_shipped_config_by_name(tmp_path, monkeypatch):
    """Loaded by name: its task is what conflicts with --model bert (refused before any work)."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run("pretrain", "--config", "tiny-gpt-cpu", "--model", "bert")
    refused_with_one_line(code, out, err, "--model bert", "tiny-gpt-cpu.toml sets train.task = 'causal-lm'")


def test_an_unknown_config_name_lists_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run("pretrain", "--config", "tiny-gtp-cpu")
    refused_with_one_line(code, out, err, "config 'tiny-gtp-cpu' is neither a file nor a shipped config",
                          "did you mean 'tiny-gpt-cpu'?", ", ".join(SHIPPED), "minillm configs")
    assert not (tmp_path / "runs").exists()


def test_the_configs_command_lists_name_command_model_and_description():
    code, out, err = run("configs")
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert sorted(rows) == list(SHIPPED)
    expected = {"tiny-gpt-cpu": ("pretrain --model gpt", "tiny"), "tiny-bert": ("pretrain --model bert", "tiny-bert"),
                "gpt2-124m-gpu": ("pretrain --model gpt", "gpt2-124m"),
                "finetune-bert": ("finetune --model bert", "from runs/pretrain-bert")}
    for name, (command, model) in expected.items():
        description = config_io.config_description(config_io.shipped_configs()[name])
        assert command in rows[name] and model in rows[name] and rows[name].endswith(description), rows[name]
    assert run("configs", "--train.lr=1")[0] == 2


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


# --------------------------------------------------------------------------- help


def test_the_help_names_every_command_and_each_command_has_its_own():
    top = help_text()
    for command in (*cli.COMMANDS, "--version"):
        assert command in top, command
    for command in cli.COMMANDS:
        text = help_text(command)
        assert text.startswith(f"usage: minillm {command}"), text
    for command in ("pretrain", "finetune", "prepare"):
        assert "NAME|FILE.toml" in help_text(command) and "minillm configs" in help_text(command)


def test_every_option_of_every_command_says_what_it_does():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices  # {name: subparser}
    for name, command in {"minillm": parser, **commands}.items():
        for action in command._actions:
            assert action.help, (name, action.option_strings or action.dest)
            takes_a_value = action.option_strings and action.nargs != 0
            if takes_a_value and action.choices is None:  # a short name, not argparse's --max-new-tokens MAX_NEW_TOKENS
                assert action.metavar is not None, (name, action.option_strings)


# --------------------------------------------------------------------------- refused before the config is printed


def test_an_occupied_out_dir_is_refused_before_the_config_is_printed(awkward_run):
    out_dir, argv = awkward_run
    refused_with_one_line(*run(*argv), "already holds a run", "overwrite=true")


@pytest.mark.parametrize("flags, needles", [
    (["--train.precision=fp16"], ["TrainConfig.precision", "'fp16' needs a CUDA device"]),
    (["--train.device=cuda"], ["TrainConfig.device", "no CUDA device"]),
])
def test_a_device_the_run_cannot_use_is_refused_before_the_config_is_printed(corpus, flags, needles, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    code, out, err = run("pretrain", *TINY, f"--data.inputs={corpus / 'corpus'}", f"--data.prepared_dir={corpus / 'prep'}",
                         *flags, f"--train.out_dir={tmp_path / 'run'}")
    refused_with_one_line(code, out, err, *needles)
    assert not (tmp_path / "run").exists()


def test_a_resume_that_changes_the_run_is_refused_before_the_config_is_printed(awkward_run):
    out_dir, _ = awkward_run
    code, out, err = run("pretrain", "--train.resume=true", f"--train.out_dir={out_dir}", "--train.lr=0.5")
    refused_with_one_line(code, out, err, "train.lr", "-> 0.5", "resume_changes=allow")


def test_an_out_dir_under_a_file_is_refused_before_the_config_is_printed(corpus, tmp_path):
    (tmp_path / "taken").write_text("a file")
    code, out, err = run("pretrain", *TINY, f"--data.inputs={corpus / 'corpus'}", f"--data.prepared_dir={corpus / 'prep'}",
                         f"--train.out_dir={tmp_path / 'taken' / 'run'}")
    refused_with_one_line(code, out, err, "TrainConfig.out_dir", "which is a file")


def test_a_refused_finetune_from_scratch_prints_no_note(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").write_text("a file")
    code, out, err = run("finetune", "--train.init_from=none", "--train.probe_steps=0", "--train.out_dir=run")
    refused_with_one_line(code, out, err, "TrainConfig.out_dir", "is a file")


def test_prepare_checks_its_inputs_before_printing_the_config(tmp_path):
    code, out, err = run("prepare", f"--data.inputs={tmp_path / 'missing'}", f"--data.prepared_dir={tmp_path / 'p'}")
    refused_with_one_line(code, out, err, "missing")


def test_resolve_checks_the_run_directory_before_preparing_data(tmp_path):
    (tmp_path / "file").write_text("x")
    data = DataConfig(inputs=[str(tmp_path / "missing")], prepared_dir=str(tmp_path / "p"))
    with pytest.raises(OSError, match="TrainConfig.out_dir"):
        recipes.resolve(minillm.preset("tiny"), data, TrainConfig(out_dir=str(tmp_path / "file")))
