"""Recipes: a YAML file whose keys are fields of the pipeline's dataclasses, plus ``--key value`` overrides.

    python -m pipelines.sft recipes/sft/tiny.yaml --learning_rate 5e-4 --pretrain.max_steps 100

TRL's ``TrlParser`` does the parsing (``--config FILE`` and typed ``--flag`` overrides, as open-r1 uses it). What this
module adds:
  * the recipe may be given as the first positional argument;
  * a key that no dataclass knows is an error naming the file, the line, and the closest known key (TrlParser
    reports it without the file or line);
  * a field holding a mapping of overrides for another dataclass (``pretrain:`` in the SFT recipe) can be set key by
    key from the command line as ``--field.key value``; its keys are checked against that dataclass;
  * it returns the recipe as run (the file's keys with the command-line values applied), which runs save beside
    their outputs and compare when they are continued.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import typing
from pathlib import Path

import yaml
from trl import TrlParser


class RecipeError(ValueError):
    """A recipe or an override that cannot be used; the message says where and what to change."""


def _field_names(dataclass_types) -> dict[str, str]:
    """Init field name -> the dataclass that owns it."""
    owners = {}
    for cls in dataclass_types:
        for f in dataclasses.fields(cls):
            if f.init:
                owners.setdefault(f.name, cls.__name__)
    return owners


def _key_lines(path: Path) -> dict[str, int]:
    """Top-level key -> its 1-based line in the YAML file."""
    node = yaml.compose(path.read_text())
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {key.value: key.start_mark.line + 1 for key, _ in node.value}


def _unknown(where: str, key: str, known, kinds: str) -> RecipeError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return RecipeError(f"{where}: unknown key {key!r}; {hint}keys are the fields of {kinds}")


def check_keys(path: str | Path, dataclass_types, nested: dict[str, type] | None = None) -> dict:
    """The recipe's mapping, after checking that every key is a field of ``dataclass_types`` and that every key of a
    nested override mapping (``nested``: field name -> dataclass) is a field of that dataclass."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file (recipes live under recipes/, e.g. recipes/sft/tiny.yaml)")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping of keys to values")
    owners = _field_names(dataclass_types)
    kinds = ", ".join(cls.__name__ for cls in dataclass_types)
    lines = _key_lines(path)
    for key, value in raw.items():
        where = f"{path}:{lines.get(key, '?')}"
        if key != "env" and key not in owners:
            raise _unknown(where, key, owners, kinds)
        if nested and key in nested and value is not None:
            if not isinstance(value, dict):
                raise RecipeError(f"{where}: {key} must be a mapping of {nested[key].__name__} fields to values")
            inner = _field_names([nested[key]])
            for sub in value:
                if sub not in inner:
                    raise _unknown(f"{where}: {key}", sub, inner, nested[key].__name__)
    return raw


def _split_dotted(argv: list[str], nested: dict[str, type]) -> tuple[list[str], dict[str, dict]]:
    """Pull ``--field.key value`` pairs for nested override fields out of ``argv``."""
    rest, dotted = [], {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        head = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if "." in head and head.split(".", 1)[0] in nested:
            name, key = head.split(".", 1)
            if "=" in arg:
                value = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                i += 1
                value = argv[i]
            else:
                raise RecipeError(f"--{head}: missing value")
            inner = _field_names([nested[name]])
            if key not in inner:
                raise _unknown(f"command line --{head}", key, inner, nested[name].__name__)
            dotted.setdefault(name, {})[key] = yaml.safe_load(value)
        else:
            rest.append(arg)
        i += 1
    return rest, dotted


def parse_recipe(dataclass_types, argv: list[str] | None = None, nested: dict[str, type] | None = None):
    """``(instances..., recipe_path, resolved)`` from ``[RECIPE.yaml | --config RECIPE.yaml] [--key value ...]``.

    ``resolved`` is the recipe as run: the file's mapping with the command-line values applied, ready to be saved as
    YAML and compared when a run is continued. ``nested`` names fields that hold override mappings for another dataclass (parsed from a JSON string when given
    whole on the command line, merged key by key from ``--field.key value``)."""
    import sys

    nested = nested or {}
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--config", *argv]
    path = argv[argv.index("--config") + 1] if "--config" in argv else None
    raw = check_keys(path, dataclass_types, nested) if path else {}
    argv, dotted = _split_dotted(argv, nested)
    instances = TrlParser(list(dataclass_types)).parse_args_and_config(argv)
    for instance in instances:
        for name, cls in nested.items():
            if not hasattr(instance, name):
                continue
            value = getattr(instance, name)
            if isinstance(value, str):
                try:
                    value = json.loads(value) if value.strip() not in ("", "null", "None") else None
                except json.JSONDecodeError as e:
                    raise RecipeError(f"--{name}: expected a JSON mapping of {cls.__name__} fields ({e})") from e
            if name in dotted:
                value = {**(value or raw.get(name) or {}), **dotted[name]}
            setattr(instance, name, value)
    resolved = dict(raw)
    for key in _given_on_command_line(argv) + list(dotted):
        for instance in instances:
            if hasattr(instance, key):
                resolved[key] = _plain(getattr(instance, key))
                break
    return (*instances, path, resolved)


def coerce(cls: type, overrides: dict) -> dict:
    """``overrides`` with each value converted to its field's type in ``cls`` (YAML reads ``5e-6`` as a string)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in overrides.items():
        kinds = typing.get_args(hints.get(key)) or (hints.get(key),)
        if isinstance(value, str) and value not in ("None", "null"):
            for kind in (int, float):
                if kind in kinds and str not in kinds:
                    try:
                        value = kind(value)
                        break
                    except ValueError:
                        continue
        out[key] = value
    return out


def _given_on_command_line(argv: list[str]) -> list[str]:
    keys = []
    for arg in argv:
        if arg.startswith("--") and arg != "--config":
            key = arg[2:].split("=", 1)[0].replace("-", "_")
            keys.append(key[3:] if key.startswith("no_") else key)
    return keys


def _plain(value):
    """A value as YAML can write it: enums by value, tuples as lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    return value
