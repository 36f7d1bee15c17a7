"""Typed run configs from TOML files and dotted command-line overrides.

A run is described by a few dataclasses, one per TOML section::

    [model]                 # ModelConfig; `preset` picks a named preset, other keys replace fields
    preset = "tiny"
    n_layers = 6

    [data]                  # DataConfig
    inputs = ["default"]

    [train]                 # TrainConfig
    lr = 3e-4

The command line adds ``--section.field=value`` (or ``--section.field value``). A value from the
command line is text; it is parsed by the field's annotation:

=================  ==================================================================
annotation         accepted text
=================  ==================================================================
``int``            ``12``, ``-1``
``float``          ``3e-4``, ``0.1``, ``1``
``bool``           ``true``/``false`` (also ``1``/``0``, ``yes``/``no``, ``on``/``off``)
``str``            anything
``X | None``       ``none`` (or ``null``) for None, otherwise as ``X``
``list[X]``        comma-separated items: ``--data.inputs=a.txt,b.txt``
=================  ==================================================================

TOML has no null, so a field set to None is written (and may be read) as the string ``"none"``.
Configs are written by tomli-w (:func:`to_toml`), read by the standard library's tomllib.

Config files ship with the package (``minillm/configs/NAME.toml``, listed by ``minillm configs``):
``--config NAME`` reads the shipped one when no file of that name exists, and a path names any
other file. The first line of a shipped config is a comment that describes it in one line.

Layers apply in order: built-in defaults of the command, then the TOML file, then the command
line. An unknown section or key is a ``ValueError`` naming it and listing the valid ones; a bad
value is the dataclass's own validation error (which names the field). Nothing is executed.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from pathlib import Path

import tomli_w

from minillm.config import ModelConfig, check_field_types, preset

NONE_WORDS = ("none", "null")
TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")
PRESET_KEY = "preset"  # [model] only: start from this named preset, then apply the other keys
SHIPPED_DIR = Path(__file__).parent / "configs"  # installed with the package (package data)

Layer = dict[str, dict[str, typing.Any]]  # {section: {field: value}}


# --------------------------------------------------------------------------- reading


def shipped_configs() -> dict[str, Path]:
    """{name: path} of the configs that ship with minillm, sorted by name."""
    return {path.stem: path for path in sorted(SHIPPED_DIR.glob("*.toml"))}


def find_config(config: str | Path) -> Path:
    """The TOML file ``config`` names: the file at that path when there is one, else the shipped
    config of that name (``NAME`` or ``NAME.toml``); FileNotFoundError listing the shipped names."""
    path = Path(config)
    if path.is_file():
        return path
    shipped = shipped_configs()
    name = path.name.removesuffix(".toml")
    if path.parent == Path(".") and name in shipped:
        return shipped[name]
    close = difflib.get_close_matches(name, shipped, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise FileNotFoundError(f"config {str(config)!r} is neither a file nor a shipped config{hint}; shipped: "
                            f"{', '.join(shipped)} (`minillm configs` describes them)")


def config_description(path: str | Path) -> str:
    """A config file's one-line description: its first line when that is a comment, else ""."""
    first = Path(path).read_text(encoding="utf-8").partition("\n")[0]
    return first.removeprefix("#").strip() if first.startswith("#") else ""


def load_toml(config: str | Path) -> Layer:
    """The tables of a TOML config file, by path or shipped name (:func:`find_config`); a syntax
    error names the path."""
    path = find_config(config)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML ({err})") from None
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ValueError(f"{path}: top-level key {section!r} must be a [section] table, got {table!r}")
    return data


def parse_overrides(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split ``--section.field=value`` / ``--section.field value`` from the other arguments.

    Returns ({"section.field": "value"}, remaining args). Values stay text until
    :func:`apply_overrides` knows the field's type.
    """
    overrides: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name = arg[2:].split("=", 1)[0]
        if arg.startswith("--") and "." in name:
            if "=" in arg:
                value = arg.split("=", 1)[1]
            elif i + 1 < len(args):
                i += 1
                value = args[i]
            else:
                raise ValueError(f"--{name}: missing value (write --{name}=VALUE)")
            overrides[name] = value
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


def parse_value(text: str, annotation, where: str):
    """Parse command-line ``text`` as a value of type ``annotation``; errors name ``where``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if type(None) in typing.get_args(annotation) and text.strip().lower() in NONE_WORDS:
            return None
        errors = []
        for option in options:
            try:
                return parse_value(text, option, where)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}: cannot parse {text!r} as {_name(annotation)}")
    if origin in (list, tuple):
        (item, *_) = typing.get_args(annotation) or (str,)
        parts = [p.strip() for p in text.split(",")] if text.strip() else []
        return [parse_value(p, item, where) for p in parts]
    try:
        if annotation is bool:
            word = text.strip().lower()
            if word in TRUE_WORDS or word in FALSE_WORDS:
                return word in TRUE_WORDS
            raise ValueError
        if annotation is int:
            return int(text)
        if annotation is float:
            return float(text)
        if annotation is str or annotation is typing.Any:
            return text
    except ValueError:
        raise ValueError(f"{where}: cannot parse {text!r} as {_name(annotation)}") from None
    raise TypeError(f"{where}: fields of type {_name(annotation)} cannot be set from the command line")


def _name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _unknown(where: str, kind: str, name: str, valid) -> ValueError:
    """'<where>: unknown <kind> (did you mean ...?); valid: ...'."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"{where}: unknown {kind}{hint}; valid: {', '.join(valid)}")


def _fields(cls) -> dict[str, typing.Any]:
    """{field name: resolved annotation}; the model section also takes ``preset``."""
    hints = typing.get_type_hints(cls)
    names = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    if cls is ModelConfig:
        names[PRESET_KEY] = str
    return names


def apply_overrides(sections: dict[str, type], layer: Layer, overrides: dict[str, str]) -> Layer:
    """Add parsed ``{"section.field": text}`` overrides on top of ``layer`` (a new dict)."""
    merged = {section: dict(values) for section, values in layer.items()}
    for dotted, text in overrides.items():
        section, _, key = dotted.partition(".")
        if section not in sections:
            raise _unknown(f"--{dotted}", "section", section, sections)
        known = _fields(sections[section])
        if key not in known:
            raise _unknown(f"--{dotted}", f"key in [{section}]", key, known)
        merged.setdefault(section, {})[key] = parse_value(text, known[key], f"--{dotted}")
    return merged


def merge(*layers: Layer) -> Layer:
    """Later layers win, key by key within a section."""
    merged: Layer = {}
    for layer in layers:
        for section, values in layer.items():
            merged.setdefault(section, {}).update(values)
    return merged


# --------------------------------------------------------------------------- building


def _none_strings_to_none(cls, values: dict) -> dict:
    """TOML's stand-in for None: ``"none"`` in a field that may be None."""
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in values.items():
        annotation = hints.get(key)
        may_be_none = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)
        out[key] = None if may_be_none and isinstance(value, str) and value.lower() in NONE_WORDS else value
    return out


def build_config(cls, values: dict, section: str):
    """``cls(**values)`` after checking the keys; the model section may name a preset."""
    known = _fields(cls)
    for key in values:
        if key not in known:
            raise _unknown(f"[{section}] {key}", f"key in [{section}]", key, known)
    values = _none_strings_to_none(cls, values)
    if cls is ModelConfig and PRESET_KEY in values:
        values = dict(values)
        return preset(values.pop(PRESET_KEY), **values)
    _check_types(cls, values)
    return cls(**values)


def _check_types(cls, values: dict) -> None:
    """A wrong type ("abc" for a float) named by field before ``cls`` compares it with numbers."""
    probe = cls.__new__(cls)  # not constructed: only carries the values for check_field_types
    for field in dataclasses.fields(cls):
        has_factory = field.default_factory is not dataclasses.MISSING
        setattr(probe, field.name, values.get(field.name, field.default_factory() if has_factory else field.default))
    check_field_types(probe)


def build_configs(sections: dict[str, type], layer: Layer) -> dict[str, typing.Any]:
    """One validated config object per section (missing sections get their defaults)."""
    for section in layer:
        if section not in sections:
            raise _unknown(f"[{section}]", "section", section, sections)
    return {section: build_config(cls, layer.get(section, {}), section) for section, cls in sections.items()}


def user_layer(sections: dict[str, type], config_file: str | Path | None, overrides: dict[str, str]
               ) -> tuple[Layer, dict[str, str]]:
    """What the user set: the TOML file (a path or a shipped config's name), then the overrides
    (parsed), and where each field came from ({"section.field": the file's path or
    "--section.field"}), so an error can name its source."""
    config_file = find_config(config_file) if config_file else None
    toml = load_toml(config_file) if config_file else {}
    for section, values in toml.items():
        if section not in sections:
            raise _unknown(f"{config_file}: [{section}]", "section", section, sections)
        known = _fields(sections[section])
        for key in values:
            if key not in known:
                raise _unknown(f"{config_file}: [{section}] {key}", f"key in [{section}]", key, known)
    sources = {f"{section}.{key}": str(config_file) for section, values in toml.items() for key in values}
    sources.update({dotted: f"--{dotted}" for dotted in overrides})
    return apply_overrides(sections, toml, overrides), sources


def load_configs(
    sections: dict[str, type],
    config_file: str | Path | None = None,
    overrides: dict[str, str] | None = None,
    defaults: Layer | None = None,
) -> dict[str, typing.Any]:
    """defaults, then the TOML file, then ``{"section.field": text}`` overrides -> config objects."""
    layer = merge(defaults or {}, load_toml(config_file) if config_file else {})
    return build_configs(sections, apply_overrides(sections, layer, overrides or {}))


# --------------------------------------------------------------------------- writing


def _toml_ready(value, where: str):
    """``value`` as tomli-w writes it: None as ``"none"`` (TOML has no null), tuples as lists."""
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return [_toml_ready(item, where) for item in value]
    if isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{where}: cannot write {value!r} ({type(value).__name__}) to TOML")


def is_config(value) -> bool:
    """A config object that :func:`to_toml` writes as a section (a dataclass instance)."""
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def to_toml(configs: dict[str, typing.Any]) -> str:
    """The resolved configs as TOML that :func:`load_configs` reads back to equal objects: one
    ``[section]`` per config, in the order given, fields in the dataclass's order. tomli-w writes
    it, so every string reads back as it was (quotes, backslashes, newlines, control characters
    such as U+007F are escaped); lists are written one item per line."""
    tables = {section: {field.name: _toml_ready(getattr(config, field.name), f"{section}.{field.name}")
                        for field in dataclasses.fields(config)}
              for section, config in configs.items()}
    return tomli_w.dumps(tables)


def save_configs(configs: dict[str, typing.Any], run_dir: str | Path, name: str = "config.toml") -> Path:
    """Write the resolved configs to ``run_dir/name`` (atomically) and return the path."""
    path = Path(run_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(to_toml(configs), encoding="utf-8")
    tmp.replace(path)
    return path
