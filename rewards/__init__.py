"""Reward functions for GRPO, by family: math (rewards.math), code (rewards.code, run in rewards.sandbox),
format and rule rewards (rewards.format), safety (rewards.safety), trained reward models (rewards.model), and
their weighted combination (rewards.combine). Each follows TRL's contract,
`reward(completions, **dataset_columns) -> list[float | None]` (None: this reward does not apply to that row).

    from rewards import get, available
    funcs = [get("math_accuracy"), get("length_penalty", max_length=4096, cache_length=512)]
    get("my_project.rewards:helpfulness")                  # anything importable, by dotted path

Names map to import paths and are imported on first use, so asking for a math reward never starts the
sandbox machinery. A name that points at a class is a factory: `get` builds it with the parameters.
"""

import importlib

_REGISTRY = {
    "math_accuracy": "rewards.math:math_accuracy",
    "math_steps_accuracy": "rewards.math:math_steps_accuracy",
    "code_execution": "rewards.code:CodeExecution",
    "chat_format": "rewards.format:chat_format",
    "answer_format": "rewards.format:AnswerFormat",
    "language_consistency": "rewards.format:LanguageConsistency",
    "repetition_penalty": "rewards.format:RepetitionPenalty",
    "length_penalty": "rewards.format:LengthPenalty",
    "refusal_correct": "rewards.safety:refusal_correct",
    "reward_model": "rewards.model:RewardModelScorer",
    "process_reward_model": "rewards.model:ProcessRewardScorer",
}


def available() -> list[str]:
    """The registered reward names."""
    return sorted(_REGISTRY)


def get(name: str, **params):
    """The reward called `name` (a registered name, or "package.module:attr" / "package.module.attr").
    Classes are instantiated with `params`; plain functions take none."""
    path = _REGISTRY.get(name, name)
    if path == name and "." not in name and ":" not in name:
        raise ValueError(f"unknown reward {name!r}; registered rewards are {', '.join(available())}, "
                         "or give an import path such as 'package.module:function'")
    target = _import(path, name)
    if isinstance(target, type):
        return target(**params)
    if params:
        raise ValueError(f"reward {name!r} is a plain function and takes no parameters (got {sorted(params)}); "
                         "drop them, or register a class that accepts them")
    if not callable(target):
        raise ValueError(f"reward {name!r} resolves to {path!r}, which is not callable")
    return target


def _import(path: str, name: str):
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"reward {name!r}: cannot import module {module_name!r} ({error}); check the path, "
                         f"or use one of {', '.join(available())}") from error
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"reward {name!r}: module {module_name!r} has no attribute {attr!r}") from None
