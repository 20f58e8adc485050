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


# SFT recipes parse into the pipeline's dataclasses (GPU recipes ask for bf16, which TrainingArguments refuses on a
# machine without a GPU unless told it is a CPU run), and accelerate configs load as accelerate reads them.
SFT_RECIPES = [p for p in RECIPES if p.parent.name == "sft"]
ACCELERATE_CONFIGS = [p for p in RECIPES if p.parent.name == "accelerate"]


def test_there_are_sft_recipes_and_launch_configs():
    assert {p.stem for p in SFT_RECIPES} >= {"tiny", "deepseek-v2-lite", "deepseek-v2"}
    assert {p.stem for p in ACCELERATE_CONFIGS} >= {"ddp", "deepspeed_zero3", "fsdp"}


@pytest.mark.parametrize("path", SFT_RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_sft_recipe_parses(path: Path):
    from trl import ModelConfig, SFTConfig

    from pipelines.config import parse_recipe
    from pipelines.sft import SFTScriptArguments

    script, train, model, _, resolved = parse_recipe((SFTScriptArguments, SFTConfig, ModelConfig),
                                                     [str(path), "--use_cpu", "true"], nested={"pretrain": SFTConfig})
    assert path.read_text().startswith("#") and "pipelines.sft" in path.read_text()  # launch line on top
    assert train.output_dir and train.max_length and train.learning_rate > 0
    if path.stem.startswith("deepseek-v2"):  # the paper's settings (§4.1)
        assert train.num_train_epochs == 2 and train.learning_rate == 5e-6 and model.model_name_or_path


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_accelerate_config_loads(path: Path):
    from accelerate.commands.config.config_args import load_config_from_file

    assert load_config_from_file(str(path)).num_processes >= 1


GRPO_RECIPES = [p for p in RECIPES if p.parent.name == "grpo"]
RM_RECIPES = [p for p in RECIPES if p.parent.name == "rm"]


@pytest.mark.parametrize("path", GRPO_RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_grpo_recipe_parses(path: Path):
    from pipelines.config import parse_recipe
    from pipelines.grpo_config import GRPOArguments, StageConfig, stage_configs

    args, where, _ = parse_recipe((GRPOArguments,), [str(path)],
                                  nested={"reasoning": StageConfig, "preference": StageConfig})
    stages = stage_configs(args, where)
    assert path.read_text().startswith("#") and "pipelines.grpo" in path.read_text()
    # the paper's two stages; the real-data recipe (GSM8K only) and the stage-1 variants run the reasoning stage
    one_stage = path.stem in ("smollm2", "tiny-iterative", "tiny-process", "deepseek-v2-lite")
    assert list(stages) == (["reasoning"] if one_stage else ["reasoning", "preference"])
    if path.stem == "tiny-iterative":  # DeepSeekMath Alg. 1: the reasoning RM retrained between 2 iterations
        s = stages["reasoning"]
        assert s.iterations == 2 and s.retrain_reward_model["label"] == "rm_reasoning"
    if path.stem == "tiny-process":
        assert stages["reasoning"].supervision == "process"
    if path.stem.startswith("deepseek-v2"):  # DeepSeekMath's values where DeepSeek-V2 gives none
        s = stages["reasoning"]
        assert (s.learning_rate, s.beta, s.num_generations, s.num_iterations) == (1e-6, 0.04, 64, 1)
    if path.stem == "deepseek-v2-lite":  # sharded trainer processes, sampling on a vLLM server
        assert args.fsdp and args.backend == "vllm_server" and args.vllm_server_url


@pytest.mark.parametrize("path", RM_RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_rm_recipe_parses(path: Path, tmp_path):
    from trl import RewardConfig

    from pipelines.config import parse_recipe
    from pipelines.reward_model import RewardModelArguments

    (tmp_path / "preferences").mkdir()  # the arguments check that the data were built; a fresh clone has none
    args, config, _, _ = parse_recipe((RewardModelArguments, RewardConfig),
                                      ["--config", str(path), "--use_cpu", "true", "--data_dir", str(tmp_path)])
    assert args.reward_models and config.output_dir


def test_an_unknown_key_in_an_rm_recipe_names_the_file_line_and_closest_key(tmp_path):
    """The reward-model pipeline reads its recipe as SFT and GRPO do (it used TRL's parser alone, which names
    neither the file nor the line)."""
    from pipelines.config import RecipeError
    from pipelines.reward_model import main

    recipe = tmp_path / "rm.yaml"
    recipe.write_text("reward_models: [safety]\nlearning_rat: 1.0e-4\n")
    with pytest.raises(RecipeError, match=r"rm.yaml:2: unknown key .learning_rat.; did you mean .learning_rate."):
        main(["--config", str(recipe)])


EVAL_RECIPES = [p for p in RECIPES if p.parent.name == "eval"]


@pytest.mark.parametrize("path", EVAL_RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_eval_recipe_parses(path: Path):
    from eval.run import EvalArguments
    from pipelines.config import parse_recipe

    args, _, _ = parse_recipe((EvalArguments,), [str(path)])
    assert path.read_text().startswith("#") and "python -m eval" in path.read_text()
    assert args.oracle or [entry.split("=")[0] for entry in args.checkpoints] == ["sft", "stage1", "stage2"]
