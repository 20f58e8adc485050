"""Format and rule rewards: each as a table of completions and the rewards they earn."""

import pytest

from rewards.format import AnswerFormat, LanguageConsistency, LengthPenalty, RepetitionPenalty, chat_format

# completion, reward
CHAT_FORMAT = [
    ("The answer is 4.", 1.0),
    ("Step 1: add.\nThe user asked for 2+2: it is 4.", 1.0),
    ("4<|im_end|>", 0.0),
    ("4<|eot_id|>", 0.0),
    ("4<｜end▁of▁sentence｜>", 0.0),
    ("4</s>", 0.0),
    ("4\n\nUser: and 3+3?", 0.0),
    ("Assistant: 4", 0.0),
    ([{"role": "assistant", "content": "4"}], 1.0),
]


@pytest.mark.parametrize("completion,reward", CHAT_FORMAT)
def test_chat_format(completion, reward):
    assert chat_format([completion]) == [reward]


# style, completion, reward
ANSWER_FORMAT = [
    ("any", "so \\boxed{4}", 1.0),
    ("any", "The answer is 4.", 1.0),
    ("any", "it is probably 4", 0.0),
    ("any", "\\boxed{3} or \\boxed{4}", 0.0),
    ("boxed", "\\boxed{4}", 1.0),
    ("boxed", "The answer is 4.", 0.0),
    ("gsm8k", "2 + 2 = 4\n#### 4", 1.0),
    ("gsm8k", "\\boxed{4}", 0.0),
    ("tags", "<think>2 + 2</think>\n<answer>4</answer>", 1.0),
    ("tags", "<answer>4</answer>", 1.0),
    ("tags", "<think>2 + 2</think> 4", 0.0),
    ("tags", "<answer>4</answer><answer>5</answer>", 0.0),
    ("tags", "preamble <answer>4</answer>", 0.0),
    ("tags", "<answer> </answer>", 0.0),
]


@pytest.mark.parametrize("style,completion,reward", ANSWER_FORMAT)
def test_answer_format(style, completion, reward):
    assert AnswerFormat(style)([completion]) == [reward]


# scripts, completion, reward
LANGUAGE = [
    (("LATIN",), "All English here.", 1.0),
    (("LATIN",), "abcd 中文", 4 / 6),
    (("LATIN", "GREEK"), "The angle θ is π/2", 1.0),
    (("LATIN",), "```python\n# 中文注释\nx = 1\n```\nplain", 1.0),  # code blocks are ignored
    (("LATIN",), "$\\frac{1}{2}$ 12345", 1.0),  # no letters outside LaTeX commands
    (("CJK",), "答案是四", 1.0),
    (("CJK",), "答案 is", 0.5),
]


@pytest.mark.parametrize("scripts,completion,reward", LANGUAGE)
def test_language_consistency(scripts, completion, reward):
    assert LanguageConsistency(scripts)([completion]) == [pytest.approx(reward)]


# n, completion, reward
REPETITION = [
    (3, "one two three four five", 0.0),
    (3, "a b c a b c", -1 / 4),  # n-grams abc bca cab abc: one of four repeats
    (3, "so so so so so so so so so so so", -8 / 9),
    (1, "hi", 0.0),
    (3, "too short", 0.0),
]


@pytest.mark.parametrize("n,completion,reward", REPETITION)
def test_repetition_penalty(n, completion, reward):
    assert RepetitionPenalty(ngram_size=n)([completion]) == [pytest.approx(reward)]


# length in tokens, reward for max_length=10, cache_length=4 (DAPO eq. 13)
LENGTH = [(0, 0.0), (6, 0.0), (7, -0.25), (8, -0.5), (10, -1.0), (11, -1.0), (1000, -1.0)]


@pytest.mark.parametrize("length,reward", LENGTH)
def test_length_penalty(length, reward):
    penalty = LengthPenalty(max_length=10, cache_length=4)
    assert penalty(["x"], completion_ids=[[0] * length]) == [reward]


def test_length_penalty_in_words_and_chars():
    assert LengthPenalty(3, unit="words")(["a b c", "a b c d"]) == [0.0, -1.0]
    assert LengthPenalty(3, 1, unit="chars")(["abc", "abcd"]) == [-1.0, -1.0]


# factory, keyword arguments, message fragment
BAD_PARAMETERS = [
    (AnswerFormat, {"style": "xml"}, "style must be one of"),
    (LanguageConsistency, {"scripts": ()}, "at least one script"),
    (RepetitionPenalty, {"max_penalty": 1.0}, "max_penalty <= 0"),
    (LengthPenalty, {"max_length": 10, "cache_length": 10}, "cache_length < max_length"),
    (LengthPenalty, {"max_length": 10, "unit": "bytes"}, "unit must be one of"),
]


@pytest.mark.parametrize("factory,kwargs,message", BAD_PARAMETERS)
def test_bad_parameters_say_what_to_change(factory, kwargs, message):
    with pytest.raises(ValueError, match=message):
        factory(**kwargs)


def test_token_lengths_need_completion_ids():
    with pytest.raises(ValueError, match="completion_ids"):
        LengthPenalty(10)(["text"])
