"""Iterative RL (DeepSeekMath Alg. 1): ``iterations > 1`` splits a stage's steps into iterations; at the end of each
``grpo.py`` resets the reference to the current policy and, with ``retrain_reward_model``, one of the stage's reward
models is trained further (TRL's ``RewardTrainer``, or SimPO's loss for an implicit RM, from its current weights) on
preference pairs from the iteration's own samples (within a group, the completion a verifiable reward scores highest
against the one it scores lowest; ``rollout.py`` collects them) plus a replay share (10% by default) of its earlier
pairs; the stage then scores with it."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from datasets import concatenate_datasets, load_from_disk

from .models import load_causal_lm, load_sequence_classifier, load_tokenizer
from .rollout import build_reward

logger = logging.getLogger("grpo")


def retrain_reward_model(rollout, args, stage_dir: Path, iteration: int) -> dict:
    """DeepSeekMath Alg. 1: continue training the reward model on this iteration's pairs plus a replay share of
    its earlier data, save it beside the stage's checkpoints, and score with it from now on."""
    from datasets import Dataset
    from transformers import AutoConfig
    from trl import RewardConfig, RewardTrainer

    from rewards.model import IMPLICIT_REWARD_BETA

    from .reward_model import simpo_trainer

    r = rollout.cfg.retrain_reward_model
    spec = next(s for s in rollout.cfg.rewards if s.get("name") == "reward_model" and s.get("label") == r["label"])
    columns = ["prompt", "chosen", "rejected"]
    earlier = load_from_disk(str(Path(args.data_dir) / "preferences" / r["replay_from"]))
    earlier = earlier.select_columns(columns)
    summary = {"reward_model_retrained": iteration, "fresh_pairs": len(rollout.fresh_pairs), "replay_pairs": 0}
    if not rollout.fresh_pairs:
        logger.warning("%s: iteration %d gave no pair with differing %s scores; %s not retrained", rollout.name,
                       iteration, r["labels_from"], r["label"])
        return summary
    fresh = Dataset.from_list(rollout.fresh_pairs).cast(earlier.features)
    replay = round(len(fresh) * float(r["replay"]) / (1 - float(r["replay"])))
    replay_rows = earlier.shuffle(seed=args.seed + iteration).select(range(min(replay, len(earlier))))
    train = concatenate_datasets([fresh, replay_rows]).shuffle(seed=args.seed)
    out = stage_dir / f"reward-model-iteration-{iteration}"
    tokenizer = load_tokenizer(spec["path"], trust_remote_code=args.trust_remote_code)
    config = RewardConfig(output_dir=str(out), learning_rate=float(r["learning_rate"]),
                          num_train_epochs=float(r["epochs"]), per_device_train_batch_size=int(r["batch_size"]),
                          save_strategy="no", report_to="none", logging_steps=10, seed=args.seed,
                          use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
    # the reward model goes on with the objective it was trained with: Bradley-Terry on its score head, or
    # SimPO's loss for an implicit reward model (make rm-all's reasoning RM objective: simpo; its beta is in its config)
    beta = getattr(AutoConfig.from_pretrained(spec["path"]), IMPLICIT_REWARD_BETA, None)
    if beta is None:
        model = load_sequence_classifier(spec["path"], "float32", args.trust_remote_code, tokenizer)
        trainer = RewardTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer)
    else:
        lm = load_causal_lm(spec["path"], "float32", args.trust_remote_code, tokenizer, what="reward model")
        trainer = simpo_trainer(lm, config, train, tokenizer,
                                beta, float(r["simpo_gamma"]))
    loss = trainer.train().training_loss
    trainer.save_model(str(out))
    tokenizer.save_pretrained(out)
    spec["path"] = str(out)
    rollout.reward = build_reward(rollout.cfg.rewards)
    rollout.fresh_pairs = []
    summary.update(replay_pairs=len(replay_rows), reward_model_loss=loss, reward_model_path=str(out))
    logger.info("%s: %s retrained on %d fresh + %d replayed pairs -> %s", rollout.name, r["label"], len(fresh),
                len(replay_rows), out)
    return summary
