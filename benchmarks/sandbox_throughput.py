"""Code-reward throughput: HumanEval's 164 canonical solutions scored by ours (``rewards.code_execution``: one jailed
child per completion, every test recorded through the nonce pipe) against the plain way, one unjailed
``python -c program+check`` subprocess per completion whose exit status is the verdict (what a quick script or
human-eval's harness without its guard does), in one process, on the same cores.

    python -m benchmarks.sandbox_throughput [--humaneval ../shared/data/humaneval/HumanEval.jsonl.gz] [--repeats 2]

Both run ``--workers`` completions at a time (default: every core). Ours splits a HumanEval ``check`` into one test
per assert (a fraction of tests passed, the GRPO reward); the plain way runs ``check`` once. Reported: completions/s
for each, the ratio (ours / plain: the price of the jail), and how many of the 164 each scored as passing (all).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import save

REPO = Path(__file__).resolve().parent.parent
HUMANEVAL = REPO.parent / "shared" / "data" / "humaneval" / "HumanEval.jsonl.gz"


def load(path: Path) -> list[dict]:
    if not path.exists():
        raise SystemExit(f"{path}: HumanEval not found; pass --humaneval PATH (HumanEval.jsonl.gz)")
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def ours(rows: list[dict], workers: int) -> tuple[float, int]:
    from rewards.code import CodeExecution

    start = time.perf_counter()
    rewards = CodeExecution(max_workers=workers)([r["prompt"] + r["canonical_solution"] for r in rows],
                                                 tests=[r["test"] for r in rows],
                                                 entry_point=[r["entry_point"] for r in rows])
    return time.perf_counter() - start, sum(x == 1.0 for x in rewards)


def plain(rows: list[dict], workers: int, timeout_s: float = 10.0) -> tuple[float, int]:
    def one(row) -> bool:
        program = f"{row['prompt']}{row['canonical_solution']}\n\n{row['test']}\n\ncheck({row['entry_point']})\n"
        try:
            done = subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        passed = sum(pool.map(one, rows))
    return time.perf_counter() - start, passed


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--humaneval", type=Path, default=HUMANEVAL)
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--repeats", type=int, default=2, help="timed passes of each (interleaved); the best counts")
    p.add_argument("--limit", type=int, default=None, help="first N problems only (a smoke run)")
    args = p.parse_args(argv)
    rows = load(args.humaneval)[: args.limit]
    from rewards.sandbox import isolation

    times = {"ours": [], "plain": []}
    passed = {}
    for _ in range(args.repeats):
        for name, fn in (("ours", ours), ("plain", plain)):
            seconds, passed[name] = fn(rows, args.workers)
            times[name].append(seconds)
    rate = {name: len(rows) / min(t) for name, t in times.items()}
    result = {"completions": len(rows), "workers": args.workers, "isolation": isolation(), "seconds": times,
              "completions_per_second": rate, "passed": passed, "ratio_vs_plain": rate["ours"] / rate["plain"]}
    text = "\n".join([
        f"HumanEval canonical solutions ({len(rows)}), {args.workers} at a time, isolation {result['isolation']!r}; "
        f"best of {args.repeats}", "",
        "| run | completions/s | passed | ratio |", "|---|---:|---:|---:|",
        f"| ours: jailed child, a record per test | {rate['ours']:.1f} | {passed['ours']}/{len(rows)} | "
        f"{result['ratio_vs_plain']:.2f}x |",
        f"| plain `python -c`, exit status | {rate['plain']:.1f} | {passed['plain']}/{len(rows)} | 1.00x |", ""])
    save("sandbox_throughput", result, text)
    return result


if __name__ == "__main__":
    main()
