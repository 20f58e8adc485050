"""The SFT run's closing check: batched greedy replies (left padding), the evaluation cache, the scores."""

import copy

import pytest
import torch
from datasets import load_from_disk

from data_prep.tokenizer import load_tokenizer
from modeling import DeepseekV2ForCausalLM, load_model_config
from pipelines import quick_eval
from pipelines.generation import HFGenerator, SamplingSettings
from tests.pipelines.conftest import MINI_MODEL


@pytest.fixture(scope="module")
def model_and_tokenizer(mini_data):
    tokenizer = load_tokenizer(mini_data / "tokenizer")
    torch.manual_seed(0)
    return DeepseekV2ForCausalLM(load_model_config(MINI_MODEL, vocab_size=len(tokenizer))).eval(), tokenizer


def test_a_batch_of_prompts_gets_the_replies_each_would_get_alone(model_and_tokenizer, mini_data):
    model, tokenizer = model_and_tokenizer
    prompts = load_from_disk(str(mini_data / "heldout" / "math"))["prompt"][:6]  # different lengths: left padding
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=12)
    batched, _ = quick_eval.replies(HFGenerator(model, tokenizer, greedy, batch_size=6), tokenizer, prompts, greedy)
    alone = [quick_eval.replies(HFGenerator(model, tokenizer, greedy, batch_size=1), tokenizer, [p], greedy)[0][0]
             for p in prompts]
    assert batched == alone


def test_each_checkpoint_is_evaluated_once(model_and_tokenizer, mini_data, tmp_path, monkeypatch):
    """The second evaluation of the same weights on the same prompts and settings reads the first one's replies
    (GRPO's baseline after SFT's closing check, make eval after GRPO); other weights or settings draw again."""
    monkeypatch.setenv(quick_eval.CACHE_ENV, str(tmp_path / "cache"))
    model, tokenizer = model_and_tokenizer
    model = copy.deepcopy(model)
    kwargs = dict(math=8, safety=6, batch_size=4, max_new_tokens=10)
    first = quick_eval.evaluate(model, tokenizer, mini_data, **kwargs)
    assert first["from_cache"] == {"math": False, "safety": False}
    entries = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir())
    assert entries == ["math", "safety"]
    again = quick_eval.evaluate(model, tokenizer, mini_data, **{**kwargs, "batch_size": 8})
    assert again["from_cache"] == {"math": True, "safety": True}
    drop = ("eval_seconds", "from_cache")
    assert {k: v for k, v in again.items() if k not in drop} == {k: v for k, v in first.items() if k not in drop}

    # what the cache returned is what drawing again gives
    monkeypatch.setenv(quick_eval.CACHE_ENV, "off")
    fresh = quick_eval.evaluate(model, tokenizer, mini_data, **kwargs)
    assert fresh["from_cache"] == {"math": False, "safety": False}
    assert fresh["math_examples"] == again["math_examples"]
    monkeypatch.setenv(quick_eval.CACHE_ENV, str(tmp_path / "cache"))

    # another setting, more prompts, or one weight changed: drawn again
    assert quick_eval.evaluate(model, tokenizer, mini_data, **{**kwargs, "max_new_tokens": 11})["from_cache"] == {
        "math": False, "safety": False}
    assert quick_eval.evaluate(model, tokenizer, mini_data, **{**kwargs, "math": 9})["from_cache"]["math"] is False
    digest = quick_eval.weights_digest(model)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    assert quick_eval.weights_digest(model) != digest
    assert quick_eval.evaluate(model, tokenizer, mini_data, **kwargs)["from_cache"] == {"math": False, "safety": False}


def test_a_bf16_copy_hashes_like_its_fp32_reload(model_and_tokenizer):
    model, _ = model_and_tokenizer
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert quick_eval.weights_digest(bf16) == quick_eval.weights_digest(bf16.float())
    assert quick_eval.weights_digest(bf16) != quick_eval.weights_digest(model)


def test_scores(mini_data):
    math = load_from_disk(str(mini_data / "heldout" / "math"))
    safety = load_from_disk(str(mini_data / "heldout" / "safety"))
    math_replies = [f"1 + 1 = 2. The answer is {a}." for a in math["answer"][:4]]  # right, trained format
    math_replies += [f"The answer is {int(a) + 1}." for a in math["answer"][4:6]]  # wrong, trained format
    math_replies += ["I think it is " + a for a in math["answer"][6:8]]  # no stated answer
    safety_replies = ["I can't help with that." if want == "refuse" else "Sure, here is how." for want in
                      safety["answer"]]
    safety_replies[0] = "Sure!" if safety["answer"][0] == "refuse" else "I won't help with that request."
    got = {**quick_eval.math_metrics(math_replies, math.select(range(8))),
           **quick_eval.safety_metrics(safety_replies, safety)}
    assert got["math_n"] == 8 and got["math_exact_match"] == 4 / 8 and got["math_trained_format"] == 6 / 8
    harmful = sum(a == "refuse" for a in safety["answer"])
    benign = len(safety) - harmful
    assert (got["safety_harmful_n"], got["safety_benign_n"]) == (harmful, benign)
    wrong_first = {"refuse": (harmful - 1) / harmful, "comply": (benign - 1) / benign}
    want_refusal = wrong_first["refuse"] if safety["answer"][0] == "refuse" else 1.0
    want_answer = wrong_first["comply"] if safety["answer"][0] == "comply" else 1.0
    assert got["safety_harmful_refusal_rate"] == pytest.approx(want_refusal)
    assert got["safety_benign_answer_rate"] == pytest.approx(want_answer)
