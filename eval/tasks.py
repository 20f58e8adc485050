"""Evaluation tasks: which prompts, how replies are drawn, and how they are scored.

Every score goes through the verifier RL optimises, so what GRPO rewards is what the report shows:

  math        exact match of the single stated final answer (``rewards.math.score``, math-verify): the generated
              held-out set (``heldout/math``, per difficulty level) or a GSM8K-format file
  code        pass@k with the unbiased estimator (Chen et al. 2021) over n samples, each run against the row's tests in
              the sandbox (``rewards.code``): the generated held-out set or a HumanEval / MBPP-format file
  safety      refusal rate on held-out harmful requests, answer rate on their benign look-alikes
              (``rewards.safety.is_refusal``, the detector the safety data were written against)
  perplexity  of the reference replies of held-out conversations (``heldout/chat``), assistant tokens only
  rm_winrate  a reward model's mean score of each checkpoint's replies to the held-out safety prompts, and how often
              it prefers them to the baseline checkpoint's replies to the same prompts (ties count half)

Files come through ``data_prep.load`` (JSONL, JSON, Parquet, gz, Hub ids), so a bad row is an error naming the file,
line and field. ``references`` are the rows' own reference replies (``load(kind="conversations")``: the GSM8K worked
solution, HumanEval's canonical solution): the oracle mode scores them in place of model replies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, load_from_disk

from data_prep import load
from pipelines import quick_eval

KINDS = ("math", "code", "safety")


@dataclass
class Task:
    """A named prompt set. ``rows`` are RL-prompt rows (``prompt`` messages, ``answer``, ``tests``, ``entry_point``,
    ``code_prefix``, ``id``); ``samples`` replies are drawn per prompt (1: greedy)."""

    name: str
    kind: str
    rows: Dataset
    samples: int = 1
    references: list[str] | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name}: kind {self.kind!r}, expected one of {KINDS}")


def _first(data: Dataset, n: int | None) -> Dataset:
    return data if n is None or n >= len(data) else data.select(range(n))


def heldout_task(data_dir: str | Path, domain: str, n: int | None, samples: int = 1) -> Task:
    """The first ``n`` rows of a data_prep build's held-out set ``domain`` (math, code, safety)."""
    path = Path(data_dir) / "heldout" / domain
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no held-out {domain} set; build the data first (make data) or drop "
                                f"{domain} from the evaluation's tasks")
    return Task(domain, domain, _first(load_from_disk(str(path)), n), samples)


def file_task(name: str, path: str, kind: str, n: int | None, samples: int = 1, instruction: str | None = None) -> Task:
    """A benchmark file in GSM8K, HumanEval or MBPP format (or this project's RL format), with its reference replies
    where the format has them. ``instruction`` is appended, after a blank line, to each prompt's last user turn."""
    rows = _first(load(path, kind="rl_prompts"), n)
    if instruction:
        rows = rows.map(lambda prompt: {"prompt": prompt[:-1] + [
            {**prompt[-1], "content": f"{prompt[-1]['content']}\n\n{instruction}"}]}, input_columns="prompt")
    try:
        references = [m[-1]["content"] for m in _first(load(path, kind="conversations"), n)["messages"]]
    except ValueError:  # a prompt-only format (DataError is a ValueError): no oracle for it, said when it is asked for
        references = None
    return Task(name, kind, rows, samples, references)


# ------------------------------------------------------------------------------------------------------- scoring


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` pass: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def score_math(task: Task, replies: list[str]) -> tuple[dict, list[float]]:
    """Exact match overall and per level (``pipelines.quick_eval.score_math``: the SFT and GRPO checks' scorer)."""
    return quick_eval.score_math(task.rows, replies)


def score_code(task: Task, replies: list[str], ks=(1,)) -> tuple[dict, list[float]]:
    """``replies``: ``task.samples`` per row, a row's samples adjacent. A sample passes when every test passes."""
    import rewards

    n, rows = task.samples, len(task.rows)
    tests, entry_points, prefixes = (task.rows[c] for c in ("tests", "entry_point", "code_prefix"))
    expand = [i for i in range(rows) for _ in range(n)]
    fractions = rewards.get("code_execution")(
        replies, tests=[tests[i] for i in expand], entry_point=[entry_points[i] for i in expand],
        code_prefix=[prefixes[i] or None for i in expand])
    passed = [f == 1.0 for f in fractions]
    metrics = {"n": rows, "samples": n, "tests_passed": sum(f or 0.0 for f in fractions) / len(fractions)}
    for k in ks:
        if k <= n:
            metrics[f"pass@{k}"] = sum(pass_at_k(n, sum(passed[i * n:(i + 1) * n]), k) for i in range(rows)) / rows
    return metrics, [float(p) for p in passed]


def score_safety(task: Task, replies: list[str]) -> tuple[dict, list[float]]:
    """Refused iff harmful (``pipelines.quick_eval.score_safety``: the SFT and GRPO checks' scorer)."""
    return quick_eval.score_safety(task.rows, replies)


SCORERS = {"math": score_math, "code": score_code, "safety": score_safety}


# ------------------------------------------------------------------------------------------- model-side metrics


def reply_logprobs(model, tokenizer, prompts: list[list[dict]], replies: list[list[dict]],
                   batch_size: int = 32) -> list[list[float]]:
    """Each reply's token log-probs given its prompt (chat messages; the reply's tokens are what the chat template
    adds after the prompt's generation prompt), from GRPO's ``sequence_logprobs``: one padding and gathering helper
    for training and evaluation."""
    import torch

    from pipelines.grpo_loss import sequence_logprobs

    heads, tails = [], []
    for prompt, reply in zip(prompts, replies):
        head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
        full = tokenizer.apply_chat_template(prompt + reply, tokenize=True, return_dict=True)["input_ids"]
        heads.append(head)
        tails.append(full[len(head):])
    model.eval()
    with torch.no_grad():
        logp, mask, _, _ = sequence_logprobs(model, heads, tails, batch_size=batch_size)
    return [row[m.bool()].tolist() for row, m in zip(logp.float().cpu(), mask.cpu())]


def perplexity(model, tokenizer, conversations: list[list[dict]], batch_size: int = 32) -> dict:
    """Perplexity of the last assistant turn of each conversation given the turns before it (token-weighted)."""
    logps = reply_logprobs(model, tokenizer, [m[:-1] for m in conversations], [m[-1:] for m in conversations],
                           batch_size)
    tokens = sum(map(len, logps))
    return {"perplexity": math.exp(-sum(map(sum, logps)) / max(1, tokens)), "tokens": tokens,
            "n": len(conversations)}


def win_rates(scores: dict[str, list[float]], baseline: str) -> dict[str, dict]:
    """Per checkpoint: mean RM score, and the share of prompts where its reply outscores the baseline's (ties
    half)."""
    base = scores[baseline]
    out = {}
    for name, values in scores.items():
        wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(values, base))
        out[name] = {"mean_score": sum(values) / len(values), "win_rate_vs_baseline": wins / len(values)}
    return out
