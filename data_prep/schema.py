"""One schema per kind of example, as ``datasets`` Features, in the layouts TRL's trainers take.

conversations  SFTTrainer's conversational format: ``messages`` (system / user / assistant turns)
preferences    RewardTrainer / DPOTrainer's conversational preference format: ``prompt`` (turns up to the last
               user turn), ``chosen`` and ``rejected`` (the competing assistant turns)
steps          TRL's stepwise-supervision format for process reward models: ``prompt``, ``completions`` (the
               steps of one solution) and ``labels`` (whether each step is right)
rl_prompts     GRPOTrainer's prompt format plus the columns the rewards verify against: ``answer`` (math,
               reasoning), ``tests`` / ``entry_point`` / ``code_prefix`` (code)
Every row also carries ``domain``, ``source`` and ``id`` (for user files: ``file:line``).
"""

from __future__ import annotations

from datasets import Features, Value

ROLES = ("system", "user", "assistant")
KINDS = ("conversations", "preferences", "rl_prompts", "steps")

_TURNS = [{"role": Value("string"), "content": Value("string")}]
_META = {"domain": Value("string"), "source": Value("string"), "id": Value("string")}

FEATURES = {
    "conversations": Features({"messages": _TURNS, **_META}),
    "preferences": Features({"prompt": _TURNS, "chosen": _TURNS, "rejected": _TURNS, **_META}),
    "steps": Features({"prompt": _TURNS, "completions": [Value("string")], "labels": [Value("bool")], **_META}),
    "rl_prompts": Features({
        "prompt": _TURNS,
        "answer": Value("string"),
        "tests": [Value("string")],
        "entry_point": Value("string"),
        "code_prefix": Value("string"),
        **_META,
    }),
}


def empty_row(kind: str) -> dict:
    """Defaults for the optional columns of a kind."""
    if kind == "rl_prompts":
        return {"answer": "", "tests": [], "entry_point": "", "code_prefix": ""}
    return {}
