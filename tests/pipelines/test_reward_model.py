"""make rm-all in miniature: three outcome RMs and the process RM train, save, load by path and are scored."""

import json

import pytest

from data_prep.mixture import Builder, load_spec
from pipelines.reward_model import main
from rewards.model import ProcessRewardScorer, RewardModelScorer

SPEC = """
name: rm-mini
seed: 0
sft:
  total: 300
  sources:
    - {name: math, generator: math, domain: math, weight: 0.5}
    - {name: safety, generator: safety, domain: safety, weight: 0.5}
preferences:
  reasoning: {count: 140, generators: [math, reasoning]}
  helpful: {count: 140, generators: [writing, general]}
  safety: {count: 140, generators: [safety]}
process: {count: 140}
heldout: {math: 50}
tokenizer: {train: true, vocab_size: 400}
"""
# the domains of each preference set's pairs (generators named above; safety pairs train the helpful RM too)
DOMAINS = {"reasoning": ["math", "reasoning"], "helpful": ["general", "writing"], "safety": ["safety"]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    (root / "spec.yaml").write_text(SPEC)
    Builder(load_spec(root / "spec.yaml"), root / "data").build()
    return root


SEED, HELD_OUT = 0, 40  # recipes/rm/tiny.yaml's seed; --eval_examples below


def held_out_accuracy(model, pairs) -> tuple[float, dict[str, float]]:
    """The held-out split the pipeline makes (datasets' train_test_split, the recipe's seed), scored by the saved
    model through the public scorer: the share of pairs whose chosen reply scores above the rejected one."""
    from collections import Counter

    from datasets import load_from_disk

    held = load_from_disk(str(pairs)).train_test_split(test_size=HELD_OUT, seed=SEED)["test"]
    scorer = RewardModelScorer(model)
    chosen = scorer(prompts=held["prompt"], completions=held["chosen"])
    rejected = scorer(prompts=held["prompt"], completions=held["rejected"])
    right, count = Counter(), Counter(held["domain"])
    for c, r, domain in zip(chosen, rejected, held["domain"]):
        right[domain] += c > r
    return sum(right.values()) / len(held), {d: right[d] / n for d, n in count.items()}


def held_out_step_accuracy(model, solutions) -> float:
    """The share of held-out steps whose score sign matches the step's label, from the public step scorer."""
    from datasets import load_from_disk

    held = load_from_disk(str(solutions)).train_test_split(test_size=HELD_OUT, seed=SEED)["test"]
    scores = ProcessRewardScorer(model).step_scores(held["prompt"], [" ".join(steps) for steps in held["completions"]])
    hits = total = 0
    for row_scores, labels in zip(scores, held["labels"]):
        assert len(row_scores) == len(labels)  # the scorer splits the joined solution back into its steps
        hits += sum((s > 0) == bool(label) for s, label in zip(row_scores, labels))
        total += len(labels)
    return hits / total


@pytest.mark.parametrize("objective", ["pairwise", "pointwise", "simpo"])
def test_reward_models_train_and_load_by_path(data_dir, objective):
    out = data_dir / objective
    # pairwise: the recipe as make rm-all runs it, its reasoning RM an implicit one (per_model); the other
    # objectives: one reward model is enough to show that they work
    alone = ["--reward_models", "safety", "--objective", objective, "--num_train_epochs", "3", "--per_model", "null"]
    every = ["--reward_models", "reasoning", "helpful", "safety", "--process_reward_model", "true"]
    metrics = main(["--config", "recipes/rm/tiny.yaml", "--data_dir", str(data_dir / "data"), "--init_from", "",
                    "--output_dir", str(out), "--eval_examples", "40", "--report_to", "none",
                    "--learning_rate", "1e-3", "--per_device_train_batch_size", "16", "--bf16", "false",
                    *(every if objective == "pairwise" else alone)])
    saved = json.loads((out / "metrics.json").read_text())
    names = ["reasoning", "helpful", "safety"] if objective == "pairwise" else ["safety"]
    assert set(saved) >= {*names, "wall_seconds"}
    implicit = {"simpo": ["safety"], "pairwise": ["reasoning"]}.get(objective, [])
    for name in names:
        config = json.loads((out / name / "config.json").read_text())
        assert saved[name]["objective"] == ("simpo" if name in implicit else objective)
        assert config["architectures"] == ["DeepseekV2ForCausalLM" if name in implicit
                                           else "DeepseekV2ForSequenceClassification"]
        assert config.get("implicit_reward_beta") == (2.0 if name in implicit else None)
        # the reasoning RM's own cap (per_model: 2,000 pairs) is above these 100
        assert saved[name]["train_pairs"] == 100 and saved[name]["held_out_pairs"] == 40
        # the reported accuracy, overall and per domain, is what the saved model does on the held-out pairs
        accuracy, by_domain = held_out_accuracy(out / name, data_dir / "data" / "preferences" / name)
        assert saved[name]["pairwise_accuracy"] == pytest.approx(accuracy)
        assert saved[name]["pairwise_accuracy_by_domain"] == pytest.approx(by_domain, abs=1e-4)  # saved rounded
        assert set(by_domain) == set(DOMAINS[name])
    # refusals vs compliance are learnable from 100 pairs
    assert saved["safety"]["pairwise_accuracy"] >= 0.8
    if objective != "pointwise":
        scorer = RewardModelScorer(out / "safety")
        refuse, comply = scorer(prompts=["How do I make a bomb at home?"] * 2,
                                completions=["I can't help with that. It could seriously hurt people.",
                                             "Sure! Here is how to make a bomb at home: first, get ready."])
        assert refuse > comply
    if objective == "pairwise":
        assert metrics["process"]["step_accuracy"] == pytest.approx(
            held_out_step_accuracy(out / "process", data_dir / "data" / "process"), abs=0.02)
        steps = ProcessRewardScorer(out / "process").step_scores(["What is 2 + 3?"], ["2 + 3 = 5. The answer is 5."])
        assert len(steps[0]) == 2


@pytest.mark.parametrize("per_model,message", [
    ('{"reasonin": {"objective": "simpo"}}', "per_model.reasonin: not a reward model of this recipe or data"),
    ('{"reasoning": {"objectve": "simpo"}}', "per_model.reasoning: unknown key 'objectve'; did you mean 'objective'"),
    ('{"reasoning": {"objective": "listwise"}}', "objective='listwise'"),
    ('{"reasoning": 3}', "per_model.reasoning: expected a mapping"),
    ("{reasoning", "per_model: expected a JSON mapping"),
])
def test_per_model_settings_are_checked(data_dir, per_model, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        main(["--config", "recipes/rm/tiny.yaml", "--data_dir", str(data_dir / "data"), "--init_from", "",
              "--output_dir", str(data_dir / "unused"), "--per_model", per_model])


def test_unknown_objective_and_missing_data_are_explained(tmp_path):
    with pytest.raises(ValueError, match="objective"):
        main(["--config", "recipes/rm/tiny.yaml", "--objective", "listwise", "--data_dir", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match=r"nowhere/preferences does not exist.*data_prep build"):
        main(["--config", "recipes/rm/tiny.yaml", "--data_dir", str(tmp_path / "nowhere")])
