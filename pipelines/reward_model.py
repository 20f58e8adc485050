"""Reward models (DeepSeek-V2 §4.2): reasoning, helpful and safety RMs, plus a process reward model.

What it does: for each reward model named in the recipe, initialise a sequence-classification model
from the SFT checkpoint (a fresh scalar head on the SFT trunk, as the paper does), train it on that RM's
preference pairs, report held-out pairwise accuracy, and save it where GRPO loads it by path
(``<output_dir>/<name>``). Then the process reward model is trained on step-labelled math solutions and its
held-out step accuracy reported.

Objectives (``objective``, or one reward model's own under ``per_model``):
  * ``pairwise``: Bradley-Terry on a fresh score head, TRL's ``RewardTrainer`` unchanged (the paper's RMs);
  * ``pointwise``: the paper's other loss, binary cross-entropy on the reply's score. TRL has no point-wise or
    process reward trainer, so ``pipelines/score_head_trainer.py`` holds that small part;
  * ``simpo``: an implicit reward model. The SFT causal LM itself is trained with SimPO's loss (TRL's
    ``CPOTrainer``, ``loss_type="simpo"``, no NLL term), so its reward is beta x the reply's mean token log-prob and
    needs no reference model. This departs from the paper; it is the tiny default's reasoning RM because a fresh
    score head has to relearn arithmetic and code semantics that the LM head already holds (see the README's
    reward-model section for the figures).
The paper's RMs are trained on DeepSeek's own preference data; ours come from ``data_prep``'s generators.

Launch:
  make rm                                                   # the tiny default, after make sft
  python -m pipelines.reward_model --config recipes/rm/tiny.yaml --learning_rate 1e-4
  python -m pipelines.reward_model --config recipes/rm/tiny.yaml --per_model '{"reasoning": {"objective": "pairwise"}}'
  accelerate launch --config_file recipes/accelerate/ddp.yaml -m pipelines.reward_model --config recipes/rm/X.yaml
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, load_from_disk
from transformers import TrainingArguments, set_seed
from trl import RewardConfig, RewardTrainer

from data_prep import ensure_built
from modeling import DeepseekV2ForCausalLM, DeepseekV2ForSequenceClassification, load_model_config
from rewards.model import RewardModelScorer

from .config import coerce, parse_recipe
from .models import LoraArguments, load_causal_lm, load_sequence_classifier, load_tokenizer, warn_if_bf16_is_emulated
from .score_head_trainer import (
    PositionCollator,
    ScoreHeadTrainer,
    pointwise_features,
    position_accuracy,
    process_features,
)

logger = logging.getLogger("reward_model")
OBJECTIVES = ("pairwise", "pointwise", "simpo")
PROCESS_RM_NAME = "process"
PAPER_RM_NAMES = ("reasoning", "helpful", "safety")  # the outcome RMs of §4.2


@dataclass
class RewardModelArguments(LoraArguments):  # LoRA: pairwise and simpo objectives
    data_dir: str = field(default="runs/data/tiny", metadata={"help": "a data_prep build (preferences/, process/)"})
    data_recipe: str | None = field(default=None, metadata={
        "help": "data_prep spec, built into data_dir when data_dir has no preferences/ yet"})
    init_from: str | None = field(default=None, metadata={
        "help": "SFT checkpoint, any causal LM (a fresh score head on its trunk); none: a fresh `model_config`"})
    model_config: str = field(default="tiny", metadata={"help": "used only without init_from"})
    reward_models: list[str] = field(default_factory=lambda: ["reasoning", "helpful", "safety"])
    objective: str = field(default="pairwise", metadata={"help": "pairwise (Bradley-Terry) or pointwise"})
    process_reward_model: bool = True
    max_train_examples: int | None = field(default=None, metadata={"help": "cap per reward model (pairs/solutions)"})
    eval_examples: int = 500
    simpo_beta: float = field(default=2.0, metadata={"help": "objective simpo: reward = beta x mean reply log-prob"})
    simpo_gamma: float = field(default=0.5, metadata={"help": "objective simpo: the target reward margin"})
    per_model: dict | str | None = field(default=None, metadata={
        "help": "one reward model's own settings, {name: {key: value}} with keys of this recipe (RewardModelArguments "
                "or RewardConfig), e.g. {reasoning: {objective: simpo, max_train_examples: 2000}}; as JSON on the "
                "command line"})

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r}; expected one of {OBJECTIVES}")
        if self.use_peft and (self.objective == "pointwise" or self.process_reward_model):
            raise ValueError("use_peft: LoRA is wired for the pairwise and simpo objectives; the pointwise and process "
                             "trainers (pipelines/score_head_trainer.py) train the whole model: set "
                             "process_reward_model false and objective pairwise or simpo, or use_peft false")
        ensure_built(self.data_dir, self.data_recipe, "preferences")
        if isinstance(self.per_model, str):
            try:
                self.per_model = json.loads(self.per_model) if self.per_model.strip() not in ("", "null") else None
            except json.JSONDecodeError as e:
                raise ValueError(f"per_model: expected a JSON mapping {{name: {{key: value}}}} ({e})") from e
        # settings of a reward model this run leaves out (--reward_models helpful) stay unused
        names = sorted({*self.reward_models, *PAPER_RM_NAMES, PROCESS_RM_NAME,
                        *(d.name for d in (Path(self.data_dir) / "preferences").iterdir() if d.is_dir())})
        for name, own in (self.per_model or {}).items():
            if name not in names:
                raise ValueError(f"per_model.{name}: not a reward model of this recipe or data ({', '.join(names)})")
            if not isinstance(own, dict):
                raise ValueError(f"per_model.{name}: expected a mapping of recipe keys to values, got {own!r}")
            if "per_model" in own:
                raise ValueError(f"per_model.{name}: per_model cannot be nested")


def for_model(name: str, args: RewardModelArguments, config: RewardConfig):
    """The arguments and training config of reward model ``name``: the recipe's, with its ``per_model`` keys."""
    own = dict((args.per_model or {}).get(name) or {})
    arg_keys = {f.name for f in dataclasses.fields(RewardModelArguments) if f.init}
    config_keys = {f.name for f in dataclasses.fields(RewardConfig) if f.init}
    for key in own:
        if key not in arg_keys | config_keys:
            close = difflib.get_close_matches(key, sorted(arg_keys | config_keys), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"per_model.{name}: unknown key {key!r}; {hint}keys are the fields of "
                             "RewardModelArguments and RewardConfig")
    args = dataclasses.replace(args, **coerce(RewardModelArguments, {k: v for k, v in own.items() if k in arg_keys}))
    config = dataclasses.replace(config, **coerce(RewardConfig, {k: v for k, v in own.items() if k not in arg_keys}))
    return args, config


def _split(data: Dataset, args: RewardModelArguments, seed: int) -> tuple[Dataset, Dataset]:
    parts = data.train_test_split(test_size=args.eval_examples, seed=seed)
    train = parts["train"]
    if args.max_train_examples is not None:
        train = train.select(range(min(len(train), args.max_train_examples)))
    return train, parts["test"]


def _init_model(args: RewardModelArguments, tokenizer, trust_remote_code: bool = False):
    if args.init_from:  # the checkpoint's own architecture with a scalar head (LlamaForSequenceClassification, ...)
        return load_sequence_classifier(args.init_from, "float32", trust_remote_code, tokenizer,
                                        what="init_from")
    config = load_model_config(args.model_config, vocab_size=len(tokenizer), num_labels=1,
                               pad_token_id=tokenizer.pad_token_id)
    return DeepseekV2ForSequenceClassification(config)


def _init_lm(args: RewardModelArguments, tokenizer, trust_remote_code: bool = False):
    if args.init_from:
        return load_causal_lm(args.init_from, "float32", trust_remote_code, tokenizer, what="init_from")
    return DeepseekV2ForCausalLM(load_model_config(args.model_config, vocab_size=len(tokenizer),
                                                   pad_token_id=tokenizer.pad_token_id))


def _sub_config(config: RewardConfig, name: str, **changes) -> RewardConfig:
    # chat_template_path was applied when the tokenizer was loaded (pipelines.models); TRL would apply it again
    return dataclasses.replace(config, output_dir=str(Path(config.output_dir) / name), run_name=name,
                               chat_template_path=None, **changes)


def pairwise_accuracy(path: str, data: Dataset, trust_remote_code: bool = False) -> tuple[float, dict[str, float]]:
    """The share of pairs whose chosen reply the reward model scores above the rejected one, overall and per
    domain of the pair (the reasoning RM's pairs come from math, code and reasoning)."""
    scorer = RewardModelScorer(path, trust_remote_code=trust_remote_code)
    chosen = scorer(prompts=data["prompt"], completions=data["chosen"])
    rejected = scorer(prompts=data["prompt"], completions=data["rejected"])
    right, count = Counter(), Counter(data["domain"])
    for c, r, domain in zip(chosen, rejected, data["domain"]):
        right[domain] += c > r
    return sum(right.values()) / len(data), {d: round(right[d] / n, 4) for d, n in sorted(count.items())}


def simpo_trainer(model, config: TrainingArguments, train: Dataset, tokenizer, beta: float, gamma: float,
                  peft_config=None):
    """TRL's CPOTrainer with SimPO's loss alone (cpo_alpha 0: no NLL term) on ``config``'s training settings; the
    trained causal LM is an implicit reward model (``rewards.model``) once saved with its beta in the config."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    shared.pop("accelerator_config", None)  # already an object here; CPOConfig builds its own from the default
    shared["remove_unused_columns"] = False  # CPO's collator reads its own tokenized columns
    cpo = CPOConfig(**shared, loss_type="simpo", cpo_alpha=0.0, beta=beta, simpo_gamma=gamma,
                    max_length=getattr(config, "max_length", None) or 1024,
                    disable_dropout=getattr(config, "disable_dropout", True))
    model.config.implicit_reward_beta = beta  # saved with the checkpoint: what makes the scorer read it as an RM
    return CPOTrainer(model=model, args=cpo, train_dataset=train.select_columns(["prompt", "chosen", "rejected"]),
                      processing_class=tokenizer, peft_config=peft_config)


def save_merged(trainer, out: str) -> None:
    """A plain checkpoint that the scorers (and stock transformers) load; with LoRA the adapter too, under adapter/."""
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model.save_pretrained(Path(out) / "adapter")
        model.merge_and_unload().save_pretrained(out)
    else:
        trainer.save_model(out)


def train_outcome_rm(name, args, config, tokenizer) -> dict:
    data = load_from_disk(str(Path(args.data_dir) / "preferences" / name))
    train, held_out = _split(data, args, config.seed)
    # our position-wise trainer needs its own columns kept
    sub = _sub_config(config, name, remove_unused_columns=args.objective == "pairwise")
    if args.objective == "simpo":
        trainer = simpo_trainer(_init_lm(args, tokenizer, config.trust_remote_code), sub, train, tokenizer,
                                args.simpo_beta, args.simpo_gamma,
                                args.lora_config("CAUSAL_LM") if args.use_peft else None)
    elif args.objective == "pairwise":
        model = _init_model(args, tokenizer, config.trust_remote_code)
        trainer = RewardTrainer(model=model, args=sub, train_dataset=train, processing_class=tokenizer,
                                peft_config=args.lora_config("SEQ_CLS") if args.use_peft else None)
    else:
        model = _init_model(args, tokenizer, config.trust_remote_code)
        rows = [pointwise_features(tokenizer, r["prompt"], reply[0]["content"], good)
                for r in train for reply, good in ((r["chosen"], True), (r["rejected"], False))]
        trainer = ScoreHeadTrainer(model=model, args=sub, train_dataset=Dataset.from_list(rows),
                                   data_collator=PositionCollator(tokenizer.pad_token_id))
    result = trainer.train()
    save_merged(trainer, sub.output_dir)
    tokenizer.save_pretrained(sub.output_dir)
    accuracy, by_domain = pairwise_accuracy(sub.output_dir, held_out, config.trust_remote_code)
    return {"objective": args.objective, "train_pairs": len(train), "held_out_pairs": len(held_out),
            "train_loss": result.training_loss, "pairwise_accuracy": accuracy,
            "pairwise_accuracy_by_domain": by_domain, "path": sub.output_dir}


def train_process_rm(args, config, tokenizer) -> dict:
    data = load_from_disk(str(Path(args.data_dir) / "process"))
    train, held_out = _split(data, args, config.seed)

    def features(rows):
        return Dataset.from_list([process_features(tokenizer, r["prompt"], r["completions"], r["labels"])
                                  for r in rows])

    collator = PositionCollator(tokenizer.pad_token_id)
    sub = _sub_config(config, PROCESS_RM_NAME, remove_unused_columns=False)
    trainer = ScoreHeadTrainer(model=_init_model(args, tokenizer, config.trust_remote_code), args=sub,
                               train_dataset=features(train), data_collator=collator)
    result = trainer.train()
    trainer.save_model(sub.output_dir)
    tokenizer.save_pretrained(sub.output_dir)
    accuracy = position_accuracy(trainer.model, features(held_out), collator)
    return {"train_solutions": len(train), "held_out_solutions": len(held_out), "train_loss": result.training_loss,
            "step_accuracy": accuracy, "path": sub.output_dir}


def main(argv=None):
    # 1. recipe + overrides, seed, logging
    args, config, _, _ = parse_recipe((RewardModelArguments, RewardConfig), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    warn_if_bf16_is_emulated(config.bf16)
    set_seed(config.seed)
    for name in args.per_model or {}:  # a typo fails now, before any training, also for an RM this run leaves out
        for_model(name, args, config)
    start = time.perf_counter()
    # 2. tokenizer: the SFT checkpoint's, or the data build's
    tokenizer = load_tokenizer(args.init_from or Path(args.data_dir) / "tokenizer", config.chat_template_path,
                               config.trust_remote_code)
    # 3. the outcome reward models, one after another
    metrics = {}
    for name in args.reward_models:
        began = time.perf_counter()
        metrics[name] = {**train_outcome_rm(name, *for_model(name, args, config), tokenizer),
                         "seconds": round(time.perf_counter() - began, 1)}
    # 4. the process reward model
    if args.process_reward_model:
        began = time.perf_counter()
        metrics[PROCESS_RM_NAME] = {**train_process_rm(*for_model(PROCESS_RM_NAME, args, config), tokenizer),
                                    "seconds": round(time.perf_counter() - began, 1)}
    # 5. report
    metrics["wall_seconds"] = round(time.perf_counter() - start, 1)
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(config.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    for name, m in metrics.items():
        if isinstance(m, dict):
            acc = m.get("pairwise_accuracy", m.get("step_accuracy"))
            logger.info("%-10s held-out %s accuracy %.3f  (%s)", name,
                        "step" if name == PROCESS_RM_NAME else "pairwise", acc, m["path"])
    logger.info("all reward models in %.0f s", metrics["wall_seconds"])
    return metrics


if __name__ == "__main__":
    main()
