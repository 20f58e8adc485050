"""``python -m eval RECIPE``: checkpoints × tasks, through the GRPO generation backends, into a report.

    make eval                                    # = python -m eval recipes/eval/tiny.yaml
    python -m eval recipes/eval/tiny.yaml --checkpoints sft=runs/sft/tiny rl=runs/grpo/tiny --backend vllm
    python -m eval recipes/eval/oracle.yaml      # reference answers as completions: checks the scorers on real data

Each checkpoint is loaded in turn; replies are drawn with the same generator GRPO samples with (``hf``: our
latent-cache ``generate``; ``vllm``: one colocated engine, re-synced for each checkpoint), greedily for math and
safety and ``code_samples`` at ``code_temperature`` for pass@k. Every reply is kept under
``OUTPUT/replies/<checkpoint>/<task>.jsonl`` with its score, so any number in the report can be traced and recomputed.
Replies come from the evaluation cache where SFT's or GRPO's checks already drew them for the same weights, prompts
and settings (``pipelines.quick_eval.replies``; ``from_cache`` in report.json lists them), so a checkpoint gets one
number per task whichever step scored it. The first checkpoint is the baseline of the deltas and RM win rates.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from pipelines import quick_eval
from pipelines.config import RecipeError, parse_recipe

from . import report as reporting
from .tasks import SCORERS, Task, file_task, heldout_task, perplexity, win_rates

logger = logging.getLogger("eval")
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."  # DeepSeekMath's
TASKS = ("math", "code", "safety", "perplexity", "rm_winrate", "gsm8k", "humaneval", "mbpp")


@dataclass
class EvalArguments:
    checkpoints: list[str] = field(default_factory=list, metadata={
        "help": "NAME=FOLDER entries in stage order (the first is the baseline); a folder alone is named after it"})
    data_dir: str = field(default="runs/data/tiny", metadata={"help": "a data_prep build (its heldout/ sets)"})
    output_dir: str = "runs/eval/tiny"
    tasks: list[str] = field(default_factory=lambda: ["math", "code", "safety", "perplexity", "rm_winrate"])
    math: int | None = field(default=None, metadata={"help": "held-out math prompts (first N; none: all)"})
    code: int | None = None
    safety: int | None = None
    perplexity: int = 300
    gsm8k: str | None = field(default=None, metadata={"help": "GSM8K-format file (task gsm8k)"})
    humaneval: str | None = field(default=None, metadata={"help": "HumanEval-format file (task humaneval)"})
    mbpp: str | None = field(default=None, metadata={"help": "MBPP-format file (task mbpp)"})
    benchmark_limit: int | None = field(default=None, metadata={"help": "first N rows of each benchmark file"})
    code_samples: int = 4
    code_temperature: float = 0.8
    pass_k: list[int] = field(default_factory=lambda: [1])
    reward_models: list[str] = field(default_factory=list, metadata={
        "help": "NAME=FOLDER reward models for rm_winrate, e.g. helpful=runs/rm/tiny/helpful"})
    runs: list[str] = field(default_factory=list, metadata={"help": "run folders whose curves are plotted"})
    backend: str = field(default="hf", metadata={"help": "generation: hf or vllm"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "for checkpoints that ship their own modeling code; reaches every loader and vLLM"})
    chat_template_path: str | None = field(default=None, metadata={
        "help": "replaces each checkpoint's chat template (chatml, deepseek, a .jinja file or the text)"})
    math_instruction: str | None = field(default=MATH_INSTRUCTION, metadata={
        "help": "appended (after a blank line) to every math benchmark question (task gsm8k); default DeepSeekMath's "
                "zero-shot prompt, as recipes/data/gsm8k.yaml asks in training; '' for the bare question"})
    batch_size: int = 64
    max_new_tokens: int = 96
    code_max_new_tokens: int = 128
    seed: int = 0
    oracle: bool = field(default=False, metadata={
        "help": "score each benchmark row's own reference reply instead of a model's (needs gsm8k/humaneval/mbpp)"})

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise RecipeError(f"tasks: unknown {unknown}; expected some of {TASKS}")
        for name in ("gsm8k", "humaneval", "mbpp"):
            if name in self.tasks and not getattr(self, name):
                raise RecipeError(f"task {name} needs the file: set {name}: PATH")
        if self.backend not in ("hf", "vllm"):
            raise RecipeError(f"backend={self.backend!r}: expected hf or vllm")


def named(entries: list[str], what: str) -> dict[str, str]:
    """``["sft=runs/sft/tiny", "runs/grpo/tiny"]`` -> {"sft": ..., "tiny": ...}; every folder must exist."""
    out = {}
    for entry in entries:
        name, _, path = entry.partition("=") if "=" in entry else (Path(entry).name, "", entry)
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{what} {name}: {path} is not a folder (train it first, or fix the path)")
        if name in out:
            raise RecipeError(f"{what}: the name {name!r} is given twice")
        out[name] = path
    return out


def build_tasks(args: EvalArguments) -> list[Task]:
    tasks = []
    for name in args.tasks:
        if name in ("math", "safety"):
            tasks.append(heldout_task(args.data_dir, name, getattr(args, name)))
        elif name == "code":
            tasks.append(heldout_task(args.data_dir, "code", args.code, args.code_samples))
        elif name == "gsm8k":
            tasks.append(file_task("gsm8k", args.gsm8k, "math", args.benchmark_limit,
                                   instruction=args.math_instruction))
        elif name in ("humaneval", "mbpp"):
            tasks.append(file_task(name, getattr(args, name), "code", args.benchmark_limit,
                                   1 if args.oracle else args.code_samples))
    return tasks


def draw(generator, tokenizer, task: Task, args: EvalArguments, weights: str) -> tuple[list[str], bool]:
    """Replies to every prompt of ``task`` (``task.samples`` each, adjacent), through the evaluation cache
    (``pipelines.quick_eval.replies``): a checkpoint SFT or GRPO already scored on the same prompts and settings is
    not generated again. Whether they came from the cache."""
    from pipelines.generation import SamplingSettings

    sampled = task.samples > 1
    settings = SamplingSettings(
        temperature=args.code_temperature if sampled else 0.0,
        max_new_tokens=args.code_max_new_tokens if task.kind == "code" else args.max_new_tokens)
    return quick_eval.replies(generator, tokenizer, task.rows["prompt"], settings, task.samples, args.seed,
                              weights=weights, task=task.name)


def _write_replies(path: Path, task: Task, replies: list[str], scores: list[float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    n, ids, prompts = task.samples, task.rows["id"], task.rows["prompt"]
    with path.open("w") as f:
        for j, (reply, value) in enumerate(zip(replies, scores)):
            f.write(json.dumps({"id": ids[j // n] or str(j // n), "prompt": prompts[j // n][-1]["content"],
                                "reply": reply, "score": value}) + "\n")


def oracle(args: EvalArguments, tasks: list[Task]) -> dict:
    """Each benchmark row's reference reply, scored as a model's reply would be."""
    results = {}
    for task in tasks:
        if task.references is None:
            raise RecipeError(f"oracle: task {task.name} has no reference replies (only GSM8K, HumanEval and MBPP "
                              f"files do)")
        replies = [r for r in task.references for _ in range(task.samples)]
        metrics, scores = SCORERS[task.kind](task, replies, *([args.pass_k] if task.kind == "code" else []))
        _write_replies(Path(args.output_dir) / "replies" / "oracle" / f"{task.name}.jsonl", task, replies, scores)
        results[task.name] = metrics
    return {"oracle": results}


def evaluate_checkpoints(args: EvalArguments, checkpoints: dict[str, str], tasks: list[Task]):
    from pipelines.generation import SamplingSettings, make_generator
    from pipelines.models import load_causal_lm, load_tokenizer
    from datasets import load_from_disk

    out = Path(args.output_dir)
    results, seconds, safety_replies, cached = {}, {}, {}, {}
    generator = None
    chat = None
    if "perplexity" in args.tasks:
        path = Path(args.data_dir) / "heldout" / "chat"
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no held-out conversations for perplexity; rebuild the data "
                                    f"(python -m data_prep build ...) or drop perplexity from tasks")
        data = load_from_disk(str(path))
        step = max(1, len(data) // args.perplexity)  # spread over every domain's rows
        chat = data.select(range(0, len(data), step))[: args.perplexity]["messages"]
    bar = tqdm(total=len(checkpoints) * (len(tasks) + (chat is not None)), desc="eval", unit="task")
    for name, path in checkpoints.items():
        tokenizer = load_tokenizer(path, args.chat_template_path, args.trust_remote_code)
        model = load_causal_lm(path, "float32", args.trust_remote_code, tokenizer, what=f"checkpoint {name}:")
        if generator is None:
            options = ({"batch_size": args.batch_size, "logprobs": False} if args.backend == "hf"
                       else {"trust_remote_code": args.trust_remote_code})
            generator = make_generator(args.backend, model, tokenizer, SamplingSettings(), checkpoint=path, **options)
        else:
            generator.tokenizer = tokenizer
            generator.sync(model)
        results[name], seconds[name], cached[name] = {}, {}, []
        weights = quick_eval.weights_digest(model)
        for task in tasks:
            bar.set_postfix_str(f"{name}/{task.name}")
            start = time.perf_counter()
            replies, hit = draw(generator, tokenizer, task, args, weights)
            if hit:
                cached[name].append(task.name)
            metrics, scores = SCORERS[task.kind](task, replies, *([args.pass_k] if task.kind == "code" else []))
            _write_replies(out / "replies" / name / f"{task.name}.jsonl", task, replies, scores)
            results[name][task.name] = metrics
            seconds[name][task.name] = round(time.perf_counter() - start, 1)
            if task.kind == "safety":
                safety_replies[name] = (task.rows["prompt"], replies)
            bar.update()
        if chat is not None:
            start = time.perf_counter()
            results[name]["perplexity"] = perplexity(model, tokenizer, chat, batch_size=args.batch_size // 2)
            seconds[name]["perplexity"] = round(time.perf_counter() - start, 1)
            bar.update()
        logger.info("%s: %s", name, json.dumps(results[name]))
        del model
    bar.close()
    return results, seconds, safety_replies, cached


def rm_win_rates(reward_models: dict[str, str], safety_replies: dict, baseline: str) -> dict:
    import rewards

    if not safety_replies:
        raise RecipeError("rm_winrate scores the replies to the held-out safety prompts: add safety to tasks")
    out = {}
    for rm_name, path in reward_models.items():
        scorer = rewards.get("reward_model", path=path)
        scores = {ckpt: scorer(prompts=list(prompts), completions=list(replies))
                  for ckpt, (prompts, replies) in safety_replies.items()}
        out[rm_name] = win_rates(scores, baseline)
    return out


def main(argv=None) -> dict:
    (args, recipe_path, recipe) = parse_recipe((EvalArguments,), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    start = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.oracle:
        if any(t not in ("gsm8k", "humaneval", "mbpp") for t in args.tasks):
            raise RecipeError("oracle mode scores benchmark files' reference replies: tasks may only be gsm8k, "
                              "humaneval, mbpp")
        tasks = build_tasks(args)
        checkpoints, results, seconds, rm = {"oracle": "reference replies"}, oracle(args, tasks), {}, {}
        cached = {}
    else:
        if not args.checkpoints:
            raise RecipeError("checkpoints: give at least one NAME=FOLDER")
        if "rm_winrate" in args.tasks and not args.reward_models:
            raise RecipeError("task rm_winrate needs reward_models: [NAME=FOLDER, ...]")
        checkpoints = named(args.checkpoints, "checkpoint")
        reward_models = named(args.reward_models, "reward model")  # checked before hours of generation
        tasks = build_tasks(args)
        results, seconds, safety_replies, cached = evaluate_checkpoints(args, checkpoints, tasks)
        rm = (rm_win_rates(reward_models, safety_replies, next(iter(checkpoints))) if "rm_winrate" in args.tasks
              else {})
    sources = {"gsm8k": args.gsm8k, "humaneval": args.humaneval, "mbpp": args.mbpp}
    report = {
        "checkpoints": checkpoints, "baseline": next(iter(checkpoints)), "oracle": args.oracle,
        "backend": args.backend, "recipe": recipe,
        "tasks": {t.name: {"kind": t.kind, "n": len(t.rows), "samples": t.samples,
                           "source": sources.get(t.name) or f"{args.data_dir}/heldout/{t.name}"} for t in tasks},
        "results": results, "rm_winrate": rm, "paper": reporting.PAPER,
    }
    if any("perplexity" in r for r in results.values()):
        report["tasks"]["perplexity"] = {"kind": "perplexity", "n": args.perplexity, "samples": 1,
                                         "source": f"{args.data_dir}/heldout/chat (reference replies)"}
    report["headline"] = reporting.headline(report)
    report["deltas"] = reporting.deltas(report["headline"], report["baseline"])
    plots = [reporting.plot_stages(report["headline"], out / "metrics_per_stage.png")]
    plots += reporting.plot_runs(args.runs, out)
    report["plots"] = [str(p) for p in plots if p]
    report["seconds"] = {"per_task": seconds, "total": round(time.perf_counter() - start, 1)}
    report["from_cache"] = cached  # per checkpoint, the tasks whose replies an earlier step had drawn
    (out / "report.json").write_text(json.dumps(report, indent=2))
    markdown = reporting.render_markdown(report)
    (out / "report.md").write_text(markdown)
    print(markdown)
    return report
