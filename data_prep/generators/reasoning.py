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

    def conclude(name: str) -> str:  # the check that picks the answer: nobody above it, or it above nobody
        if want_top:
            return f"Nobody is {rel} than {name}, so {name} is the {top}. The answer is {name}."
        return f"{name} is {rel} than nobody, so {name} is the {bottom}. The answer is {name}."

    # the rejected reply makes that check on the one in the middle (who is above one and below the other)
    return Example("reasoning", question, f"{reason} {conclude(answer)}", rejected=f"{reason} {conclude(people[1])}",
                   answer=answer, difficulty=2)


PLACES = ["ones", "tens", "hundreds"]


def _compare_digits(a: int, b: int, slip: bool = False) -> tuple[str, int]:
    """Which of a != b is larger, worked as a person compares numbers: by their number of digits, else by the first
    place where their digits differ. ``slip`` states that deciding fact the wrong way round (a plausible mistake).
    Returns the sentences and the number they conclude is larger."""
    if len(str(a)) != len(str(b)):
        more, fewer = (a, b) if len(str(a)) > len(str(b)) else (b, a)
        if slip:
            more, fewer = fewer, more
        return f"{more} has {len(str(fewer if slip else more))} digits and {fewer} has " \
               f"{len(str(more if slip else fewer))}.", more
    sa, sb = str(a), str(b)
    place = next(i for i in range(len(sa)) if sa[i] != sb[i])
    name = PLACES[len(sa) - 1 - place]
    same = [f"Their {PLACES[len(sa) - 1 - i]} digits are both {sa[i]}." for i in range(place)]
    x, y = int(sa[place]), int(sb[place])
    big, small = (x, y) if x > y else (y, x)
    larger = a if x > y else b
    if slip:
        big, small, larger = small, big, b if larger == a else a
    return " ".join(same + [f"Their {name} digits are {sa[place]} and {sb[place]}, and {big} > {small}."]), larger


def _comparison(rng: random.Random) -> Example:
    a, b = rng.sample(range(10, 1000), 2)
    want_larger = rng.random() < 0.5
    word = "larger" if want_larger else "smaller"

    def reply(slip: bool) -> tuple[str, int]:
        reason, larger = _compare_digits(a, b, slip)
        smaller = a + b - larger
        answer, other = (larger, smaller) if want_larger else (smaller, larger)
        return f"{reason} So {answer} is {word} than {other}. The answer is {answer}.", answer

    right, answer = reply(False)
    wrong, _ = reply(True)
    return Example("reasoning", f"Which is {word}, {a} or {b}?", right, rejected=wrong, answer=str(answer),
                   difficulty=1)


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
        # counted one by one; the rejected count skips one item (a plausible slip) and so ends one short
        skip = rng.randrange(n)
        reply = ", ".join(f"{item} {i + 1}" for i, item in enumerate(items)) + f". The answer is {n}."
        kept = items[:skip] + items[skip + 1:]
        wrong = ", ".join(f"{item} {i + 1}" for i, item in enumerate(kept)) + f". The answer is {n - 1}."
    return Example("reasoning", prompt, reply, rejected=wrong, answer=str(n), difficulty=2)


def sample(rng: random.Random) -> Example:
    return pick(rng, [_ordering, _comparison, _counting])(rng)
