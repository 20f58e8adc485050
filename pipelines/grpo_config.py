"""GRPO's recipe fields: ``GRPOArguments`` (the run) and one ``StageConfig`` per stage (reasoning, preference), with
their checks, and the learning-rate schedule. Read by ``pipelines/grpo.py`` through TRL's parser (``config.py``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import rewards
from .config import RecipeError, coerce
from .grpo_loss import AGGREGATIONS
from .models import LoraArguments

RETRAIN_DEFAULTS = {"replay": 0.1, "learning_rate": 1e-4, "epochs": 1, "batch_size": 16, "simpo_gamma": 0.5}
BACKENDS = ("hf", "vllm", "vllm_server")
SCHEDULES = ("constant", "cosine")


@dataclass
class StageConfig:
    """One GRPO stage. Defaults are DeepSeekMath's where it gives a value (§4.1: lr 1e-6, β 0.04, G 64, μ 1)."""

    prompts: list[str] = field(default_factory=lambda: ["math"])  # datasets under data_dir/rl/
    rewards: list[dict] = field(default_factory=lambda: [{"name": "math_accuracy", "weight": 1.0}])
    supervision: str = "outcome"  # outcome | process (needs process_reward_model)
    process_reward_model: str | None = None  # a process RM folder (make rm-all) for process supervision
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
    loss_aggregation: str = "grpo"  # grpo (per-sequence mean) | token (DAPO) | dr_grpo | gspo (sequence ratio)
    scale_rewards: bool = True  # divide by the group std (Dr. GRPO: false)
    dynamic_sampling: bool = True
    max_sampling_rounds: int = 3
    # dynamic sampling's last round: its groups train whether or not they agree, so that every step trains on
    # prompts_per_step groups (true); or groups that agree never train, as in DAPO, and a step short of groups after
    # its last round trains on fewer (false: less training time, every trained group has a signal)
    fill_batch: bool = True
    mini_batch_size: int = 64  # completions per forward/backward
    share_prompts: bool = True  # a group's prompt computed once in the training passes, not once per completion
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
            raise RecipeError(f"{name}: process supervision needs process_reward_model (a folder from make rm-all)")
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
    fsdp: bool = field(default=False, metadata={
        "help": "FSDP2 under `accelerate launch --multi_gpu --num_processes N`: the policy, its gradients and "
                "optimizer state, and the reference split over the N processes (torch fully_shard per decoder "
                "layer; gloo on CPUs); off: DDP, each process holds all of them"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each decoder layer's activations in the backward (less memory, ~1.3x the time)"})
    bf16: bool = field(default=False, metadata={
        "help": "bf16 autocast for the policy and reference forward/backward (the sampler stays as it is; the "
                "truncated importance weight corrects the larger sampler/trainer gap)"})
    seed: int = 0
    logging_steps: int = 1
    save_steps: int = 25
    eval_math: int = 2000
    eval_safety: int | None = None
    eval_safety_rm: str | None = field(default="rm_safety", metadata={
        "help": "label of the reward_model entry whose mean score of the greedy replies to held-out harmful prompts "
                "the checks report (none in the stages: not scored)"})
    eval_batch_size: int = 128
    eval_max_new_tokens: int = 64
    resume: bool = True

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise RecipeError(f"backend={self.backend!r}: expected one of {BACKENDS}")
        if self.backend == "vllm_server" and not self.vllm_server_url:
            raise RecipeError("backend=vllm_server needs vllm_server_url (start the server with python -m "
                              "pipelines.vllm_serve --model <policy folder> --port <port>)")



def lr_factor(cfg: StageConfig, step: int) -> float:
    """The learning-rate multiplier after ``step`` optimizer steps: linear warmup, then constant or a cosine to 0.
    The SFT checkpoint ends annealed (its own cosine reaches ~0); RL at a constant rate moves it out of that basin,
    and a decay lets the RL policy settle again before it is saved and evaluated."""
    warmup = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    if cfg.lr_scheduler_type == "cosine":
        return warmup * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, cfg.max_steps * cfg.num_iterations))))
    return warmup


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


def find_safety_rm(stages: dict[str, StageConfig], label: str | None) -> str | None:
    """The path of the reward_model entry labelled ``label`` (the recipe's ``eval_safety_rm``), in any stage."""
    for cfg in stages.values():
        for spec in cfg.rewards:
            if label and spec.get("name") == "reward_model" and spec.get("label") == label:
                return spec["path"]
    return None
