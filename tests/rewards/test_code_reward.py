"""The code reward: code extraction, test formats, and HumanEval's canonical solutions end to end."""

import gzip
import json

import pytest

from rewards.code import build_program, code_execution, extract_code, humaneval_tests
from tests.conftest import SHARED_DATA

HUMANEVAL = SHARED_DATA / "humaneval" / "HumanEval.jsonl.gz"
HUMANEVAL_ROWS = 164
MIN_BROKEN_CAUGHT = 160  # of 164 `return None` bodies that must score below 1

# completion text, extracted code
EXTRACTION = [
    ("def f():\n    return 1\n", "def f():\n    return 1\n"),
    ("Here:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1\n"),
    ("```py\nx = 1\n```", "x = 1\n"),
    ("```\nuntagged = 1\n```", "untagged = 1\n"),
    ("```python\nshort = 1\n```\n```python\nlonger = 22222\n```\n```python\nf()\n```", "longer = 22222\n"),
    ("```python\na = 1\n```\n```python\nb = 2\n```", "b = 2\n"),  # ties go to the last
    ("```bash\npip install x\n```\n```python\nok = 1\n```", "ok = 1\n"),
    ("```python\ndef f():\n    return 1", "def f():\n    return 1"),  # truncated, unclosed fence
]


@pytest.mark.parametrize("text,code", EXTRACTION)
def test_extract_code(text, code):
    assert extract_code(text) == code


PROMPT = 'def add(a, b):\n    """Add."""\n'
# code, entry point, prefix, program
PROGRAMS = [
    ("x = 1", None, None, "x = 1"),
    ("    return a + b\n", "add", PROMPT, PROMPT + "    return a + b\n"),  # continues the prompt's body
    ("def add(a, b):\n    return a + b\n", "add", PROMPT, PROMPT + "\ndef add(a, b):\n    return a + b\n"),
    ("def add(a, b):\n    return a + b\n", "add", "Write add().", "def add(a, b):\n    return a + b\n"),
]


@pytest.mark.parametrize("code,entry_point,prefix,program", PROGRAMS)
def test_build_program(code, entry_point, prefix, program):
    assert build_program(code, entry_point, prefix) == program


def test_humaneval_check_splits_into_one_test_per_assert():
    test = ("import math\n\ndef check(candidate):\n    'doc'\n"
            "    assert candidate(1) == 2\n    assert candidate(2) == 3\n")
    assert humaneval_tests(test, "inc") == (
        "import math\n\ndef check(candidate):\n    assert candidate(1) == 2\n\ncheck(inc)\n",
        "import math\n\ndef check(candidate):\n    assert candidate(2) == 3\n\ncheck(inc)\n",
    )
    looped = "def check(candidate):\n    for i in range(3):\n        assert candidate(i) == i + 1\n"
    assert humaneval_tests(looped, "inc") == (looped + "\n\ncheck(inc)\n",)


ADD_TESTS = ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, -1) == -2", "assert add(2, 2) == 4"]
# completion, tests, reward
MBPP_STYLE = [
    ("```python\ndef add(a, b):\n    return a + b\n```", ADD_TESTS, 1.0),
    ("def add(a, b):\n    return a * b", ADD_TESTS, 0.5),  # 0 * 0 and 2 * 2 happen to pass
    ("def add(a, b) return", ADD_TESTS, 0.0),
    ("import sys\ndef add(a, b):\n    return a + b\nsys.exit(0)", ADD_TESTS, 0.0),
    ("def add(a, b):\n    return a + b", None, None),  # no tests: the reward does not apply
]


def test_mbpp_style_rows_in_one_batch():
    completions, tests, expected = zip(*MBPP_STYLE)
    assert code_execution(list(completions), tests=list(tests), prompts=["p"] * len(tests)) == list(expected)


def test_chat_completions_and_humaneval_continuation():
    test = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(2, 2) == 5\n"
    chat = [[{"role": "assistant", "content": "```python\ndef add(a, b):\n    return a + b\n```"}]]
    assert code_execution(chat, tests=[test], entry_point=["add"]) == [0.5]
    assert code_execution(["    return a + b\n"], tests=[test], entry_point=["add"], code_prefix=[PROMPT]) == [0.5]
    assert code_execution(["    return a + b\n"], tests=[test], entry_point=["add"], prompts=[PROMPT]) == [0.5]


def test_column_length_mismatch_says_which_column():
    with pytest.raises(ValueError, match="'entry_point'"):
        code_execution(["x"], tests=[["assert True"]], entry_point=["f", "g"])


@pytest.fixture(scope="module")
def humaneval():
    if not HUMANEVAL.exists():
        pytest.skip(f"HumanEval not found at {HUMANEVAL} (shared data not present on this machine)")
    with gzip.open(HUMANEVAL, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert len(rows) == HUMANEVAL_ROWS
    return rows


def test_humaneval_canonical_solutions_all_pass(humaneval):
    rewards = code_execution([row["prompt"] + row["canonical_solution"] for row in humaneval],
                             tests=[row["test"] for row in humaneval],
                             entry_point=[row["entry_point"] for row in humaneval])
    failing = [row["task_id"] for row, reward in zip(humaneval, rewards) if reward != 1.0]
    assert not failing, f"canonical solutions scored below 1: {failing}"


def test_humaneval_return_none_fails(humaneval):
    rewards = code_execution(["    return None\n"] * len(humaneval), tests=[row["test"] for row in humaneval],
                             entry_point=[row["entry_point"] for row in humaneval],
                             code_prefix=[row["prompt"] for row in humaneval])
    caught = sum(reward < 1.0 for reward in rewards)
    assert caught >= MIN_BROKEN_CAUGHT, f"only {caught} of {len(humaneval)} `return None` bodies scored below 1"


def test_humaneval_rows_loaded_by_data_prep_are_checked(humaneval):
    """``data_prep.load`` gives a HumanEval row's test program as a one-item list; it must still be run as
    ``check(entry_point)``, not as a bare source that only defines ``check`` (which anything would pass)."""
    from data_prep import load

    rows = load(HUMANEVAL, kind="rl_prompts")
    assert rows[0]["tests"] == [humaneval[0]["test"]]
    columns = dict(tests=rows["tests"], entry_point=rows["entry_point"], code_prefix=rows["code_prefix"])
    canonical = code_execution([row["canonical_solution"] for row in humaneval], **columns)
    assert all(reward == 1.0 for reward in canonical)
    broken = code_execution(["    return None\n"] * len(humaneval), **columns)
    assert sum(reward < 1.0 for reward in broken) >= MIN_BROKEN_CAUGHT


def test_sandbox_benchmark_scores_like_the_plain_way(humaneval, tmp_path, monkeypatch):
    """`make bench`'s sandbox section: ours and a plain subprocess each agree that canonical solutions pass."""
    from benchmarks import sandbox_throughput

    monkeypatch.setattr("benchmarks.RESULTS", tmp_path)  # keep make bench's own figures where they are
    result = sandbox_throughput.main(["--humaneval", str(HUMANEVAL), "--limit", "8", "--repeats", "1"])
    assert result["passed"] == {"ours": 8, "plain": 8}
    assert (tmp_path / "sandbox_throughput.json").exists()
    assert result["completions_per_second"]["ours"] > 0 and result["ratio_vs_plain"] > 0
