"""Recipes: keys map onto the dataclasses, overrides from the command line, and errors that say where."""

import re

import pytest
from trl import ModelConfig, SFTConfig

from pipelines.config import RecipeError, coerce, parse_recipe
from pipelines.sft import SFTScriptArguments

TYPES = (SFTScriptArguments, SFTConfig, ModelConfig)
BASE = "output_dir: /tmp/x\nuse_cpu: true\n"


def parse(tmp_path, body, *argv):
    path = tmp_path / "recipe.yaml"
    path.write_text(body)
    return parse_recipe(TYPES, [str(path), *argv], nested={"pretrain": SFTConfig})


@pytest.mark.parametrize("body, message", [
    (BASE + "lerning_rate: 1e-3\n", r"recipe\.yaml:3: unknown key 'lerning_rate'; did you mean 'learning_rate'\?"),
    (BASE + "pretrain:\n  max_stepz: 3\n", r"recipe\.yaml:3: pretrain: unknown key 'max_stepz'; did you mean 'max_steps'"),
    (BASE + "pretrain: 5\n", r"recipe\.yaml:3: pretrain must be a mapping of SFTConfig fields"),
    ("- a list\n", r"recipe\.yaml: a recipe must be a YAML mapping"),
    (BASE + "overlong: cut\n", r"overlong='cut'; expected one of"),
], ids=["typo", "typo-in-stage", "stage-not-mapping", "not-a-mapping", "bad-value"])
def test_bad_recipes_say_where_and_what(tmp_path, body, message):
    with pytest.raises(RecipeError, match=message):
        parse(tmp_path, body)


def test_a_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(RecipeError, match=re.escape(f"{tmp_path}/nope.yaml: no such recipe file")):
        parse_recipe(TYPES, [str(tmp_path / "nope.yaml")])


def test_keys_land_on_their_dataclass_with_their_types(tmp_path):
    script, train, model, path, resolved = parse(
        tmp_path, BASE + "learning_rate: 5e-6\nmax_length: 256\ndata_dir: d\nuse_peft: true\n")
    assert train.learning_rate == 5e-6 and train.max_length == 256  # "5e-6" is a string to YAML
    assert script.data_dir == "d" and model.use_peft is True
    assert path.endswith("recipe.yaml") and resolved["learning_rate"] == "5e-6"


@pytest.mark.parametrize("argv, field, want", [
    (["--learning_rate", "3e-4"], "learning_rate", 3e-4),
    (["--max_steps=7"], "max_steps", 7),
    (["--bf16", "false"], "bf16", False),
    (["--eval_math", "0"], "eval_math", 0),
    (["--pretrain.max_steps", "9"], "pretrain", {"max_steps": 9, "learning_rate": 0.002}),
    (["--pretrain", '{"max_steps": 4}'], "pretrain", {"max_steps": 4}),
    (["--pretrain", "null"], "pretrain", None),
])
def test_command_line_overrides_win_and_are_recorded(tmp_path, argv, field, want):
    parsed = parse(tmp_path, BASE + "pretrain: {max_steps: 3, learning_rate: 0.002}\n", *argv)
    value = next(getattr(obj, field) for obj in parsed[:3] if hasattr(obj, field))
    assert value == want
    assert parsed[-1][field] == want


def test_an_unknown_stage_key_on_the_command_line_is_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"--pretrain\.max_stepz: unknown key 'max_stepz'; did you mean 'max_steps'"):
        parse(tmp_path, BASE, "--pretrain.max_stepz", "3")


@pytest.mark.parametrize("given, want", [
    ({"learning_rate": "5e-6"}, {"learning_rate": 5e-6}),
    ({"max_steps": "7", "warmup_steps": "0.1"}, {"max_steps": 7, "warmup_steps": 0.1}),
    ({"assistant_only_loss": False, "output_dir": "5"}, {"assistant_only_loss": False, "output_dir": "5"}),
])
def test_coerce_converts_yaml_strings_to_field_types(given, want):
    assert coerce(SFTConfig, given) == want
