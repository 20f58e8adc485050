"""What ``share_prompts`` saves in GRPO's training pass: the tiny model's fwd + bwd over one mini-batch (8 groups
of 8 completions, 20-70 tokens each) with every row carrying its prompt (``sequence_logprobs``) against each
group's prompt computed once (``shared_prompt_logprobs``), for a short prompt (the tiny default's ~18 tokens) and a
long one (a few-shot or system prompt).

    python -m benchmarks.shared_prompts [--prompt-lengths 18 200] [--reps 5]

The two run alternately in one process on the same weights and batch; each figure is the fastest of ``--reps``.
"""

from __future__ import annotations

import argparse
import random
import time

from benchmarks import save


def measure(prompt_length: int, reps: int, groups: int = 8, group_size: int = 8) -> dict:
    import torch

    from modeling import DeepseekV2ForCausalLM, load_model_config
    from pipelines.grpo_loss import sequence_logprobs, shared_prompt_logprobs

    torch.manual_seed(0)
    rng = random.Random(0)
    model = DeepseekV2ForCausalLM(load_model_config("tiny", vocab_size=2048)).train()
    prompts, completions = [], []
    for _ in range(groups):
        prompt = [rng.randrange(3, 2048) for _ in range(rng.randint(prompt_length - 3, prompt_length + 3))]
        for _ in range(group_size):
            prompts.append(prompt)
            completions.append([rng.randrange(3, 2048) for _ in range(rng.randint(20, 70))])
    passes = {"padded rows": lambda: sequence_logprobs(model, prompts, completions, batch_size=len(prompts)),
              "shared prompts": lambda: shared_prompt_logprobs(model, prompts, completions)}
    times = {name: [] for name in passes}
    for _ in range(reps):
        for name, forward in passes.items():
            start = time.perf_counter()
            model.zero_grad(set_to_none=True)
            logp, mask, _, aux = forward()
            ((logp * mask).sum() / mask.sum() + aux).backward()
            times[name].append(time.perf_counter() - start)
    best = {name: min(t) for name, t in times.items()}
    return {"prompt_length": prompt_length, **best, "ratio": best["padded rows"] / best["shared prompts"]}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=[18, 200])
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    rows = [measure(n, args.reps) for n in args.prompt_lengths]
    lines = ["GRPO training pass (fwd + bwd), tiny model, fp32, 8 groups x 8 completions of 20-70 tokens",
             "", "| prompt tokens | padded rows (s) | shared prompts (s) | speed-up |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['prompt_length']} | {r['padded rows']:.2f} | {r['shared prompts']:.2f} | {r['ratio']:.2f}x |"
              for r in rows]
    save("shared_prompts", rows, "\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
