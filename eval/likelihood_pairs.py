"""The bar a reward model trained from a checkpoint should clear: how often the checkpoint's own log-likelihood
prefers the chosen reply of a preference pair over the rejected one (sum of the reply's token log-probs), per
domain, on the held-out pairs ``make rm``/``make rm-all`` score (the same split: ``eval_examples`` rows, seed 0).

    python -m eval.likelihood_pairs runs/sft/tiny --data_dir runs/data/tiny --reward_model reasoning
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from datasets import load_from_disk

from .tasks import reply_logprobs


def likelihood_pairs(checkpoint: str, data_dir: str, reward_model: str = "reasoning", eval_examples: int = 500,
                     seed: int = 0) -> dict:
    from pipelines.models import load_causal_lm, load_tokenizer

    data = load_from_disk(str(Path(data_dir) / "preferences" / reward_model))
    held_out = data.train_test_split(test_size=eval_examples, seed=seed)["test"]  # as pipelines/reward_model.py
    tokenizer = load_tokenizer(checkpoint)
    model = load_causal_lm(checkpoint, tokenizer=tokenizer).eval()
    right, count = Counter(), Counter(held_out["domain"])
    chosen = reply_logprobs(model, tokenizer, held_out["prompt"], held_out["chosen"])
    rejected = reply_logprobs(model, tokenizer, held_out["prompt"], held_out["rejected"])
    for domain, a, b in zip(held_out["domain"], chosen, rejected):
        right[domain] += sum(a) > sum(b)
    return {"pairs": len(held_out), "accuracy": sum(right.values()) / len(held_out),
            "by_domain": {d: round(right[d] / n, 4) for d, n in sorted(count.items())}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--data_dir", default="runs/data/tiny")
    p.add_argument("--reward_model", default="reasoning")
    p.add_argument("--eval_examples", type=int, default=500)
    a = p.parse_args(argv)
    result = likelihood_pairs(a.checkpoint, a.data_dir, a.reward_model, a.eval_examples)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
