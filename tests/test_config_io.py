"""Typed configs from TOML + dotted overrides (minillm.config_io) and the shipped configs
(minillm/configs/)."""

import pytest

from minillm import config_io
from minillm.recipes import RECIPES, SECTIONS
from minillm.config import ModelConfig
from minillm.data import DataConfig
from minillm.train_config import TrainConfig

CONFIGS = sorted(config_io.shipped_configs().values())


def load(tmp_path, toml: str = "", args: list[str] = (), defaults=None):
    path = None
    if toml:
        path = tmp_path / "run.toml"
        path.write_text(toml)
    overrides, rest = config_io.parse_overrides(list(args))
    assert rest == []
    return config_io.load_configs(SECTIONS, path, overrides, defaults)


def test_overrides_are_parsed_by_the_field_type(tmp_path):
    c = load(tmp_path, args=[
        "--model.n_layers=3", "--model.d_model", "96", "--model.n_kv_heads=none", "--model.tie_embeddings=false",
        "--train.lr=3e-4", "--train.max_minutes=1", "--train.compile=yes", "--train.init_from=runs/x",
        "--data.inputs=a.txt,b/,c*.md", "--data.tokenizer=None",
    ])
    m, d, t = c["model"], c["data"], c["train"]
    assert (m.n_layers, m.d_model, m.n_kv_heads, m.tie_embeddings) == (3, 96, None, False)
    assert t.lr == 3e-4 and isinstance(t.max_minutes, float) and t.max_minutes == 1.0
    assert t.compile is True and t.init_from == "runs/x"
    assert d.inputs == ["a.txt", "b/", "c*.md"] and d.tokenizer is None


def test_layers_defaults_then_toml_then_command_line(tmp_path):
    toml = '[model]\npreset = "tiny-bert"\nn_layers = 2\n\n[train]\nlr = 1\nbatch_size = 8\n'
    defaults = {"model": {"preset": "tiny"}, "train": {"lr": 0.5, "max_steps": 7, "warmup_steps": 0}}
    c = load(tmp_path, toml, ["--train.batch_size=4"], defaults)
    assert c["model"].arch == "encoder" and c["model"].n_layers == 2  # preset from TOML, then its field
    assert c["model"].norm_placement == "post"  # the rest of the tiny-bert preset
    assert c["train"].lr == 1.0 and c["train"].max_steps == 7 and c["train"].batch_size == 4


def defaults_for(command: str, family: str) -> dict:
    return RECIPES[(command, family)].defaults()


@pytest.mark.parametrize("command, family, arch, task", [
    ("pretrain", "gpt", "decoder", "causal-lm"), ("pretrain", "bert", "encoder", "mlm-nsp"),
    ("pretrain", "seq2seq", "encoder-decoder", "span-corruption"), ("finetune", "bert", "encoder", "classification"),
    ("finetune", "gpt", "decoder", "classification"), ("finetune", "seq2seq", "encoder-decoder", "seq2seq"),
])
def test_recipes_choose_preset_and_task(command, family, arch, task):
    c = config_io.build_configs(SECTIONS, defaults_for(command, family))
    assert c["model"].arch == arch and c["train"].task == task
    assert c["train"].out_dir == f"runs/{command}-{family}"


@pytest.mark.parametrize("args, message", [
    (["--model.n_layer=2"], "--model.n_layer: unknown key in [model] (did you mean 'n_layers'?)"),
    (["--trian.lr=1"], "--trian.lr: unknown section (did you mean 'train'?)"),
    (["--train.lr=fast"], "--train.lr: cannot parse 'fast' as float"),
    (["--train.compile=maybe"], "--train.compile: cannot parse 'maybe' as bool"),
    (["--model.n_heads=3"], "ModelConfig.n_heads: got 3, which does not divide d_model=128"),
    (["--train.lr=-1"], "TrainConfig.lr: got -1.0"),
    (["--data.seq_len=4"], "DataConfig.seq_len: got 4"),
    (["--model.preset=huge"], "unknown name 'huge'"),
    (["--train.lr"], "--train.lr: missing value"),
])
def test_bad_overrides_name_the_key(tmp_path, args, message):
    with pytest.raises((ValueError, TypeError)) as info:
        load(tmp_path, args=args, defaults={"model": {"preset": "tiny"}})
    assert message in str(info.value)


@pytest.mark.parametrize("toml, message", [
    ("[modle]\nn_layers = 2\n", "[modle]: unknown section (did you mean 'model'?); valid: data, model, train"),
    ("[train]\nlearning_rate = 1e-3\n", "[train] learning_rate: unknown key in [train]"),
    ('[data]\nval_fraction = "high"\n', "DataConfig.val_fraction: expected float, got 'high'"),
    ("[model]\nn_layers = 2.5\n", "ModelConfig.n_layers: expected int, got 2.5"),
    ("lr = 1\n", "top-level key 'lr' must be a [section] table"),
    ("[train\n", "not valid TOML"),
])
def test_bad_toml_names_the_key(tmp_path, toml, message):
    with pytest.raises((ValueError, TypeError)) as info:
        load(tmp_path, toml)
    assert message in str(info.value)


def test_missing_config_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        config_io.load_configs(SECTIONS, tmp_path / "nope.toml")


def test_resolved_config_round_trips(tmp_path):
    c = load(tmp_path, args=["--model.preset=tiny-seq2seq", "--model.n_kv_heads=2", "--data.inputs=x.txt,y.txt",
                             "--train.max_minutes=2.5", "--train.init_from=runs/a b"])
    path = config_io.save_configs(c, tmp_path / "run")
    assert path == tmp_path / "run" / "config.toml"
    again = config_io.load_configs(SECTIONS, path)
    assert again == c
    assert again["model"].n_decoder_layers is None  # written as "none", read back as None


def test_generic_over_dataclasses(tmp_path):
    path = tmp_path / "d.toml"
    path.write_text('[data]\ninputs = ["a.jsonl"]\ntext_field = "body"\n')
    c = config_io.load_configs({"data": DataConfig}, path, {"data.seq_len": "64"})
    assert c["data"] == DataConfig(inputs=["a.jsonl"], text_field="body", seq_len=64)
    with pytest.raises(ValueError, match="valid: data$"):
        config_io.load_configs({"data": DataConfig}, None, {"train.lr": "1"})


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_configs_load(path):
    c = config_io.load_configs(SECTIONS, path)
    assert isinstance(c["model"], ModelConfig) and isinstance(c["train"], TrainConfig)
    assert c["data"].seq_len <= c["model"].max_seq_len


def test_example_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"tiny-gpt-cpu.toml", "tiny-bert.toml", "gpt2-124m-gpu.toml", "finetune-bert.toml"} <= names


@pytest.mark.parametrize("name, command, kind", [
    ("tiny-gpt-cpu.toml", "pretrain", "gpt"), ("tiny-bert.toml", "pretrain", "bert"), ("finetune-bert.toml", "finetune", "bert"),
])
def test_tiny_configs_are_the_default_commands(name, command, kind):
    """Each example config runs what the command runs: the same values in every field the run reads
    (finetune-bert.toml starts from runs/pretrain-bert, whose checkpoint brings the architecture and
    the tokenizer: it leaves out the architecture and the corpus fields that only serve from scratch)."""
    from minillm.checkpoint import HEAD_FIELDS, RUNTIME_FIELDS
    from minillm.tasks import get_task

    from_file = config_io.load_configs(SECTIONS, [p for p in CONFIGS if p.name == name][0])
    defaults = defaults_for(command, kind)
    defaults["train"]["init_from"] = from_file["train"].init_from  # finetune: runs/pretrain-bert when it exists
    expected = config_io.build_configs(SECTIONS, defaults)
    assert from_file["train"] == expected["train"]
    model_fields = RUNTIME_FIELDS + HEAD_FIELDS if from_file["train"].init_from else [f for f in vars(from_file["model"])]
    assert all(getattr(from_file["model"], f) == getattr(expected["model"], f) for f in model_fields)
    data = from_file["data"]
    for field in get_task(data_task := from_file["train"].task).data_fields_read(data, from_file["train"].init_from is None):
        assert getattr(data, field) == getattr(expected["data"], field), (data_task, field)


@pytest.mark.parametrize("command, family, args, recipe", [
    ("pretrain", None, [], ("pretrain", "gpt")),
    ("pretrain", None, ["--train.task=mlm-nsp"], ("pretrain", "bert")),
    ("pretrain", None, ["--train.task=mlm"], ("pretrain", "bert")),  # BERT's recipe, MLM alone
    ("pretrain", None, ["--model.preset=tiny-seq2seq"], ("pretrain", "seq2seq")),
    ("finetune", None, [], ("finetune", "bert")),
    ("finetune", None, ["--model.preset=tiny"], ("finetune", "gpt")),
    ("finetune", None, ["--train.task=seq2seq"], ("finetune", "seq2seq")),
    ("pretrain", "bert", ["--train.task=mlm"], ("pretrain", "bert")),
])
def test_the_recipe_follows_what_the_config_asks_for(command, family, args, recipe):
    from minillm.recipes import choose_recipe

    overrides, _ = config_io.parse_overrides(args)
    user, sources = config_io.user_layer(SECTIONS, None, overrides)
    assert choose_recipe(command, family, user, sources) is RECIPES[recipe]
