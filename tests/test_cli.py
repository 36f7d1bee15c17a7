"""The `minillm` command end to end, on a tiny corpus and tiny models (seconds per run).

Each run goes through `minillm.cli.main` exactly as the console script does: configs from
defaults + overrides, data preparation, the Trainer, checkpoint, metrics log and plot, then
generate / evaluate / finetune from what it wrote.
"""

import contextlib
import io
import json
import os
import random

import pytest

from minillm import cli, recipes
from minillm.config_io import load_configs

TINY_MODEL = ["--model.n_layers=1", "--model.d_model=32", "--model.n_heads=2", "--model.max_seq_len=64"]
# fp32: some tests compare runs to each other exactly (torchrun against one process, resumed against
# straight); precision="auto" is bf16 autocast on a CPU with native bf16 (tests/test_trainer.py tests it).
TINY_TRAIN = ["--train.max_steps=4", "--train.warmup_steps=1", "--train.batch_size=4", "--train.eval_every=2",
              "--train.eval_batches=2", "--train.progress=false", "--train.lr=3e-3", "--train.device=cpu",
              "--train.probe_steps=0", "--train.precision=fp32"]

WORDS = ("the a module function returns value list string file path object class method error raises if when "
         "with for each new name data").split()


def run(*argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `minillm *argv`."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A corpus of 40 short documents and a two-class CSV task whose label is a word in the text."""
    root = tmp_path_factory.mktemp("cli")
    rng = random.Random(0)
    (root / "corpus").mkdir()
    for d in range(40):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "."
                     for _ in range(12)]
        (root / "corpus" / f"doc{d:02d}.txt").write_text(" ".join(sentences) + "\n")
    for name, n in (("train", 120), ("dev", 40), ("test", 40)):
        rows = ["text,label"]
        for _ in range(n):
            label = rng.choice(["yes", "no"])
            words = [rng.choice(WORDS) for _ in range(8)] + ["good" if label == "yes" else "bad"]
            rng.shuffle(words)
            rows.append(f"{' '.join(words)},{label}")
        (root / f"{name}.csv").write_text("\n".join(rows) + "\n")
        # (source, target) pairs: the target is the source's words in reverse order
        pairs = [[rng.choice(WORDS) for _ in range(rng.randint(3, 6))] for _ in range(n)]
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": " ".join(p), "target": " ".join(p[::-1])}) + "\n"
                                                    for p in pairs))
    return root


def data_args(work) -> list[str]:
    return [f"--data.inputs={work / 'corpus'}", "--data.vocab_size=320", "--data.seq_len=32",
            f"--data.prepared_dir={work / 'prep'}", "--data.val_fraction=0.1"]


@pytest.fixture(scope="module")
def gpt_run(work):
    out_dir = work / "gpt"
    code, out, err = run("pretrain", *TINY_MODEL, *data_args(work), *TINY_TRAIN, f"--train.out_dir={out_dir}")
    assert code == 0, err
    return out_dir, out


@pytest.fixture(scope="module")
def bert_run(work):
    out_dir = work / "bert"
    code, out, err = run("pretrain", "--model", "bert", *TINY_MODEL, *data_args(work), *TINY_TRAIN,
                         f"--train.out_dir={out_dir}")
    assert code == 0, err
    return out_dir, out


def test_only_rank_zero_prints_under_torchrun(work, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    code, out, err = run("prepare", *data_args(work))
    assert code == 0 and out == "", err
    monkeypatch.setenv("RANK", "0")
    code, out, err = run("prepare", *data_args(work))
    assert code == 0 and "[data]" in out and "tokenizer" in out


def test_pretrain_gpt_writes_checkpoint_metrics_plot_and_config(gpt_run):
    out_dir, out = gpt_run
    checkpoint = out_dir / (out_dir / "latest").read_text().strip()
    for name in ("model.safetensors", "state.pt", "config.json", "tokenizer.model"):
        assert (checkpoint / name).is_file(), name
    saved = json.loads((checkpoint / "config.json").read_text())
    assert saved["task"] == "causal-lm" and saved["model"]["vocab_size"] == 320  # the tokenizer's
    evals = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["kind"] == "eval"] == [2, 4]
    assert (out_dir / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    resolved = load_configs(recipes.SECTIONS, out_dir / "config.toml")
    assert resolved["model"].n_layers == 1 and resolved["train"].max_steps == 4
    assert "[model]" in out and "n_layers = 1" in out  # the printed resolved config
    assert "unigram-entropy baseline" in out and "validation loss" in out and "samples:" in out


def test_generate_continues_the_prompt(gpt_run):
    out_dir, _ = gpt_run
    code, out, err = run("generate", "--checkpoint", out_dir, "--prompt", "The module", "--prompt", "If",
                         "--max-new-tokens", 6, "--greedy")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("The module") and lines[1].startswith("If")


def test_evaluate_a_pretrained_checkpoint(gpt_run):
    out_dir, out = gpt_run
    code, out, err = run("evaluate", "--checkpoint", out_dir, "--max-batches", 2)
    assert code == 0, err
    assert "(causal-lm)" in out and "val_loss" in out and "token_accuracy" in out


def test_pretrain_bert_reports_mlm_and_nsp(bert_run):
    out_dir, out = bert_run
    assert "MLM accuracy" in out and "NSP accuracy" in out and "MLM predictions:" in out
    saved = json.loads((out_dir / (out_dir / "latest").read_text().strip() / "config.json").read_text())
    assert saved["task"] == "mlm-nsp" and saved["model"]["arch"] == "encoder"
    code, out, err = run("generate", "--checkpoint", out_dir, "--prompt", "Return the [MASK] of a file.")
    assert code == 0, err
    assert out.startswith("Return the [") and out.rstrip().endswith("] of a file.")


def test_mask_filling_encodes_the_prompt_as_training_text_without_stray_spaces(bert_run):
    import torch

    from minillm import recipes
    from minillm.model import ModelOutput
    from minillm.tokenizer import Tokenizer

    out_dir, _ = bert_run
    tok = Tokenizer.load(out_dir / (out_dir / "latest").read_text().strip() / "tokenizer.model")
    seen = []

    def spy(ids):  # a model that records its input and predicts nothing in particular
        seen.append(ids[0].tolist())
        return ModelOutput(logits=torch.zeros(1, ids.shape[1], tok.vocab_size))

    from minillm.generation import _fill_masks

    _fill_masks(spy, tok, "Return the [MASK] of a file.", "cpu")
    expected = [tok.require("cls"), *tok.encode("Return the"), tok.require("mask"), *tok.encode("of a file."),
                tok.require("sep")]
    assert seen == [expected]  # no lone "▁" before the mask or after it


def test_finetune_from_bert_on_a_csv_and_evaluate(work, bert_run):
    out_dir = work / "clf"
    code, out, err = run("finetune", f"--train.init_from={bert_run[0]}", f"--data.train_file={work / 'train.csv'}",
                         f"--data.validation_file={work / 'dev.csv'}", "--data.seq_len=32", *TINY_TRAIN,
                         "--train.max_steps=6", f"--train.out_dir={out_dir}")
    assert code == 0, err
    assert f"start: checkpoint {bert_run[0]}" in out and "majority-class baseline" in out
    # no test file: the figure is the validation split's, which also chose the best checkpoint, and says so
    assert "validation accuracy" in out and "no data.test_file" in out and "test accuracy" not in out
    assert (out_dir / "best" / "model.safetensors").is_file()
    code, out, err = run("evaluate", "--checkpoint", out_dir / "best")
    assert code == 0, err
    assert "(classification)" in out and "accuracy" in out


def test_finetune_probes_the_head_first_then_fine_tunes_from_it(work, bert_run):
    """LP-FT: during the probe only the head moves; the fine-tune starts from the probed model."""
    import torch

    from minillm import checkpoint
    from minillm.lora import head_parameters

    out_dir = work / "lpft"
    task = [f"--data.train_file={work / 'train.csv'}", f"--data.validation_file={work / 'dev.csv'}", "--data.seq_len=32"]
    # lr 1e-30: the fine-tune itself moves nothing, so its weights are where it started
    code, out, err = run("finetune", f"--train.init_from={bert_run[0]}", *task, *TINY_TRAIN, "--train.lr=1e-30",
                         "--train.probe_steps=5", "--train.probe_lr=1e-2", f"--train.out_dir={out_dir}")
    assert code == 0, err
    # the same run without the probe: the pretrained body and the seed's fresh head
    code, no_probe_out, err = run("finetune", f"--train.init_from={bert_run[0]}", *task, *TINY_TRAIN,
                                  "--train.lr=1e-30", f"--train.out_dir={work / 'no-probe'}")
    assert code == 0, err
    assert "probe:" not in no_probe_out and not (work / "no-probe" / "probe").exists()
    start = checkpoint.read_weights(work / "no-probe")
    probed = checkpoint.read_weights(out_dir / "probe")
    finetuned = checkpoint.read_weights(out_dir)
    model, _, _ = checkpoint.load_model(out_dir)
    head = {name for name, p in model.named_parameters() if any(p is q for q in head_parameters(model))}
    assert f"probe: the head alone ({sum(probed[n].numel() for n in head):,} parameters) trained 5 steps" in out
    body = [name for name in probed if name not in head]
    assert body and all(torch.equal(probed[n], start[n]) for n in body)  # frozen: bit for bit
    assert all(not torch.equal(probed[n], start[n]) for n in head)  # the probe trained the head
    assert all(torch.equal(finetuned[n], probed[n]) for n in probed)  # the fine-tune started from the probe

    # a taken out_dir is refused before the probe runs again
    code, out, err = run("finetune", f"--train.init_from={bert_run[0]}", *task, *TINY_TRAIN,
                         "--train.probe_steps=5", f"--train.out_dir={out_dir}")
    assert code == 2 and "already holds a run" in err and "probe:" not in out
    # from scratch there is nothing to probe: asking for a probe is refused, not skipped in silence
    tokenizer = bert_run[0] / (bert_run[0] / "latest").read_text().strip() / "tokenizer.model"
    code, out, err = run("finetune", "--train.init_from=none", *TINY_MODEL, f"--data.tokenizer={tokenizer}", *task,
                         *TINY_TRAIN, "--train.probe_steps=5", f"--train.out_dir={work / 'lpft-scratch'}")
    one_line_error(code, err, "train.probe_steps (set by --train.probe_steps) would have no effect", "init_from is none")
    assert not (work / "lpft-scratch").exists()


def test_finetune_with_a_probe_under_torchrun_matches_one_process(work, bert_run, free_port):
    """Two gloo processes with batch 2 each fine-tune (probe, then full) to the weights one process
    gets with batch 4; only rank 0 reports."""
    import subprocess
    import sys
    from pathlib import Path

    import torch

    from minillm import checkpoint

    # eps=1e-6: with Adam's usual 1e-8, an element whose gradient is near eps moves by lr * g / (|g| + eps),
    # which turns the rounding of a sum over 2 ranks instead of 1 batch into weight differences just
    # above the tolerance for some pretrained checkpoints (1.4x of it, seen); with 1e-6 they stay under 6%.
    task = [f"--train.init_from={bert_run[0]}", f"--data.train_file={work / 'train.csv'}",
            f"--data.validation_file={work / 'dev.csv'}", "--data.seq_len=32", *TINY_TRAIN, "--train.probe_steps=3",
            "--train.eps=1e-6"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port}",
         "-m", "minillm.cli", "finetune", *task, "--train.batch_size=2", f"--train.out_dir={work / 'ddp-lpft'}"],
        env=env, capture_output=True, text=True, timeout=240, cwd=work,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("probe: the head alone") == 1 and result.stdout.count("validation accuracy") == 1
    code, out, err = run("finetune", *task, "--train.batch_size=4", f"--train.out_dir={work / 'one-lpft'}")
    assert code == 0, err
    for stage in ("probe", ""):
        two, one = checkpoint.read_weights(work / "ddp-lpft" / stage), checkpoint.read_weights(work / "one-lpft" / stage)
        assert two.keys() == one.keys()
        for name in one:
            if not name.endswith("k_proj.bias"):  # see tests/test_trainer.py: a zero gradient up to rounding
                torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=f"{stage or 'final'}: {name}")


def test_pretraining_gain_benchmark_pairs_each_seed_across_the_arms(work, bert_run, tmp_path, monkeypatch):
    """benchmarks/finetune.py: every seed and budget from the checkpoint and from scratch, paired."""
    import importlib
    from pathlib import Path

    # importable by name, as the worker processes (spawned) import it to find their function
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bench = importlib.import_module("finetune")
    task = [f"--data.train_file={work / 'train.csv'}", f"--data.validation_file={work / 'dev.csv'}", "--data.seq_len=32"]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        summary = bench.main(["--init", str(bert_run[0]), "--seeds", "0", "1", "--train-examples", "40", "0",
                              "--jobs", "1", "--results", str(tmp_path), *task, *TINY_TRAIN])
    assert "gain" in out.getvalue() and (tmp_path / "finetune_cpu.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "finetune_cpu.json").read_text())["rows"] == summary["rows"]
    runs = summary["runs"]
    assert len(runs) == 8 and {(r["arm"], r["seed"], r["train_examples"]) for r in runs} == {
        (arm, seed, n) for arm in ("pretrained", "scratch") for seed in (0, 1) for n in (40, 0)}
    assert all(("scratch" in r["start"]) == (r["arm"] == "scratch") for r in runs)
    assert [row["n_train"] for row in summary["rows"]] == [40, 120]  # the budget, then all of train.csv
    for row in summary["rows"]:
        by = {(r["arm"], r["seed"]): r["metrics"]["mcc"] for r in runs if r["train_examples"] == row["train_examples"]}
        assert row["gain_mcc"] == [by["pretrained", s] - by["scratch", s] for s in (0, 1)]
        assert row["gain_mcc_mean"] == pytest.approx(sum(row["gain_mcc"]) / 2)
        printed = [line.split() for line in out.getvalue().splitlines() if line.split()[:1] == [str(row["n_train"])]]
        assert printed == [[str(row["n_train"]), f"{row['pretrained_accuracy_mean']:.1%}",
                            f"{row['scratch_accuracy_mean']:.1%}", f"{100 * row['gain_accuracy_mean']:+.1f}", "pt",
                            f"{row['gain_accuracy_positive']}/2", f"{row['pretrained_mcc_mean']:.3f}",
                            f"{row['scratch_mcc_mean']:.3f}", f"{row['gain_mcc_mean']:+.3f}",
                            f"{row['gain_mcc_positive']}/2", f"{row['majority_baseline']:.1%}"]]


def _live_processes() -> dict[int, int]:
    """{pid: parent pid} of every process that has not ended (zombies count as ended), from Linux's /proc."""
    from pathlib import Path

    live = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]  # after "pid (comm)"
        except (OSError, ValueError):
            continue  # ended while we read
        if state != "Z":
            live[int(stat.parent.name)] = int(ppid)
    return live


def _running_children(pid: int) -> list[int]:
    return [child for child, parent in _live_processes().items() if parent == pid]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the process table from /proc (Linux)")
def test_pretraining_gain_benchmark_stops_its_runs_on_sigterm(work, bert_run, tmp_path):
    """`kill` or `timeout` on the benchmark stops the fine-tuning runs too, at once: none left orphaned."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "finetune.py"
    bench = subprocess.Popen(
        [sys.executable, str(script), "--init", str(bert_run[0]), "--seeds", "0", "--jobs", "1",
         "--results", str(tmp_path), f"--data.train_file={work / 'train.csv'}",
         f"--data.validation_file={work / 'dev.csv'}", "--data.seq_len=32", *TINY_TRAIN,
         "--train.max_steps=1000000", "--train.max_minutes=10"],  # far longer than the test waits
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "stderr.txt").open("w"))
    workers = []
    try:
        deadline = time.monotonic() + 120
        while len(_running_children(bench.pid)) < 2 and bench.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # the resource tracker, then the spawned run
        workers = _running_children(bench.pid)
        assert bench.poll() is None and len(workers) >= 2, f"no worker started: {(tmp_path / 'stderr.txt').read_text()[-2000:]}"
        time.sleep(1)
        bench.send_signal(signal.SIGTERM)
        bench.wait(timeout=60)
        deadline = time.monotonic() + 30
        alive = workers
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            live = _live_processes()
            alive = [pid for pid in workers if pid in live]
        assert alive == [], f"runs still going after the benchmark was stopped: {alive}"
        assert bench.returncode == 128 + signal.SIGTERM  # SystemExit(143), as a shell reports SIGTERM
    finally:
        if bench.poll() is None:
            bench.kill()
        for pid in workers:  # a failing run of this test must not leave runs going
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_the_seed_decides_the_initial_weights(work, bert_run):
    """--train.seed seeds the model's initialisation, not only the data order and dropout."""
    import torch

    from minillm import checkpoint

    tokenizer = bert_run[0] / (bert_run[0] / "latest").read_text().strip() / "tokenizer.model"
    weights = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        code, out, err = run("finetune", "--train.init_from=none", *TINY_MODEL, f"--data.tokenizer={tokenizer}",
                             f"--data.train_file={work / 'train.csv'}", f"--data.validation_file={work / 'dev.csv'}",
                             "--data.seq_len=32", *TINY_TRAIN, "--train.max_steps=1", "--train.lr=1e-30",
                             f"--train.seed={seed}", f"--train.out_dir={work / ('seed-' + name)}")
        assert code == 0, err
        weights[name] = checkpoint.read_weights(work / f"seed-{name}")
    assert all(torch.equal(weights["a"][n], weights["b"][n]) for n in weights["a"])
    matrices = [n for n, w in weights["a"].items() if w.dim() == 2]
    assert all(not torch.equal(weights["a"][n], weights["c"][n]) for n in matrices)


def test_finetune_from_scratch_says_so(work, bert_run, monkeypatch):
    monkeypatch.chdir(work)  # no runs/pretrain-bert here
    tokenizer = bert_run[0] / (bert_run[0] / "latest").read_text().strip() / "tokenizer.model"
    code, out, err = run("finetune", *TINY_MODEL, f"--data.tokenizer={tokenizer}",
                         f"--data.train_file={work / 'train.csv'}", f"--data.validation_file={work / 'dev.csv'}",
                         "--data.seq_len=32", *TINY_TRAIN, f"--train.out_dir={work / 'scratch'}")
    assert code == 0, err
    assert "training from scratch" in out and "start: scratch" in out


def test_pretrain_seq2seq_and_generate(work):
    out_dir = work / "t5"
    code, out, err = run("pretrain", "--model", "seq2seq", *TINY_MODEL, *data_args(work), *TINY_TRAIN,
                         "--train.max_steps=2", f"--train.out_dir={out_dir}")
    assert code == 0, err
    code, out, err = run("generate", "--checkpoint", out_dir, "--prompt", "The module", "--max-new-tokens", 4)
    assert code == 0, err


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("minillm: error: "), err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("argv, needles", [
    (["pretrain", "--train.lrr=1"], ["--train.lrr", "unknown key", "did you mean 'lr'"]),
    (["pretrain", "--model.n_heads=3"], ["ModelConfig.n_heads", "does not divide"]),
    (["pretrain", "--data.val_fraction=lots"], ["--data.val_fraction", "cannot parse 'lots' as float"]),
    (["finetune", "--train.early_stopping_metric=bleu"], ["TrainConfig.early_stopping_metric"]),
    (["pretrain", "--config", "missing.toml"], ["config 'missing.toml' is neither a file nor a shipped config"]),
    (["generate", "--checkpoint", "runs/missing", "--prompt", "x"], ["runs/missing"]),
    (["evaluate", "--checkpoint", "runs/missing"], ["runs/missing"]),
    (["generate", "--checkpoint", "runs/x", "--prompt", "x", "--train.lr=1"], ["generate takes no"]),
])
def test_user_errors_are_one_line_and_exit_2(argv, needles, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(*run(*argv)[::2], *needles)


def test_missing_init_checkpoint_and_occupied_out_dir(work, gpt_run, monkeypatch):
    monkeypatch.chdir(work)
    code, _, err = run("finetune", "--train.init_from=runs/nothing-here", "--train.max_steps=1",
                       "--train.warmup_steps=0")
    one_line_error(code, err, "TrainConfig.init_from", "runs/nothing-here")
    saved = (gpt_run[0] / "config.toml").read_text()
    code, _, err = run("pretrain", *TINY_MODEL, *data_args(work), *TINY_TRAIN, "--train.seed=5",
                       f"--train.out_dir={gpt_run[0]}")
    one_line_error(code, err, "already holds a run", "resume")
    assert (gpt_run[0] / "config.toml").read_text() == saved  # the earlier run's config is kept


def test_help_lists_the_commands():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    for command in cli.COMMANDS:
        assert command in out.getvalue()


def test_bench_runs_the_script_with_its_arguments(tmp_path, monkeypatch, capfd):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "data.py").write_text("import sys; print('ARGS', sys.argv[1:])\n")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "data", "--sizes", "1,2", "--train.x=1"]) == 0
    assert "ARGS ['--sizes', '1,2', '--train.x=1']" in capfd.readouterr().out
    code, _, err = run("bench", "train")
    one_line_error(code, err, "benchmarks/train.py not found")


# =============================================================================================
# One road: the config that ran is the config saved; resume, evaluate, conflicts, the new tasks
# =============================================================================================


def test_the_saved_config_toml_is_the_checkpoints_config(gpt_run):
    """config.toml holds what ran: the model's vocab_size is the tokenizer's (320), as in the
    checkpoint, not the preset's 4096 that the command line started from."""
    import tomllib

    out_dir, _ = gpt_run
    toml = tomllib.loads((out_dir / "config.toml").read_text())
    saved = json.loads((out_dir / (out_dir / "latest").read_text().strip() / "config.json").read_text())
    for section in ("model", "data", "train"):
        as_saved = {k: None if v == "none" else v for k, v in toml[section].items()}
        assert as_saved == saved[section], section
    assert toml["model"]["vocab_size"] == 320


def test_resume_starts_from_the_saved_config_and_refuses_changes(work):
    out_dir = work / "resume"
    first = ["pretrain", *TINY_MODEL, *data_args(work), *TINY_TRAIN, "--train.lr=1e-3", "--train.seed=3",
             f"--train.out_dir={out_dir}"]
    code, _, err = run(*first)
    assert code == 0, err
    # flags left off fall back to the run's own values, not to the defaults: a plain resume works
    code, out, err = run("pretrain", "--train.resume=true", f"--train.out_dir={out_dir}", "--train.max_steps=6")
    assert code == 0, err
    assert "resume: applying train.max_steps: 4 -> 6" in err  # harmless: applied and said
    saved = json.loads((out_dir / "step_000006" / "config.json").read_text())
    assert saved["train"]["lr"] == 1e-3 and saved["train"]["seed"] == 3 and saved["model"]["n_layers"] == 1
    # a change that alters the run is refused, with each difference listed
    code, _, err = run("pretrain", "--train.resume=true", f"--train.out_dir={out_dir}", "--train.max_steps=8",
                       "--train.lr=5e-3", "--data.seq_len=16")
    one_line_error(code, err, "train.lr: 0.001 -> 0.005", "data.seq_len: 32 -> 16", "resume_changes=allow")
    assert (out_dir / "latest").read_text().strip() == "step_000006"  # nothing trained
    code, _, err = run("pretrain", "--train.resume=true", f"--train.out_dir={out_dir}", "--train.max_steps=8",
                       "--train.lr=5e-3", "--train.resume_changes=allow")
    assert code == 0, err
    assert "train.lr: 0.001 -> 0.005" in err
    assert json.loads((out_dir / "step_000008" / "config.json").read_text())["train"]["lr"] == 5e-3


def test_evaluate_puts_data_overrides_on_top_of_the_saved_data(gpt_run, work, monkeypatch):
    monkeypatch.chdir(work)
    out_dir, _ = gpt_run
    code, plain, err = run("evaluate", "--checkpoint", out_dir)
    assert code == 0, err
    code, same, err = run("evaluate", "--checkpoint", out_dir, "--data.seq_len=32")  # the saved value
    assert code == 0, err
    assert same == plain and not (work / "data").exists()  # same figures; nothing written to ./data/prepared
    code, other, err = run("evaluate", "--checkpoint", out_dir, "--data.seq_len=16")
    assert code == 0 and other != plain, err
    code, _, err = run("evaluate", "--checkpoint", out_dir, "--data.mlm_probability=0.3")
    one_line_error(code, err, "data.mlm_probability", "task 'causal-lm' does not read it")
    code, _, err = run("evaluate", "--checkpoint", out_dir, "--data.tokenizer=other.model")
    one_line_error(code, err, "data.tokenizer", "the tokenizer comes from the checkpoint")
    code, _, err = run("evaluate", "--checkpoint", out_dir, "--max-batches", "-1")
    one_line_error(code, err, "minillm evaluate: argument --max-batches: expected an integer >= 0, got '-1'")


def test_finetune_a_gpt_classifier_from_a_pretrained_gpt_and_from_scratch(work, gpt_run):
    """A GPT body has no segment embeddings: it trains and evaluates on batches without segment ids."""
    task = [f"--data.train_file={work / 'train.csv'}", f"--data.validation_file={work / 'dev.csv'}", "--data.seq_len=32"]
    code, out, err = run("finetune", "--model", "gpt", f"--train.init_from={gpt_run[0]}", *task, *TINY_TRAIN,
                         f"--train.out_dir={work / 'gpt-clf'}")
    assert code == 0, err
    assert "model: SequenceClassifier (decoder)" in out and "validation accuracy" in out and "majority-class" in out
    code, out, err = run("evaluate", "--checkpoint", work / "gpt-clf")
    assert code == 0 and "(classification), validation split" in out, err
    # from scratch, with a test file: the report is the test split's, and evaluate reads it too
    tokenizer = gpt_run[0] / (gpt_run[0] / "latest").read_text().strip() / "tokenizer.model"
    code, out, err = run("finetune", "--model", "gpt", "--train.init_from=none", *TINY_MODEL,
                         f"--data.tokenizer={tokenizer}", *task, f"--data.test_file={work / 'test.csv'}", *TINY_TRAIN,
                         f"--train.out_dir={work / 'gpt-scratch'}")
    assert code == 0, err
    assert "start: scratch" in out and "test accuracy" in out and "no data.test_file" not in out
    code, out, err = run("evaluate", "--checkpoint", work / "gpt-scratch")
    assert code == 0 and "(classification), test split" in out, err


def test_finetune_seq2seq_on_pairs_reports_bleu_and_chrf_against_copying(work):
    pairs = [f"--data.train_file={work / 'train.jsonl'}", f"--data.validation_file={work / 'dev.jsonl'}",
             f"--data.test_file={work / 'test.jsonl'}"]
    code, out, err = run("finetune", "--model", "seq2seq", *TINY_MODEL, *data_args(work), *pairs, *TINY_TRAIN,
                         f"--train.out_dir={work / 'pairs'}")
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("test BLEU"))
    assert "chrF" in line and "vs copying the source: BLEU" in line
    assert "(reference" in out  # examples: source -> output (reference)
    code, out, err = run("evaluate", "--checkpoint", work / "pairs")
    assert code == 0 and "(seq2seq), test split" in out, err
    # pretraining reads the corpus, not pairs: a pairs file there would be ignored, so it is refused
    code, _, err = run("pretrain", "--model", "seq2seq", *TINY_MODEL, *data_args(work), *pairs[:1], *TINY_TRAIN,
                       f"--train.out_dir={work / 'not-pairs'}")
    one_line_error(code, err, "data.train_file (set by --data.train_file) would have no effect",
                   "task 'span-corruption' does not read it")


def test_generate_separates_an_encoder_decoders_output_and_says_when_the_window_slid(work, gpt_run):
    code, out, err = run("generate", "--checkpoint", gpt_run[0], "--prompt", " ".join(["the module"] * 40),
                         "--max-new-tokens", 40, "--greedy")
    assert code == 0, err
    assert "note: window slid" in err or "note: prompt cropped" in err


@pytest.mark.parametrize("argv, needles", [
    (["pretrain", "--model", "bert", "--config", "tiny-gpt-cpu"],
     ["--model bert", "a model of arch 'encoder'", "tiny-gpt-cpu.toml sets train.task = 'causal-lm'"]),
    (["finetune", "--model", "seq2seq", "--train.task=classification"], ["--model seq2seq", "'encoder-decoder'"]),
    (["pretrain", "--model", "gpt", "--model.preset=tiny-bert"], ["--model gpt", "arch 'decoder'", "'encoder'"]),
    (["pretrain", "--data.objective=seq2seq"], ["--data.objective", "unknown key in [data]"]),
    (["pretrain", "--data.mlm_probability=0.3"], ["data.mlm_probability (set by --data.mlm_probability)",
                                                  "task 'causal-lm' does not read it"]),
    (["pretrain", "--train.lora_rank=4"], ["train.lora_rank", "finetune_mode is not 'lora'"]),
    (["pretrain", "--model.vocab_size=100"], ["model.vocab_size", "the tokenizer's"]),
    (["finetune", "--train.init_from=none", "--train.probe_steps=10"], ["train.probe_steps", "init_from is none"]),
    (["pretrain", "--train.task=classification"], ["TrainConfig.task", "use finetune()"]),
])
def test_conflicting_or_ignored_settings_are_refused(argv, needles, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    quick = ["--data.prepared_dir=prep", "--train.max_steps=1", "--train.warmup_steps=0", "--train.progress=false"]
    code, _, err = run(*argv, *quick)  # quick, should any of them run
    one_line_error(code, err, *needles)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_out_dir_that_cannot_hold_a_run_is_one_line(work, where, tmp_path):
    (tmp_path / "taken").write_text("not a directory")
    out_dir = tmp_path / "taken" if where == "a file" else tmp_path / "taken" / "run"
    code, _, err = run("pretrain", *TINY_MODEL, *data_args(work), *TINY_TRAIN, f"--train.out_dir={out_dir}")
    one_line_error(code, err, "TrainConfig.out_dir", str(tmp_path / "taken"))


def test_a_one_class_training_file_is_refused_before_training(work, bert_run, tmp_path):
    (tmp_path / "one.csv").write_text("text,label\nthe module,yes\na file,yes\n")
    (tmp_path / "dev.csv").write_text("text,label\nthe file,yes\n")  # one class is fine in a held-out file
    code, out, err = run("finetune", f"--train.init_from={bert_run[0]}", f"--data.train_file={tmp_path / 'one.csv'}",
                         f"--data.validation_file={tmp_path / 'dev.csv'}", "--data.seq_len=32", *TINY_TRAIN,
                         f"--train.out_dir={tmp_path / 'run'}")
    one_line_error(code, err, "one.csv", "at least 2 classes")
    assert not (tmp_path / "run").exists()
