"""Where GRPO's gradient comes from: for each difficulty level of the held-out math set, the share of problems whose
G sampled replies disagree under a reward (a group that agrees gets zero advantage: no signal), the share all right,
all wrong, and the mean pass rate; then the share with some right reply over the held-out set's level mix (greedy
EM's ceiling if RL only sharpens). This is what chose the levels of GRPO's math prompts (recipes/data/tiny.yaml).

    python -m eval.group_signal runs/sft/tiny --data_dir runs/data/tiny --per_level 80 --group 8 --temperature 0.6

Sampling as GRPO samples (``pipelines.generation``, vllm or hf backend); the reward by name from ``rewards``.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

from datasets import load_from_disk

import rewards

from pipelines.quick_eval import level_of


def _levels(ids) -> list[tuple[int, str]]:
    """(row, "L<n>") for each held-out row id that names a level."""
    return [(i, level) for i, level in enumerate(map(level_of, ids)) if level]


def group_signal(checkpoint: str, data_dir: str, per_level: int = 80, group: int = 8, temperature: float = 0.6,
                 max_new_tokens: int = 112, reward: str = "math_steps_accuracy", backend: str = "vllm",
                 seed: int = 1) -> dict[str, dict]:
    from pipelines.generation import SamplingSettings, make_generator
    from pipelines.models import load_causal_lm, load_tokenizer

    data = load_from_disk(str(Path(data_dir) / "heldout" / "math"))
    by_level: dict[str, list[int]] = defaultdict(list)
    for i, level in _levels(data["id"]):
        if len(by_level[level]) < per_level:
            by_level[level].append(i)
    if not by_level:
        raise ValueError(f"{data_dir}/heldout/math: no row id names a level (expected ids like heldout/math/L3/0)")
    levels = sorted(by_level)
    rows = data.select([i for level in levels for i in by_level[level]])
    tokenizer = load_tokenizer(checkpoint)
    ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
           for p in rows["prompt"]]
    model = load_causal_lm(checkpoint, tokenizer=tokenizer)
    generator = make_generator(backend, model, tokenizer, SamplingSettings(temperature, 1.0, max_new_tokens),
                               checkpoint=checkpoint)
    samples = generator.generate(ids, group, seed=seed)
    scores = rewards.get(reward)(prompts=[rows["prompt"][i] for i in samples.prompt_index], completions=samples.texts,
                                 answer=[rows["answer"][i] for i in samples.prompt_index])
    out, start = {}, 0
    for level in levels:
        groups = [scores[(start + g) * group:(start + g + 1) * group] for g in range(len(by_level[level]))]
        start += len(groups)
        right = sum(all(s == 1 for s in g) for g in groups) / len(groups)
        wrong = sum(all(s == 0 for s in g) for g in groups) / len(groups)
        signal = sum(max(g) > min(g) for g in groups) / len(groups)
        out[level] = {"problems": len(groups), "signal": round(signal, 3), "all_right": round(right, 3),
                      "all_wrong": round(wrong, 3), "pass_rate": round(sum(map(sum, groups)) / (len(groups) * group), 3)}
    return out


def level_counts(data_dir: str) -> dict[str, int]:
    """How many problems of each level the whole held-out math set holds."""
    ids = load_from_disk(str(Path(data_dir) / "heldout" / "math"))["id"]
    return dict(Counter(level for _, level in _levels(ids)))


def pass_at_group(result: dict[str, dict], counts: dict[str, int]) -> float:
    """The share of held-out problems with at least one right reply among the G sampled, each level weighted by its
    count in the whole held-out set: what greedy EM would be if RL made every such problem right, so this minus the
    checkpoint's greedy EM is the most that sharpening (GRPO's gain without new solutions) can add."""
    total = sum(counts[level] for level in result)
    return sum(counts[level] * (1 - m["all_wrong"]) for level, m in result.items()) / total


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--data_dir", default="runs/data/tiny")
    p.add_argument("--per_level", type=int, default=80)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--max_new_tokens", type=int, default=112)
    p.add_argument("--reward", default="math_steps_accuracy")
    p.add_argument("--backend", default="vllm", choices=["vllm", "hf"])
    a = p.parse_args(argv)
    result = group_signal(a.checkpoint, a.data_dir, a.per_level, a.group, a.temperature, a.max_new_tokens, a.reward,
                          a.backend)
    for level, m in result.items():
        print(f"{level}: {m['problems']} problems, signal {m['signal']:.2f}, all right {m['all_right']:.2f}, "
              f"all wrong {m['all_wrong']:.2f}, pass rate {m['pass_rate']:.2f}")
    counts = level_counts(a.data_dir)
    print(f"some right reply among {a.group}, over the held-out set's level mix "
          f"({', '.join(f'{level} {counts[level]}' for level in result)}): "
          f"{100 * pass_at_group(result, counts):.1f}% (the ceiling of greedy EM for sharpening)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
