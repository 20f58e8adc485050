"""The reward registry: names, factories with parameters, dotted paths, errors, and what TRL needs of each."""

import pickle

import pytest

import rewards
from rewards.format import chat_format
from rewards.math import math_accuracy

# name, parameters
REGISTERED = [
    ("math_accuracy", {}),
    ("math_steps_accuracy", {}),
    ("code_execution", {"timeout_s": 5}),
    ("chat_format", {}),
    ("answer_format", {"style": "boxed"}),
    ("language_consistency", {"scripts": ("LATIN",)}),
    ("repetition_penalty", {"ngram_size": 4}),
    ("length_penalty", {"max_length": 100, "cache_length": 10}),
    ("refusal_correct", {}),
    ("reward_model", {"path": "runs/rm/tiny/safety"}),  # scorers load their checkpoint on first call
    ("process_reward_model", {"path": "runs/rm/tiny/process", "aggregate": "mean"}),
]


def test_available_lists_every_registered_name():
    assert rewards.available() == sorted(name for name, _ in REGISTERED)


@pytest.mark.parametrize("name,params", REGISTERED)
def test_registered_rewards_are_named_picklable_callables(name, params):
    reward = rewards.get(name, **params)
    assert callable(reward) and isinstance(reward.__name__, str)
    clone = pickle.loads(pickle.dumps(reward))  # TRL may ship rewards to worker processes
    assert clone.__name__ == reward.__name__


# name, what it resolves to
DOTTED = [
    ("rewards.math:math_accuracy", math_accuracy),
    ("rewards.format.chat_format", chat_format),
]


@pytest.mark.parametrize("path,target", DOTTED)
def test_dotted_paths(path, target):
    assert rewards.get(path) is target


# name, parameters, message fragment
ERRORS = [
    ("no_such_reward", {}, "registered rewards are"),
    ("math_accuracy", {"tolerance": 1}, "takes no parameters"),
    ("no_such_package.module:fn", {}, "cannot import module"),
    ("rewards.math:no_such_fn", {}, "has no attribute"),
    ("rewards.math:MAX_ANSWER_CHARS", {}, "not callable"),
]


@pytest.mark.parametrize("name,params,message", ERRORS)
def test_errors_say_what_to_do(name, params, message):
    with pytest.raises(ValueError, match=message):
        rewards.get(name, **params)
