"""Ordering, comparison and counting puzzles with one checkable answer (a name or a number)."""

from __future__ import annotations

import random

from . import Example, pick
from .math import NAMES

RELATIONS = [("taller", "tallest", "shortest"), ("older", "oldest", "youngest"), ("faster", "fastest", "slowest")]
FRUITS = ["apple", "pear", "plum", "grape", "mango", "lemon", "cherry", "peach", "kiwi", "melon", "fig", "lime"]
WORDS = ["banana", "letter", "balloon", "mississippi", "coffee", "address", "committee", "bookkeeper", "pepper",
         "success", "tomorrow", "parallel", "assessment", "giraffe", "cinnamon", "possession", "hello", "puzzle"]


def _ordering(rng: random.Random) -> Example:
    people = rng.sample(NAMES, 3)  # people[0] > people[1] > people[2]
    rel, top, bottom = pick(rng, RELATIONS)
    facts = [f"{people[0]} is {rel} than {people[1]}.", f"{people[1]} is {rel} than {people[2]}."]
    rng.shuffle(facts)
    want_top = rng.random() < 0.5
    answer = people[0] if want_top else people[2]
    question = f"{' '.join(facts)} Who is the {top if want_top else bottom}?"
    reason = f"{people[0]} is {rel} than {people[1]}, and {people[1]} is {rel} than {people[2]}."
    wrong = people[1]
    return Example("reasoning", question, f"{reason} The answer is {answer}.",
                   rejected=f"{reason} The answer is {wrong}.", answer=answer, difficulty=2)


def _comparison(rng: random.Random) -> Example:
    a, b = rng.sample(range(10, 1000), 2)
    larger = rng.random() < 0.5
    answer = max(a, b) if larger else min(a, b)
    word = "larger" if larger else "smaller"
    other = min(a, b) if larger else max(a, b)
    return Example("reasoning", f"Which is {word}, {a} or {b}?", f"{answer} is {word} than {other}. "
                   f"The answer is {answer}.", rejected=f"{other} is {word} than {answer}. The answer is {other}.",
                   answer=str(answer), difficulty=1)


def _counting(rng: random.Random) -> Example:
    if rng.random() < 0.5:
        word = pick(rng, WORDS)
        letter = pick(rng, sorted(set(word)))
        n = word.count(letter)
        prompt = f"How many times does the letter '{letter}' appear in '{word}'?"
        spelled = ", ".join(word)
        reply = f"Spelling it out: {spelled}. The letter '{letter}' appears {n} times. The answer is {n}."
        wrong = f"The letter '{letter}' appears {n + 1} times. The answer is {n + 1}."
    else:
        items = [pick(rng, FRUITS) for _ in range(rng.randint(2, 9))]
        n = len(items)
        prompt = f"How many items are in this list: {', '.join(items)}?"
        reply = f"Counting them one by one gives {n}. The answer is {n}."
        wrong = f"Counting them one by one gives {n - 1}. The answer is {n - 1}."
    return Example("reasoning", prompt, reply, rejected=wrong, answer=str(n), difficulty=2)


def sample(rng: random.Random) -> Example:
    return pick(rng, [_ordering, _comparison, _counting])(rng)
