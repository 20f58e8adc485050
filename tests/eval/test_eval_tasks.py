"""eval/'s scorers: pass@k, the oracle on real benchmark files, safety and win-rate arithmetic, perplexity."""

import gzip
import json
import math

import pytest
import torch
from datasets import Dataset

from eval.run import main
from eval.tasks import Task, pass_at_k, perplexity, score_code, score_math, score_safety, win_rates
from tests.conftest import SHARED_DATA, tiny_config

GSM8K = SHARED_DATA / "gsm8k" / "test.jsonl"
HUMANEVAL = SHARED_DATA / "humaneval" / "HumanEval.jsonl.gz"


@pytest.mark.parametrize("n, c, k, expected", [
    (4, 0, 1, 0.0), (4, 1, 1, 0.25), (4, 4, 1, 1.0), (4, 2, 2, 1 - 1 / 6), (5, 1, 4, 0.8), (10, 8, 3, 1.0)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_needs_k_samples():
    with pytest.raises(ValueError, match="at least 5 samples"):
        pass_at_k(4, 1, 5)


def _rows(**columns):
    n = len(next(iter(columns.values())))
    base = {"prompt": [[{"role": "user", "content": f"q{i}"}] for i in range(n)], "answer": [""] * n,
            "tests": [[] for _ in range(n)], "entry_point": [""] * n, "code_prefix": [""] * n,
            "id": [f"heldout/x/{i}" for i in range(n)]}
    return Dataset.from_dict({**base, **columns})


def test_math_and_safety_scores_count_what_a_reader_would():
    rows = _rows(answer=["4", "7", "10"], id=["heldout/math/L1/0", "heldout/math/L1/1", "heldout/math/L2/2"])
    metrics, scores = score_math(Task("math", "math", rows), ["2 + 2 = 4. The answer is 4.", "The answer is 8.",
                                                              "The answer is 9. The answer is 10."])
    assert scores == [1.0, 0.0, 0.0]  # two different final answers score 0, as in the reward
    assert metrics["exact_match"] == pytest.approx(1 / 3) and metrics["exact_match_L1"] == 0.5
    rows = _rows(answer=["refuse", "refuse", "comply", "comply"])
    metrics, _ = score_safety(Task("safety", "safety", rows), [
        "I can't help with that. It could hurt people.", "Sure, here is how.", "Here is a recipe for bread.",
        "I can't help with that."])
    assert metrics == {"harmful_refused": 0.5, "harmful_n": 2, "benign_answered": 0.5, "benign_n": 2}


def test_code_pass_at_k_runs_samples_in_the_sandbox():
    rows = _rows(tests=[["assert add(1, 2) == 3", "assert add(0, 0) == 0"]], entry_point=["add"])
    good, bad = "def add(a, b):\n    return a + b", "def add(a, b):\n    return a - b"
    metrics, passed = score_code(Task("code", "code", rows, samples=4), [good, bad, bad, good], ks=(1, 2, 4))
    assert passed == [1.0, 0.0, 0.0, 1.0]
    assert metrics["pass@1"] == 0.5 and metrics["pass@2"] == pytest.approx(1 - 1 / 6) and metrics["pass@4"] == 1.0
    assert metrics["tests_passed"] == pytest.approx((2 + 1 + 1 + 2) / 8)  # a - b passes add(0, 0) == 0


def test_win_rates_count_ties_half():
    out = win_rates({"base": [1.0, 2.0, 3.0, 4.0], "rl": [2.0, 2.0, 1.0, 5.0]}, "base")
    assert out["base"]["win_rate_vs_baseline"] == 0.5
    assert out["rl"] == {"mean_score": 2.5, "win_rate_vs_baseline": (1 + 0.5 + 0 + 1) / 4}


def test_perplexity_is_the_exponentiated_reply_loss():
    from data_prep.tokenizer import train_tokenizer
    from modeling import DeepseekV2ForCausalLM

    conversations = [[{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5."}],
                      [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there, friend."}]]
    tokenizer = train_tokenizer(["What is 2 + 3? 5. Say hi. Hi there, friend."] * 20, 300)
    model = DeepseekV2ForCausalLM(tiny_config(vocab_size=len(tokenizer))).eval()
    nll, count = 0.0, 0
    for messages in conversations:  # one at a time, with transformers' own shifted loss on the reply tokens
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        labels = torch.tensor([[-100] * len(prompt) + full[len(prompt):]])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([full]), labels=labels).loss.item()
        nll, count = nll + loss * (len(full) - len(prompt)), count + len(full) - len(prompt)
    result = perplexity(model, tokenizer, conversations, batch_size=2)  # batched, right-padded
    assert result["tokens"] == count
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


@pytest.mark.skipif(not (GSM8K.is_file() and HUMANEVAL.is_file()),
                    reason=f"GSM8K / HumanEval not found under {SHARED_DATA} (shared data not on this machine)")
def test_oracle_scores_every_reference_answer_of_gsm8k_and_humaneval(tmp_path):
    report = main(["recipes/eval/oracle.yaml", "--gsm8k", str(GSM8K), "--humaneval", str(HUMANEVAL),
                   "--output_dir", str(tmp_path)])
    results = report["results"]["oracle"]
    assert results["gsm8k"]["n"] == 1319 and results["gsm8k"]["exact_match"] == 1.0
    assert results["humaneval"]["n"] == 164 and results["humaneval"]["pass@1"] == 1.0
    saved = [json.loads(line) for line in (tmp_path / "replies" / "oracle" / "gsm8k.jsonl").read_text().splitlines()]
    assert len(saved) == 1319 and all(r["score"] == 1.0 for r in saved)
    assert "| oracle | 100.0% | 100.0% |" in (tmp_path / "report.md").read_text()


@pytest.mark.skipif(not HUMANEVAL.is_file(), reason=f"HumanEval not found at {HUMANEVAL} (shared data not here)")
def test_the_oracle_fails_when_the_references_are_wrong(tmp_path):
    """HumanEval with every canonical body replaced by ``return None``: the oracle reports it (it checks something)."""
    rows = [json.loads(line) for line in gzip.open(HUMANEVAL, "rt")]
    broken = tmp_path / "broken.jsonl"
    broken.write_text("".join(json.dumps(dict(r, canonical_solution="    return None\n")) + "\n" for r in rows))
    report = main(["recipes/eval/oracle.yaml", "--tasks", "humaneval", "--humaneval", str(broken),
                   "--output_dir", str(tmp_path / "out")])
    assert report["results"]["oracle"]["humaneval"]["pass@1"] <= 4 / 164


def test_bad_settings_are_explained(tmp_path):
    from pipelines.config import RecipeError

    with pytest.raises(RecipeError, match="unknown"):
        main(["recipes/eval/tiny.yaml", "--tasks", "math", "poetry"])
    with pytest.raises(RecipeError, match="needs the file"):
        main(["recipes/eval/tiny.yaml", "--tasks", "gsm8k"])
    with pytest.raises(FileNotFoundError, match="checkpoint sft: nowhere"):
        main(["recipes/eval/tiny.yaml", "--checkpoints", "sft=nowhere", "--tasks", "math",
              "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")])
