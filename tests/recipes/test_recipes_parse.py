"""Every YAML under recipes/ parses, and every model config builds a valid DeepseekV2Config."""

from pathlib import Path

import pytest
import yaml

from modeling import load_model_config
from tests.conftest import REPO

RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def test_there_are_recipes():
    assert any(p.parent.name == "models" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_recipe_parses(path: Path):
    assert isinstance(yaml.safe_load(path.read_text()), dict), f"{path}: not a mapping"
    if path.parent.name == "models":
        load_model_config(path)
