"""Reward models (DeepSeek-V2 §4.2): reasoning, helpful and safety RMs, plus a process reward model.

What it does: for each reward model named in the recipe, initialise a ``DeepseekV2ForSequenceClassification``
from the SFT checkpoint (a fresh scalar head on the SFT trunk, as the paper does), train it on that RM's
preference pairs, report held-out pairwise accuracy, and save it where GRPO loads it by path
(``<output_dir>/<name>``). Then the process reward model is trained on step-labelled math solutions and its
held-out step accuracy reported.

How it departs from the paper: pairwise (Bradley-Terry) training uses TRL's ``RewardTrainer`` unchanged; the
paper also trains point-wise, available here as ``objective: pointwise`` (binary loss on the reply's score).
TRL has no process or point-wise reward trainer, so ``pipelines/score_head_trainer.py`` holds that small part.
The paper's RMs are trained on DeepSeek's own preference data; ours come from ``data_prep``'s generators.

Launch:
  make rm                                                   # the tiny default, after make sft
  python -m pipelines.reward_model --config recipes/rm/tiny.yaml --learning_rate 1e-4
  accelerate launch --config_file recipes/accelerate/ddp.yaml -m pipelines.reward_model --config recipes/rm/X.yaml
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, load_from_disk
from transformers import set_seed
from trl import RewardConfig, RewardTrainer, TrlParser

from data_prep.tokenizer import load_tokenizer
from modeling import DeepseekV2ForSequenceClassification, load_model_config
from rewards.model import RewardModelScorer

from .score_head_trainer import (
    PositionCollator,
    ScoreHeadTrainer,
    pointwise_features,
    position_accuracy,
    process_features,
)

logger = logging.getLogger("reward_model")
OBJECTIVES = ("pairwise", "pointwise")
PROCESS_RM_NAME = "process"


@dataclass
class RewardModelArguments:
    data_dir: str = field(default="runs/data/tiny", metadata={"help": "a data_prep build (preferences/, process/)"})
    init_from: str | None = field(default=None, metadata={"help": "SFT checkpoint; none: a fresh `model_config`"})
    model_config: str = field(default="tiny", metadata={"help": "used only without init_from"})
    reward_models: list[str] = field(default_factory=lambda: ["reasoning", "helpful", "safety"])
    objective: str = field(default="pairwise", metadata={"help": "pairwise (Bradley-Terry) or pointwise"})
    process_reward_model: bool = True
    max_train_examples: int | None = field(default=None, metadata={"help": "cap per reward model (pairs/solutions)"})
    eval_examples: int = 500

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r}; expected one of {OBJECTIVES}")
        if not (Path(self.data_dir) / "preferences").exists():
            raise FileNotFoundError(f"data_dir={self.data_dir!r} has no preferences/; run `make data` first")


def _split(data: Dataset, args: RewardModelArguments, seed: int) -> tuple[Dataset, Dataset]:
    parts = data.train_test_split(test_size=args.eval_examples, seed=seed)
    train = parts["train"]
    if args.max_train_examples is not None:
        train = train.select(range(min(len(train), args.max_train_examples)))
    return train, parts["test"]


def _init_model(args: RewardModelArguments, tokenizer):
    if args.init_from:
        return DeepseekV2ForSequenceClassification.from_pretrained(args.init_from, num_labels=1)
    config = load_model_config(args.model_config, vocab_size=len(tokenizer), num_labels=1,
                               pad_token_id=tokenizer.pad_token_id)
    return DeepseekV2ForSequenceClassification(config)


def _sub_config(config: RewardConfig, name: str, **changes) -> RewardConfig:
    return dataclasses.replace(config, output_dir=str(Path(config.output_dir) / name), run_name=name, **changes)


def pairwise_accuracy(path: str, data: Dataset) -> tuple[float, dict[str, float]]:
    """The share of pairs whose chosen reply the reward model scores above the rejected one, overall and per
    domain of the pair (the reasoning RM's pairs come from math, code and reasoning)."""
    scorer = RewardModelScorer(path)
    chosen = scorer(prompts=data["prompt"], completions=data["chosen"])
    rejected = scorer(prompts=data["prompt"], completions=data["rejected"])
    right, count = Counter(), Counter(data["domain"])
    for c, r, domain in zip(chosen, rejected, data["domain"]):
        right[domain] += c > r
    return sum(right.values()) / len(data), {d: round(right[d] / n, 4) for d, n in sorted(count.items())}


def train_outcome_rm(name, args, config, tokenizer) -> dict:
    data = load_from_disk(str(Path(args.data_dir) / "preferences" / name))
    train, held_out = _split(data, args, config.seed)
    model = _init_model(args, tokenizer)
    # our position-wise trainer needs its own columns kept
    sub = _sub_config(config, name, remove_unused_columns=args.objective == "pairwise")
    if args.objective == "pairwise":
        trainer = RewardTrainer(model=model, args=sub, train_dataset=train, processing_class=tokenizer)
    else:
        rows = [pointwise_features(tokenizer, r["prompt"], reply[0]["content"], good)
                for r in train for reply, good in ((r["chosen"], True), (r["rejected"], False))]
        trainer = ScoreHeadTrainer(model=model, args=sub, train_dataset=Dataset.from_list(rows),
                                   data_collator=PositionCollator(tokenizer.pad_token_id))
    result = trainer.train()
    trainer.save_model(sub.output_dir)
    tokenizer.save_pretrained(sub.output_dir)
    accuracy, by_domain = pairwise_accuracy(sub.output_dir, held_out)
    return {"train_pairs": len(train), "held_out_pairs": len(held_out), "train_loss": result.training_loss,
            "pairwise_accuracy": accuracy, "pairwise_accuracy_by_domain": by_domain, "path": sub.output_dir}


def train_process_rm(args, config, tokenizer) -> dict:
    data = load_from_disk(str(Path(args.data_dir) / "process"))
    train, held_out = _split(data, args, config.seed)

    def features(rows):
        return Dataset.from_list([process_features(tokenizer, r["prompt"], r["completions"], r["labels"])
                                  for r in rows])

    collator = PositionCollator(tokenizer.pad_token_id)
    sub = _sub_config(config, PROCESS_RM_NAME, remove_unused_columns=False)
    trainer = ScoreHeadTrainer(model=_init_model(args, tokenizer), args=sub, train_dataset=features(train),
                               data_collator=collator)
    result = trainer.train()
    trainer.save_model(sub.output_dir)
    tokenizer.save_pretrained(sub.output_dir)
    accuracy = position_accuracy(trainer.model, features(held_out), collator)
    return {"train_solutions": len(train), "held_out_solutions": len(held_out), "train_loss": result.training_loss,
            "step_accuracy": accuracy, "path": sub.output_dir}


def main(argv=None):
    # 1. recipe + overrides, seed, logging
    args, config = TrlParser((RewardModelArguments, RewardConfig)).parse_args_and_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    set_seed(config.seed)
    start = time.perf_counter()
    # 2. tokenizer: the SFT checkpoint's, or the data build's
    tokenizer = load_tokenizer(args.init_from or Path(args.data_dir) / "tokenizer")
    # 3. the outcome reward models, one after another
    metrics = {}
    for name in args.reward_models:
        began = time.perf_counter()
        metrics[name] = {**train_outcome_rm(name, args, config, tokenizer),
                         "seconds": round(time.perf_counter() - began, 1)}
    # 4. the process reward model
    if args.process_reward_model:
        began = time.perf_counter()
        metrics[PROCESS_RM_NAME] = {**train_process_rm(args, config, tokenizer),
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
