"""The SFT run's closing check: batched greedy replies (left padding) and how they are scored."""

import pytest
import torch
from datasets import load_from_disk

from data_prep.tokenizer import load_tokenizer
from modeling import DeepseekV2ForCausalLM, load_model_config
from pipelines import quick_eval
from tests.pipelines.conftest import MINI_MODEL


@pytest.fixture(scope="module")
def model_and_tokenizer(mini_data):
    tokenizer = load_tokenizer(mini_data / "tokenizer")
    torch.manual_seed(0)
    return DeepseekV2ForCausalLM(load_model_config(MINI_MODEL, vocab_size=len(tokenizer))).eval(), tokenizer


def test_a_batch_of_prompts_gets_the_replies_each_would_get_alone(model_and_tokenizer, mini_data):
    model, tokenizer = model_and_tokenizer
    prompts = load_from_disk(str(mini_data / "heldout" / "math"))["prompt"][:6]  # different lengths: left padding
    side = tokenizer.padding_side
    batched = quick_eval.greedy_replies(model, tokenizer, prompts, batch_size=6, max_new_tokens=12)
    alone = [quick_eval.greedy_replies(model, tokenizer, [p], batch_size=1, max_new_tokens=12)[0] for p in prompts]
    assert batched == alone
    assert tokenizer.padding_side == side  # left padding was only borrowed


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
