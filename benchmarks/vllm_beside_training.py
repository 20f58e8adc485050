"""What a colocated vLLM engine costs the training passes beside it: the tiny model's fwd + bwd timed before the
engine exists and right after each ``generate`` call (GRPO's pattern), with the engine in the trainer's process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, what ``VLLMGenerator`` sets) and in its own processes (vLLM's default).

    python -m benchmarks.vllm_beside_training [--reps 7]

Each mode runs in a fresh process (the variable is read when the engine starts); the ratio is that process's
median pass time after ``generate`` over its own median before the engine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import save

MODES = {"in_process": "0", "own_processes": "1"}


def measure(reps: int) -> dict:
    import torch

    from modeling import DeepseekV2ForCausalLM, load_model_config
    from pipelines.vllm_engine import make_llm

    torch.manual_seed(0)
    model = DeepseekV2ForCausalLM(load_model_config("tiny", vocab_size=4096)).train()
    ids = torch.randint(3, 4096, (8, 256))

    def step() -> float:
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        return time.perf_counter() - start

    step()  # warm-up
    before = statistics.median(step() for _ in range(reps))
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        llm = make_llm(folder, skip_tokenizer_init=True, seed=0, max_model_len=512)
        params = SamplingParams(temperature=0.8, max_tokens=32, seed=1, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=[5 + i, 17, 99, 300]) for i in range(8)]
        after = []
        for _ in range(reps):
            llm.generate(prompts, params, use_tqdm=False)
            after.append(step())
    return {"before_engine_s": before, "after_generate_s": statistics.median(after),
            "ratio": statistics.median(after) / before}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # one mode, in this process
    args = p.parse_args(argv)
    if args.measure:
        print("RESULT " + json.dumps(measure(args.reps)), flush=True)
        return {}
    results = {}
    for mode, flag in MODES.items():
        done = subprocess.run([sys.executable, "-m", "benchmarks.vllm_beside_training", "--measure", "--reps",
                               str(args.reps)], env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": flag},
                              capture_output=True, text=True, check=True)
        results[mode] = json.loads(next(line for line in done.stdout.splitlines()
                                        if line.startswith("RESULT "))[len("RESULT "):])
    text = ("Tiny model fwd + bwd (8 x 256) right after each vLLM `generate`, against the same process before the "
            f"engine existed (median of {args.reps})\n\n| vLLM engine | before (s) | after generate (s) | ratio |\n"
            "|---|---:|---:|---:|\n" + "".join(
                f"| {mode.replace('_', ' ')} | {r['before_engine_s']:.3f} | {r['after_generate_s']:.3f} | "
                f"{r['ratio']:.2f}x |\n" for mode, r in results.items()))
    save("vllm_beside_training", results, text)
    return results


if __name__ == "__main__":
    main()
