"""Where a GRPO training pass spends its time: ``torch.profiler`` over the policy's forward + backward on the GRPO
benchmark's batch shape (128 completions of 48 tokens after prompts of ~24), operators grouped into matmuls,
attention, MoE dispatch, and the rest.

    python -m benchmarks.profile_training [--completions 128] [--bf16]

Prints the grouped shares and the top operators by self CPU time, and writes benchmarks/results/profile_training.md.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import save
from modeling import DeepseekV2ForCausalLM, load_model_config

GROUPS = {  # operator name fragments -> group
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "_grouped_mm"),
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention"),
    "MoE routing / dispatch": ("topk", "sort", "index", "scatter", "gather", "argsort", "bincount", "histc"),
}


def group_of(name: str) -> str:
    for group, fragments in GROUPS.items():
        if any(f in name for f in fragments):
            return group
    return "other (elementwise, copies, norms, ...)"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--completions", type=int, default=128)
    p.add_argument("--length", type=int, default=72, help="prompt + completion tokens")
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = DeepseekV2ForCausalLM(load_model_config("tiny", vocab_size=2048)).train()
    ids = torch.randint(3, 2048, (args.completions, args.length))

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    groups: dict[str, float] = {}
    for e in events:
        groups[group_of(e.key)] = groups.get(group_of(e.key), 0.0) + e.self_cpu_time_total
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    lines = [f"Policy forward + backward, tiny model, {args.completions} x {args.length} tokens, "
             f"{'bf16 autocast' if args.bf16 else 'fp32'}: {total / 1e6:.2f} s of self CPU time", "",
             "| group | share |", "|---|---:|"]
    lines += [f"| {g} | {100 * t / total:.1f}% |" for g, t in sorted(groups.items(), key=lambda x: -x[1])]
    lines += ["", "| operator | self CPU ms | share | group |", "|---|---:|---:|---|"]
    lines += [f"| `{e.key}` | {e.self_cpu_time_total / 1e3:.0f} | {100 * e.self_cpu_time_total / total:.1f}% | "
              f"{group_of(e.key)} |" for e in top]
    result = {"total_s": total / 1e6, "groups": {g: t / total for g, t in groups.items()},
              "top": [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3} for e in top], "bf16": args.bf16}
    save("profile_training" + ("_bf16" if args.bf16 else ""), result, "\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
