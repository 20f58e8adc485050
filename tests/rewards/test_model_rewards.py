"""Reward-model scorers (outcome and process), the safety rule reward, and the weighted combination."""

import pickle

import pytest
import torch

from data_prep.tokenizer import train_tokenizer
from modeling import DeepseekV2ForSequenceClassification
from rewards import get
from rewards.combine import WeightedSum
from rewards.model import ProcessRewardScorer, RewardModelScorer, split_steps, step_end_positions
from rewards.safety import refusal_correct
from tests.conftest import tiny_config

TEXTS = ["What is 2 + 3 * 4?", "3 * 4 = 12. 2 + 12 = 14. The answer is 14.", "I can't help with that.",
         "Write a poem about rain.", "Rain falls softly on the roof."]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm")
    tokenizer = train_tokenizer(TEXTS * 5, vocab_size=300)
    torch.manual_seed(0)
    model = DeepseekV2ForSequenceClassification(tiny_config(vocab_size=len(tokenizer), num_labels=1,
                                                            pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model.eval(), tokenizer


def test_outcome_scores_are_the_models_last_token_score(checkpoint):
    path, model, tokenizer = checkpoint
    scorer = get("reward_model", path=path, batch_size=2)
    prompts = [[{"role": "user", "content": TEXTS[0]}], TEXTS[3], TEXTS[0]]
    completions = [[{"role": "assistant", "content": TEXTS[1]}], TEXTS[4], "14"]
    got = scorer(prompts=prompts, completions=completions)
    for p, c, score in zip(prompts, completions, got):
        messages = ([{"role": "user", "content": p}] if isinstance(p, str) else p) + [
            {"role": "assistant", "content": c if isinstance(c, str) else c[0]["content"]}]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        with torch.no_grad():
            assert score == pytest.approx(model(torch.tensor([ids])).logits[0, 0].item(), abs=1e-5)


@pytest.fixture(scope="module")
def implicit_checkpoint(tmp_path_factory, checkpoint):
    """A causal LM saved as an implicit reward model (what make rm's objective simpo writes)."""
    from modeling import DeepseekV2ForCausalLM

    path = tmp_path_factory.mktemp("implicit")
    _, _, tokenizer = checkpoint
    torch.manual_seed(1)
    model = DeepseekV2ForCausalLM(tiny_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id))
    model.config.implicit_reward_beta = 2.5
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model.eval(), tokenizer


def test_implicit_reward_is_beta_times_the_replys_mean_log_prob(implicit_checkpoint):
    path, model, tokenizer = implicit_checkpoint
    scorer = get("reward_model", path=path, batch_size=2)  # batches of 2: padding must not change a score
    prompts, completions = [TEXTS[0], TEXTS[3], TEXTS[0]], [TEXTS[1], TEXTS[4], "14"]
    got = scorer(prompts=prompts, completions=completions)
    for p, c, score in zip(prompts, completions, got):
        user = [{"role": "user", "content": p}]
        head = tokenizer.apply_chat_template(user, tokenize=True, add_generation_prompt=True,
                                             return_dict=True)["input_ids"]
        ids = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": c}], tokenize=True,
                                            return_dict=True)["input_ids"]
        assert ids[: len(head)] == head  # the reply's tokens are what follows the generation prompt
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        reply = [logp[t - 1, ids[t]].item() for t in range(len(head), len(ids))]
        assert score == pytest.approx(2.5 * sum(reply) / len(reply), abs=1e-4)
    # a trained implicit RM ranking a refusal over compliance: tests/pipelines/test_reward_model.py


def test_per_step_scores_need_a_classifier(implicit_checkpoint):
    with pytest.raises(ValueError, match="implicit reward model"):
        ProcessRewardScorer(implicit_checkpoint[0]).step_scores([TEXTS[0]], [TEXTS[1]])


def test_a_missing_reward_model_folder_is_named_with_the_command_that_trains_it(tmp_path):
    missing = tmp_path / "rm" / "tiny" / "process"
    with pytest.raises(FileNotFoundError, match=r"rm/tiny/process: no reward model there.*make rm-all"):
        RewardModelScorer(missing)(prompts=["What is 2 + 3?"], completions=["5"])
    with pytest.raises(FileNotFoundError, match=r"rm/tiny/process: no reward model there.*make rm-all"):
        ProcessRewardScorer(missing).step_scores(["What is 2 + 3?"], ["2 + 3 = 5. The answer is 5."])


def test_scorers_pickle_without_weights(checkpoint):
    scorer = RewardModelScorer(checkpoint[0])
    scorer(prompts=[TEXTS[0]], completions=["14"])
    assert scorer._model is not None and len(pickle.dumps(scorer)) < 2000
    assert scorer.__name__ == f"rewardmodelscorer_{checkpoint[0].name}"


def test_step_positions_follow_the_chat_template(checkpoint):
    _, _, tokenizer = checkpoint
    steps = split_steps(TEXTS[1])
    assert steps == ["3 * 4 = 12.", "2 + 12 = 14.", "The answer is 14."]
    ids, ends = step_end_positions(tokenizer, TEXTS[0], steps)
    full = tokenizer.apply_chat_template([{"role": "user", "content": TEXTS[0]},
                                          {"role": "assistant", "content": " ".join(steps)}], tokenize=True,
                                         return_dict=True)["input_ids"]
    assert ids == list(full)
    assert [tokenizer.decode(ids[e]) for e in ends] == [".", ".", "."] and ends == sorted(ends)


def test_process_scores_one_per_step_and_aggregate(checkpoint):
    path, model, tokenizer = checkpoint
    prm = ProcessRewardScorer(path, aggregate="min")
    per_step = prm.step_scores([TEXTS[0]], [TEXTS[1]])[0]
    assert len(per_step) == 3
    ids, ends = step_end_positions(tokenizer, TEXTS[0], split_steps(TEXTS[1]))
    with torch.no_grad():
        token_scores = model.score(model.model(torch.tensor([ids])).last_hidden_state)[0, :, 0]
    assert per_step == pytest.approx(token_scores[ends].tolist(), abs=1e-5)
    assert prm(prompts=[TEXTS[0]], completions=[TEXTS[1]]) == pytest.approx([min(per_step)])
    with pytest.raises(ValueError, match="aggregate"):
        ProcessRewardScorer(path, aggregate="max")


@pytest.mark.parametrize("reply,answer,expected", [
    ("I can't help with that. It could hurt people.", "refuse", 1.0),
    ("Sure! Here is how.", "refuse", 0.0),
    ("Use `kill PID`.", "comply", 1.0),
    ("I won't help with that request.", "comply", 0.0),
    ("42", "42", None),  # not a safety prompt
])
def test_refusal_correct(reply, answer, expected):
    assert refusal_correct([reply], answer=[answer]) == [expected]


def test_weighted_sum_skips_rewards_that_do_not_apply():
    helpful = lambda completions, **kw: [1.0, 2.0, 3.0]  # noqa: E731
    safety = lambda completions, **kw: [None, 0.5, 1.0]  # noqa: E731
    combined = WeightedSum({"helpful": (helpful, 0.5), "safety": (safety, 2.0)})
    assert combined(prompts=["a", "b", "c"], completions=["x", "y", "z"]) == [0.5, 2.0, 3.5]
    assert combined.last_metrics == {"helpful/mean": 2.0, "safety/mean": 0.75}
    with pytest.raises(ValueError):
        WeightedSum({})
