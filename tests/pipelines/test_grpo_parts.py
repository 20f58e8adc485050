"""GRPO's pieces that need no model: reward building, stage settings, recipes."""

import pytest

from pipelines.config import RecipeError
from pipelines.grpo_config import GRPOArguments, StageConfig, lr_factor, stage_configs
from pipelines.rollout import build_reward
from tests.conftest import REPO


def test_rewards_apply_only_to_their_domains_and_combine_with_weights():
    reward = build_reward([{"name": "math_accuracy", "weight": 2.0, "domains": ["math"]},
                           {"name": "refusal_correct", "label": "rule", "weight": 0.5, "domains": ["safety"]}])
    scores = reward(prompts=["q1", "q2", "q3"],
                    completions=["The answer is 4.", "I can't help with that.", "Sure, here is how."],
                    answer=["4", "refuse", "refuse"], domain=["math", "safety", "safety"])
    assert scores == [2.0, 0.5, 0.0]
    assert reward.last_metrics == {"math_accuracy/mean": 1.0, "rule/mean": 0.5}


def test_a_domain_filter_without_a_domain_column_is_an_error():
    reward = build_reward([{"name": "math_accuracy", "domains": ["math"]}])
    with pytest.raises(ValueError, match="domain"):
        reward(prompts=["q"], completions=["The answer is 4."], answer=["4"])


@pytest.mark.parametrize("fields,message", [
    ({"supervision": "step"}, "expected outcome or process"),
    ({"supervision": "process"}, "needs process_reward_model"),
    ({"loss_aggregation": "sum"}, "expected one of"),
    ({"num_generations": 1}, "at least 2"),
    ({"lr_scheduler_type": "linear"}, "expected one of"),
    ({"rewards": [{"weight": 1.0}]}, "give the reward's name"),
])
def test_bad_stage_settings_say_what_to_change(fields, message):
    with pytest.raises(RecipeError, match=message):
        StageConfig(**fields).check("reasoning")


# schedule, warmup, max_steps, μ: the multiplier after 0, 1, 4, 9 and 19 optimizer steps
LR_FACTORS = [
    ("constant", 0, 10, 1, [1.0, 1.0, 1.0, 1.0, 1.0]),
    ("constant", 4, 10, 1, [0.25, 0.5, 1.0, 1.0, 1.0]),
    ("cosine", 0, 10, 1, [1.0, 0.9755, 0.6545, 0.0245, 0.0]),
    ("cosine", 4, 10, 1, [0.25, 0.4878, 0.6545, 0.0245, 0.0]),
    ("cosine", 0, 10, 2, [1.0, 0.9938, 0.9045, 0.5782, 0.0062]),  # μ updates per step: 20 optimizer steps
]


@pytest.mark.parametrize("schedule,warmup,steps,mu,expected", LR_FACTORS)
def test_the_learning_rate_warms_up_then_holds_or_decays_to_zero(schedule, warmup, steps, mu, expected):
    cfg = StageConfig(lr_scheduler_type=schedule, warmup_steps=warmup, max_steps=steps, num_iterations=mu)
    assert [round(lr_factor(cfg, s), 4) for s in (0, 1, 4, 9, 19)] == expected


def test_the_tiny_recipe_resolves_into_two_stages():
    from pipelines.config import parse_recipe

    args, path, resolved = parse_recipe((GRPOArguments,), [str(REPO / "recipes/grpo/tiny.yaml"),
                                                            "--reasoning.max_steps", "7"],
                                        nested={"reasoning": StageConfig, "preference": StageConfig})
    stages = stage_configs(args, path)
    assert list(stages) == ["reasoning", "preference"]
    assert stages["reasoning"].max_steps == 7 and resolved["reasoning"]["max_steps"] == 7
    assert stages["reasoning"].loss_aggregation == "token" and stages["preference"].beta == 0.04


def test_an_unknown_stage_key_names_the_file_and_line(tmp_path):
    from pipelines.config import parse_recipe

    recipe = tmp_path / "bad.yaml"
    recipe.write_text("policy: runs/sft/tiny\nreasoning:\n  max_step: 3\n")
    with pytest.raises(RecipeError, match=r"bad.yaml:2: reasoning: unknown key 'max_step'; did you mean 'max_steps'"):
        parse_recipe((GRPOArguments,), [str(recipe)], nested={"reasoning": StageConfig, "preference": StageConfig})
    with pytest.raises(RecipeError, match="command line --reasoning.max_step: unknown key"):
        parse_recipe((GRPOArguments,), [str(REPO / "recipes/grpo/tiny.yaml"), "--reasoning.max_step", "7"],
                     nested={"reasoning": StageConfig, "preference": StageConfig})


def test_the_safety_rm_of_the_checks_is_named_by_label():
    """The reward model whose score of held-out harmful replies the checks report is the one labelled
    ``eval_safety_rm`` (it was the first whose label or path contained "safety")."""
    from pipelines.grpo_config import find_safety_rm

    stages = {"preference": StageConfig(rewards=[
        {"name": "reward_model", "label": "safety_helpfulness_mix", "path": "runs/rm/helpful"},
        {"name": "reward_model", "label": "harmless", "path": "runs/rm/safety"}])}
    assert find_safety_rm(stages, "harmless") == "runs/rm/safety"
    assert find_safety_rm(stages, "rm_safety") is None and find_safety_rm(stages, None) is None


def test_launches_grpo_cannot_run_say_which_one_to_use():
    from pipelines.grpo_trainer import check_launch, make_accelerator

    with pytest.raises(RecipeError, match="fsdp with use_peft.*set fsdp: false"):
        check_launch(make_accelerator(), {}, use_peft=True, fsdp=True)
    check_launch(make_accelerator(), {}, use_peft=False, fsdp=True)  # one process: nothing to shard, nothing refused
