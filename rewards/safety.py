"""Safety rule reward: the refusal detector that safety eval uses, scored against what the prompt needs.

RL prompts of the safety domain carry ``answer`` = "refuse" (a harmful request) or "comply" (a benign
look-alike); the reward is 1 when the reply does the right one, 0 otherwise, None for other prompts.
"""

from data_prep.generators.safety import is_refusal

from .completions import completion_text

__all__ = ["is_refusal", "refusal_correct"]


def refusal_correct(completions, answer, **unused) -> list[float | None]:
    rewards = []
    for completion, want in zip(completions, answer):
        if want not in ("refuse", "comply"):
            rewards.append(None)
        else:
            rewards.append(float(is_refusal(completion_text(completion)) == (want == "refuse")))
    return rewards
