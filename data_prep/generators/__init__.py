"""Generators written by this project for every domain of the SFT mixture (§4.1), with checkable answers.

Each domain module exposes ``sample(rng) -> Example``. One ``Example`` yields a conversation for SFT, an RL
prompt (where the answer can be verified), and preference pairs for the reward models of §4.2 (``rejected``
is a plausible but wrong, unhelpful or unsafe reply). Everything is a deterministic function of the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

DOMAINS = ("math", "code", "reasoning", "writing", "general", "safety")


@dataclass
class Example:
    domain: str
    prompt: str  # the user turn
    response: str  # the reference assistant turn
    rejected: str | None = None  # a worse reply, for preference pairs
    rejected_kind: str = "reasoning"  # which reward model the pair trains: reasoning | helpful | safety
    answer: str = ""  # verifiable final answer (math, reasoning)
    tests: list[str] = field(default_factory=list)  # asserts (code)
    entry_point: str = ""
    difficulty: int = 0
    harmful: bool | None = None  # safety only: True for harmful requests, False for benign look-alikes
    steps: list[str] = field(default_factory=list)  # math only: ``rejected`` split into steps ...
    step_labels: list[bool] = field(default_factory=list)  # ... and whether each step is right (process labels)
    system: str = ""


def generator(domain: str, **params):
    """The ``sample(rng) -> Example`` function of a domain; ``params`` (a data recipe's ``generators.<domain>``) are
    passed to it on every call."""
    import functools
    import inspect

    from . import code, general, math, reasoning, safety, writing

    table = {"math": math.sample, "code": code.sample, "reasoning": reasoning.sample, "writing": writing.sample,
             "general": general.sample, "safety": safety.sample}
    if domain not in table:
        raise ValueError(f"unknown generator {domain!r}; known: {sorted(table)}")
    if not params:
        return table[domain]
    accepted = set(inspect.signature(table[domain]).parameters) - {"rng"}
    unknown = set(params) - accepted
    if unknown:
        raise ValueError(f"generator {domain!r} takes no parameter {sorted(unknown)}; it takes {sorted(accepted)}")
    return functools.partial(table[domain], **params)


def pick(rng: random.Random, options):
    return options[rng.randrange(len(options))]


# Ways people open and close a request; they multiply the distinct prompts of the small templated domains.
OPENERS = ["", "", "", "Hi! ", "Quick question: ", "Please help. ", "Hey, ", "I need some advice. ", "Hello. ",
           "Can you help me? ", "Honest question: ", "My friend asked me this. "]
CLOSERS = ["", "", "", " Thanks!", " Thank you.", " Please be brief.", " Keep it simple.", " I'm a beginner.",
           " Explain it clearly.", " It's urgent."]


def dress(rng: random.Random, request: str) -> str:
    """A request with an optional opener and closer."""
    return f"{pick(rng, OPENERS)}{request}{pick(rng, CLOSERS)}"
