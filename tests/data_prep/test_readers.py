"""data_prep.load: real public files, every supported format, and bad input under both policies."""

import gzip
import json

import pytest

from data_prep import DataError, SkipReport, detect_format, load
from data_prep.readers import gsm8k_final_answer
from tests.conftest import SHARED_DATA

HH = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
GSM8K = SHARED_DATA / "gsm8k" / "test.jsonl"
HUMANEVAL = SHARED_DATA / "humaneval" / "HumanEval.jsonl.gz"


def _need(path):
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared public data sits beside the repository in CI)")


def test_anthropic_hh_harmless_test_pairs():
    _need(HH)
    report = SkipReport()
    pairs = load(HH, kind="preferences", on_error="skip", report=report)
    # 2,312 pairs: 4 have an empty chosen reply, which are skipped and counted, never dropped silently
    assert len(pairs) + report.total_skipped == 2312
    assert report.skipped == {"chosen[0].content: empty": 4}
    assert all(p[-1]["role"] == "user" for p in pairs["prompt"])
    assert all(c[0]["role"] == "assistant" and r[0]["role"] == "assistant"
               for c, r in zip(pairs["chosen"], pairs["rejected"]))
    assert sum(len(p) > 1 for p in pairs["prompt"]) > 1000  # multi-turn prompts keep their history
    with pytest.raises(DataError, match=r"harmless-base-test\.jsonl\.gz:87: chosen\[0\]\.content: empty"):
        load(HH, kind="preferences")


def test_gsm8k_test_as_rl_prompts():
    _need(GSM8K)
    prompts = load(GSM8K, kind="rl_prompts")
    assert len(prompts) == 1319
    assert all(float(a) == float(a) for a in prompts["answer"])  # every answer is a number
    assert prompts[0]["answer"] == "18" and prompts[0]["domain"] == "math"


def test_humaneval_as_code_prompts():
    _need(HUMANEVAL)
    prompts = load(HUMANEVAL, kind="rl_prompts")
    assert len(prompts) == 164
    assert all(len(t) == 1 and "def check(candidate)" in t[0] for t in prompts["tests"])
    assert prompts[0]["entry_point"] == "has_close_elements" and prompts[0]["id"] == "HumanEval/0"
    assert all(p.startswith(("def", "from", "import")) or "def " in p for p in prompts["code_prefix"])


USER, REPLY = "What is 2 + 2?", "2 + 2 = 4."
FORMATS = [
    ("messages", {"messages": [{"role": "user", "content": USER}, {"role": "assistant", "content": REPLY}]}),
    ("sharegpt", {"conversations": [{"from": "human", "value": USER}, {"from": "gpt", "value": REPLY}]}),
    ("alpaca", {"instruction": USER, "input": "", "output": REPLY}),
    ("prompt_completion", {"prompt": USER, "completion": REPLY}),
    ("gsm8k", {"question": USER, "answer": "2 + 2 = <<2+2=4>>4.\n#### 4"}),
]


@pytest.mark.parametrize("fmt,record", FORMATS, ids=[f for f, _ in FORMATS])
def test_conversation_formats(tmp_path, fmt, record):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(record) + "\n")
    assert detect_format(record) == fmt
    row = load(path)[0]
    assert row["messages"][0] == {"role": "user", "content": USER}
    assert row["messages"][-1]["role"] == "assistant" and "4" in row["messages"][-1]["content"]
    assert row["id"] == f"{path}:1"


def test_stepwise_format_for_process_reward_models(tmp_path):
    path = tmp_path / "steps.jsonl"
    rows = [{"prompt": "What is 2 + 3 * 4?", "completions": ["3 * 4 = 12.", "2 + 12 = 15."], "labels": [True, False]},
            {"prompt": "x", "completions": ["a."], "labels": [True, False]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = SkipReport()
    data = load(path, kind="steps", on_error="skip", report=report)
    assert data[0]["labels"] == [True, False] and data[0]["prompt"][0]["role"] == "user"
    assert report.skipped == {"labels: completions and labels must be non-empty lists of equal length": 1}


def test_preference_and_rl_formats(tmp_path):
    pref = tmp_path / "pref.json"
    pref.write_text(json.dumps([{"prompt": USER, "chosen": REPLY, "rejected": "5", "domain": "math"}]))
    row = load(pref, kind="preferences")[0]
    assert row["prompt"] == [{"role": "user", "content": USER}] and row["rejected"][0]["content"] == "5"
    mbpp = tmp_path / "mbpp.jsonl.gz"
    with gzip.open(mbpp, "wt") as f:
        f.write(json.dumps({"text": "Add two numbers.", "test_list": ["assert add(1, 2) == 3"]}) + "\n")
    row = load(mbpp, kind="rl_prompts")[0]
    assert row["tests"] == ["assert add(1, 2) == 3"] and "assert add(1, 2) == 3" in row["prompt"][0]["content"]


GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
BAD_LINES = [
    # (line bytes, field named, reason)
    (b'{"messages": [{"role": "user", "content": "hi"}', None, "malformed JSON"),
    (json.dumps({"messages": [{"content": "hi"}]}).encode(), "messages[0].role", "missing"),
    (json.dumps({"messages": [{"role": "bot", "content": "hi"}]}).encode(), "messages[0].role", "unknown role"),
    (json.dumps({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}).encode(),
     "messages[0].content", "empty"),
    (json.dumps({"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "x"}]}).encode(),
     "messages[0].content", "expected a string"),
    ('{"messages": [{"role": "user", "content": "caf\u00e9"}]}'.encode("latin-1"), None, "invalid UTF-8"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(), "messages", "no assistant turn"),
]


@pytest.mark.parametrize("line,field,reason", BAD_LINES, ids=[r for _, _, r in BAD_LINES])
def test_bad_input_raises_naming_file_line_and_field(tmp_path, line, field, reason):
    path = tmp_path / "chat.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + line + b"\n" + GOOD.encode() + b"\n")
    with pytest.raises(DataError) as caught:
        load(path)
    assert caught.value.where == f"{path}:2" and caught.value.field == field
    assert reason in caught.value.reason
    assert f"chat.jsonl:2: " in str(caught.value)


def test_bad_input_skipped_and_every_row_counted(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_bytes(b"\n".join([GOOD.encode()] + [line for line, _, _ in BAD_LINES] + [GOOD.encode()]) + b"\n")
    report = SkipReport()
    data = load(path, on_error="skip", report=report)
    assert len(data) == 2 and report.kept == 2
    assert report.total_skipped == len(BAD_LINES)
    for _, field, reason in BAD_LINES:
        assert any(reason in key and (field is None or key.startswith(field)) for key in report.skipped), reason
    assert f"skipped {len(BAD_LINES)}" in report.summary()


def test_unknown_format_and_wrong_kind_are_explained(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"foo": 1}) + "\n")
    with pytest.raises(ValueError, match="cannot tell the format"):
        load(path)
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    with pytest.raises(ValueError, match="cannot give preferences"):
        load(path, kind="preferences")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load(tmp_path / "missing.jsonl")


def test_gsm8k_final_answer_strips_thousands_separators():
    assert gsm8k_final_answer("so 1,000 + 200 = 1,200\n#### 1,200") == "1200"
