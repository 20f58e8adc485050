"""Weighted reward combination (§4.2, eq. 6): r = c1 · RM_helpful + c2 · RM_safety + c3 · RM_rule.

``WeightedSum`` calls each reward once per batch, keeps each reward's values (``last_values``) and means for logging
(``last_metrics``),
and treats a ``None`` (a reward that does not apply to that row) as contributing nothing: the weights of the
rewards that did apply are used as they are, not renormalised, so a row is never scored higher for skipping.
"""

from __future__ import annotations

import math


class WeightedSum:
    def __init__(self, rewards: dict[str, tuple[callable, float]], name: str = "weighted_sum"):
        if not rewards:
            raise ValueError("WeightedSum needs at least one (reward, weight)")
        self.rewards = rewards
        self.__name__ = name
        self.last_metrics: dict[str, float] = {}
        self.last_values: dict[str, list] = {}

    def __call__(self, prompts=None, completions=None, **columns) -> list[float]:
        total = [0.0] * len(completions)
        self.last_metrics, self.last_values = {}, {}
        for name, (reward, weight) in self.rewards.items():
            values = reward(prompts=prompts, completions=completions, **columns)
            self.last_values[name] = values
            applied = [v for v in values if v is not None and not math.isnan(v)]
            if applied:
                self.last_metrics[f"{name}/mean"] = sum(applied) / len(applied)
            for i, v in enumerate(values):
                if v is not None and not math.isnan(v):
                    total[i] += weight * v
        return total
