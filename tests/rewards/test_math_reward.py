"""The math verifier: answer extraction, equivalence, one-answer rule, GSM8K in full, threads and processes."""

import json
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import pytest

from rewards.math import extract_final_answer, false_steps, math_accuracy, math_steps_accuracy, stated_answers
from tests.conftest import SHARED_DATA

GSM8K_TEST = SHARED_DATA / "gsm8k" / "test.jsonl"
GSM8K_ROWS = 1319

# text, the final answer it states
EXTRACTION = [
    ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\boxed{\\sqrt{\\frac{a}{b}}} end", "\\sqrt{\\frac{a}{b}}"),
    ("\\fbox{7}", "7"),
    ("\\boxed 5", "5"),
    ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
    ("The answer is 1,000.", "1,000"),
    ("The final answer is $18$. I hope it is correct.", "18"),
    ("Thus the answer is therefore 3.5.", "3.5"),
    ("The answer is: $\\frac{3}{4}$", "\\frac{3}{4}"),
    ("work...\nAnswer: 42", "42"),
    ("work...\n**Final Answer:** $5", "$5"),
    ("The answer is $\\boxed{12}$.", "12"),
    ("#### Step 1: add\nso the answer is 9", "9"),  # a markdown heading is not a GSM8K answer
    ("The answer is not obvious. We get \\boxed{4}.", "4"),  # prose after "the answer is" is not an answer
    ("Answer: first we add.\nThen 2 + 2 = 4", None),  # only a last line "Answer: ..." counts
    ("no answer here, just 7 and 8", None),
    ("\\boxed{unbalanced", None),
]


@pytest.mark.parametrize("text,expected", EXTRACTION)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


# completion, gold answer, reward
ACCURACY = [
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("The answer is 1,000", "1000", 1.0),
    ("The answer is 1000", "1,000", 1.0),
    ("The answer is $5", "5", 1.0),
    ("The answer is \\$5.00", "5", 1.0),
    ("The answer is 50%", "50", 1.0),
    ("The answer is 18 apples.", "18", 1.0),
    ("\\boxed{x = 5}", "5", 1.0),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", 1.0),
    ("\\boxed{(1, 2)}", "(1,2)", 1.0),
    ("\\boxed{0.3333333}", "1/3", 1.0),
    ("\\boxed{3}", "4", 0.0),
    ("\\boxed{1450001}", "1,450,000", 0.0),  # integers compare exactly, not within 1e-6
    ("\\boxed{0.50001}", "0.5", 0.0),
    ("\\boxed{3} or maybe \\boxed{4}", "4", 0.0),  # two different final answers
    ("#### 3\nThe answer is 4", "4", 0.0),
    ("\\boxed{4}. The answer is 4.", "4", 1.0),  # the same answer twice
    ("\\boxed{\\frac{8}{2}} so \\boxed{4}", "4", 1.0),  # the same value, written differently
    ("I think it is 4", "4", 0.0),  # no stated final answer
    ("\\boxed{4}", "Half of 8 is <<8/2=4>>4.\n#### 4", 1.0),  # gold given as a GSM8K solution
    ("", "4", 0.0),
    ("\\boxed{2^{10}}", "1024", 1.0),
    ("\\boxed{5!}", "120", 1.0),
    ("\\boxed{y^2+x^2}", "x^2 + y^2", 1.0),
    # Answers sympy would spend forever on (no timeout interrupts one huge integer power) match only as text.
    ("\\boxed{9^{9^{9^{9}}}}", "1", 0.0),
    ("\\boxed{10**10**10}", "1", 0.0),
    ("\\boxed{(10!)!}", "3", 0.0),
    ("\\boxed{\\binom{10^{9}}{10^{8}}}", "3", 0.0),
    ("\\boxed{10^{10^{10}}}", "10^{10^{10}}", 1.0),
]


@pytest.mark.parametrize("completion,gold,reward", ACCURACY)
def test_math_accuracy(completion, gold, reward):
    assert math_accuracy([completion], answer=[gold]) == [reward]


def test_trl_contract_chat_messages_none_rows_and_extra_columns():
    chat = [{"role": "user", "content": "2+2? \\boxed{5}"}, {"role": "assistant", "content": "\\boxed{4}"}]
    rewards = math_accuracy([chat, "\\boxed{4}"], answer=["4", None], prompts=["p", "q"], completion_ids=[[1], [2]],
                            trainer_state=object())
    assert rewards == [1.0, None]
    with pytest.raises(ValueError, match="one entry per completion"):
        math_accuracy(["\\boxed{1}"], answer=["1", "2"])


def test_stated_answers_in_order():
    assert stated_answers("#### 3\nthen \\boxed{4}\nAnswer: 5") == ["3", "4", "5"]


def _gsm8k():
    if not GSM8K_TEST.exists():
        pytest.skip(f"GSM8K test split not found at {GSM8K_TEST} (shared data not present on this machine)")
    rows = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines() if line.strip()]
    assert len(rows) == GSM8K_ROWS
    return rows


def _plus_one(answer: str) -> str:
    value = float(answer.replace(",", "")) + 1
    return str(int(value)) if value.is_integer() else str(value)


def test_gsm8k_gold_scores_one_and_gold_plus_one_scores_zero():
    rows = _gsm8k()
    golds = [row["answer"] for row in rows]
    numbers = [gold.split("####")[-1].strip() for gold in golds]
    assert math_accuracy(golds, answer=golds) == [1.0] * GSM8K_ROWS  # the full worked solution
    assert math_accuracy([f"The answer is {n}." for n in numbers], answer=golds) == [1.0] * GSM8K_ROWS
    assert math_accuracy([f"\\boxed{{{n}}}" for n in numbers], answer=numbers) == [1.0] * GSM8K_ROWS
    wrong = [_plus_one(n) for n in numbers]
    assert math_accuracy([f"The answer is {w}." for w in wrong], answer=golds) == [0.0] * GSM8K_ROWS
    wrong_solutions = [gold.rsplit("####", 1)[0] + f"#### {w}" for gold, w in zip(golds, wrong)]
    assert math_accuracy(wrong_solutions, answer=golds) == [0.0] * GSM8K_ROWS


# completion, gold, math_accuracy, math_steps_accuracy
WORKED = [
    ("40 + 30 = 70. 7 + 8 = 15. 70 + 15 = 85. The answer is 85.", "85", 1.0, 1.0),
    ("40 + 30 = 70. 7 + 8 = 16. 70 + 15 = 85. The answer is 85.", "85", 1.0, 0.0),  # a slip, answer still right
    ("40 + 30 = 70. 7 + 8 = 16. 70 + 16 = 86. The answer is 86.", "85", 0.0, 0.0),
    ("12 - 5 = 7. 0 - 7 = -7. -7 + 7 = 0. The answer is 0.", "0", 1.0, 1.0),  # negative numbers
    ("40 * 6 = 240. 7 * 6 = 42. 240 + 42 = 282. The answer is 282.", "282", 1.0, 1.0),
    ("40 * 6 = 250. 7 * 6 = 32. 250 + 32 = 282. The answer is 282.", "282", 1.0, 0.0),  # two slips that cancel
    ("Recall that 2 + 2 = 5. The answer is 4.", "4", 1.0, 0.0),  # a false step anywhere in the text
    ("The answer is 1.5.", "1.5", 1.0, 1.0),  # no steps stated: nothing to contradict it
]


@pytest.mark.parametrize("completion,gold,answer_reward,steps_reward", WORKED)
def test_a_right_answer_reached_through_a_false_step_scores_zero(completion, gold, answer_reward, steps_reward):
    assert math_accuracy([completion], answer=[gold]) == [answer_reward]
    assert math_steps_accuracy([completion], answer=[gold]) == [steps_reward]
    assert math_steps_accuracy([[{"role": "assistant", "content": completion}]], answer=[None]) == [None]


def test_false_steps_are_found_in_order():
    found = false_steps("1 + 1 = 3. 2 * 3 = 6. 10 - 4 = 5. 1.5 + 1 = 2.5.")
    assert [m.group(0) for m in found] == ["1 + 1 = 3", "10 - 4 = 5"]  # decimals are not read as steps


# Off the main thread math-verify cannot use SIGALRM; symbolic cases make sure math-verify itself runs there.
OFF_MAIN = (["\\boxed{\\frac{1}{2}}", "\\boxed{\\sqrt{2}/2}", "The answer is 3", "\\boxed{3}"],
            ["0.5", "\\frac{\\sqrt{2}}{2}", "3", "4"], [1.0, 1.0, 1.0, 0.0])


def _score_off_main(_):
    completions, golds, _expected = OFF_MAIN
    return math_accuracy(completions, answer=golds)


def test_works_from_threads():
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(_score_off_main, range(8)))
    assert threading.current_thread() is threading.main_thread()
    assert results == [OFF_MAIN[2]] * 8


def test_works_from_a_worker_process():
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:  # fresh interpreter
        assert list(pool.map(_score_off_main, range(2))) == [OFF_MAIN[2]] * 2
