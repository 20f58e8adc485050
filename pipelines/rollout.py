"""One GRPO step's rollout: prompts from the stage's datasets, G completions each (``pipelines/generation.py``),
scored by the stage's rewards (``rewards/``, weighted as in DeepSeek-V2 eq. 6), dynamic sampling (DAPO: groups
whose rewards all agree are dropped and refilled), and group-relative advantages (outcome or process supervision,
``grpo_loss.py``). With several processes each samples and scores a share of the groups; all gather them."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import gather_object
from datasets import concatenate_datasets, load_from_disk

import rewards
from rewards.combine import WeightedSum
from .generation import prompt_seed
from .grpo_loss import outcome_advantages, process_advantages


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


class Rollout:
    """A stage's prompt stream, rewards and sampling. ``fresh_pairs`` collects preference pairs from its groups for
    iterative RL's reward-model retraining (``labels_from``: the reward that ranks a group's completions)."""

    def __init__(self, name: str, cfg, data_dir: str, tokenizer, seed: int, accelerator):
        self.name, self.cfg, self.tokenizer, self.seed, self.accelerator = name, cfg, tokenizer, seed, accelerator
        self.source = PromptSource(Path(data_dir), cfg.prompts, tokenizer, seed)
        self.reward = build_reward(cfg.rewards)
        self.process_rm = (rewards.get("process_reward_model", path=cfg.process_reward_model)
                           if cfg.supervision == "process" else None)
        retrain = cfg.retrain_reward_model
        # the labels of the reward model's fresh pairs: the stage's own reward of that name when it has one (its
        # values are already computed), else that reward called on its own
        self.labels_from = retrain["labels_from"] if retrain else None
        self.labeller = (rewards.get(self.labels_from) if retrain and self.labels_from not in self.reward.rewards
                         else None)
        self.fresh_pairs: list[dict] = []

    def sample(self, generator, step: int) -> Batch:
        """Prompts for one step, G completions each, scored; with dynamic sampling, groups whose rewards all agree
        are dropped and refilled (in the last round too without ``fill_batch``; a step in which every group agreed
        then trains on its last round, whose advantages are all 0). With several processes, each samples and scores
        every N-th group of a round (its seed is the prompt's, not the process's) and all of them gather every group,
        so each process holds the same global batch, advantages and metrics as one process would."""
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
                seed=[prompt_seed(self.seed, self.name, step, round_, j) for j in mine]) if mine else None
            t_gen += time.perf_counter() - start
            start = time.perf_counter()
            local = self._score(samples, [picked[j] for j in mine], mine) if mine else []
            t_score += time.perf_counter() - start
            local_completions += len(mine) * G
            groups = sorted(gather_object(local), key=lambda g: g["index"])  # every process: every group
            for group in groups:
                sampled.append(group)
                if self.labels_from is not None:
                    self._collect_pairs(group)
                agree = max(group["rewards"]) - min(group["rewards"]) < 1e-9
                group["zero_variance"] = agree
                if agree and cfg.dynamic_sampling and (round_ < rounds - 1 or not cfg.fill_batch):
                    continue  # no signal: refill with fresh prompts
                kept.append(group)
            if len(kept) >= cfg.prompts_per_step:
                break
        if not kept:
            kept = groups
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
            "sampled_groups": len(sampled), "trained_groups": len(kept),
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
        columns["completion_ids"] = samples.completion_ids  # TRL's reward contract: token-level rewards need them
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
