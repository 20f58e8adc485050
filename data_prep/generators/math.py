"""Arithmetic and templated word problems with numeric answers, in five levels of difficulty.

Levels (sampled with ``LEVEL_WEIGHTS``): 1 one-digit ±; 2 two-digit ±, solved through tens and ones; 3 three-digit
±, two-digit × one-digit; 4 two-step expressions; 5 two- and three-step word problems. Solutions state each step
as ``a op b = c.`` and end with ``The answer is N.``: every intermediate result can be checked (process
supervision), and the final sentence is what ``rewards.math`` extracts. ``rejected`` makes one arithmetic slip and
carries it through.
"""

from __future__ import annotations

import random

from . import Example, pick

LEVEL_WEIGHTS = {1: 0.1, 2: 0.2, 3: 0.25, 4: 0.25, 5: 0.2}
ASK = ["What is {e}?", "Compute {e}.", "Calculate {e}.", "Find the value of {e}.", "{e} = ?", "Evaluate {e}."]
NAMES = ["Tom", "Anna", "Liam", "Mia", "Noah", "Emma", "Omar", "Sara", "Ivan", "Lena", "Ken", "Zoe", "Ravi", "Nora"]
ITEMS = ["apples", "books", "coins", "pencils", "stickers", "marbles", "cards", "eggs", "shells", "stamps"]
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

# A program is a list of steps (left, op, right); an operand "#k" is the result of step k.


def run_program(program, slip_at: int | None = None, slip: int = 0) -> tuple[list[str], int]:
    """The step sentences and final result; ``slip_at`` adds ``slip`` to that step's result (a mistake)."""
    results, lines = [], []
    for i, (left, op, right) in enumerate(program):
        a = results[int(left[1:])] if isinstance(left, str) else left
        b = results[int(right[1:])] if isinstance(right, str) else right
        value = OPS[op](a, b) + (slip if i == slip_at else 0)
        results.append(value)
        lines.append(f"{a} {op} {b} = {value}.")
    return lines, results[-1]


def _example(rng: random.Random, text: str, program, level: int, lead: str = "") -> Example:
    def steps(lines, answer):
        return ([lead] if lead else []) + lines + [f"The answer is {answer}."]

    lines, answer = run_program(program)
    slip = pick(rng, [-1, 1]) * rng.randint(1, 10)
    wrong_lines, wrong = run_program(program, slip_at=rng.randrange(len(program)), slip=slip)
    right, mistaken = steps(lines, answer), steps(wrong_lines, wrong)
    # a step is right when it states the value the correct solution has at that step
    labels = [a == b for a, b in zip(mistaken, right)]
    return Example("math", text, " ".join(right), rejected=" ".join(mistaken), answer=str(answer), difficulty=level,
                   steps=mistaken, step_labels=labels)


def _arithmetic(rng: random.Random, level: int) -> Example:
    if level == 1:
        a, b, op = rng.randint(0, 9), rng.randint(0, 9), pick(rng, "+-")
    elif level == 2:
        a, b, op = rng.randint(10, 99), rng.randint(10, 99), pick(rng, "+-")
    else:
        op = pick(rng, "+-*")
        a, b = (rng.randint(10, 99), rng.randint(2, 9)) if op == "*" else (rng.randint(100, 999), rng.randint(100, 999))
    if op == "-" and b > a and level < 3:
        a, b = b, a  # no negative answers below level 3
    return _example(rng, pick(rng, ASK).format(e=f"{a} {op} {b}"), _place_values(a, op, b) if level == 2
                    else [(a, op, b)], level)


def _place_values(a: int, op: str, b: int) -> list:
    """Two-digit ± worked through tens and ones: 47 + 38 is 40 + 30, 7 + 8, then 70 + 15; 83 - 47 borrows a ten,
    70 - 40, 13 - 7, then 30 + 6. Each step is a one-digit fact, a fact times ten, or a carry; written at once, the
    answer's digits need the operands' digits aligned and the carry looked ahead, which a small model learns far
    more slowly."""
    tens, ones = (a - a % 10, b - b % 10), (a % 10, b % 10)
    if op == "-" and ones[0] < ones[1]:
        tens, ones = (tens[0] - 10, tens[1]), (ones[0] + 10, ones[1])
    return [(tens[0], op, tens[1]), (ones[0], op, ones[1]), ("#0", "+", "#1")]


def _two_step(rng: random.Random) -> Example:
    a, b, c = rng.randint(2, 30), rng.randint(2, 12), rng.randint(2, 9)
    expression, program = pick(rng, [
        (f"{a} + {b} * {c}", [(b, "*", c), (a, "+", "#0")]),
        (f"({a} + {b}) * {c}", [(a, "+", b), ("#0", "*", c)]),
        (f"{a} * {c} - {b}", [(a, "*", c), ("#0", "-", b)]),
        (f"{a} - {b} + {c}", [(a, "-", b), ("#0", "+", c)]),
    ])
    return _example(rng, pick(rng, ASK).format(e=expression), program, 4)


def _word_problem(rng: random.Random) -> Example:
    name, item = pick(rng, NAMES), pick(rng, ITEMS)
    kind = rng.randrange(4)
    if kind == 0:
        a, b, c, d = rng.randint(10, 60), rng.randint(1, 9), rng.randint(2, 6), rng.randint(2, 9)
        text = (f"{name} has {a} {item}. {name} gives away {b} and then buys {c} bags with {d} {item} each. "
                f"How many {item} does {name} have now?")
        return _example(rng, text, [(a, "-", b), (c, "*", d), ("#0", "+", "#1")], 5, lead=f"{name} starts with {a}.")
    if kind == 1:
        a, b, c = rng.randint(2, 9), rng.randint(3, 12), rng.randint(1, 20)
        text = f"A box holds {b} {item}. {name} fills {a} boxes and has {c} {item} left over. How many {item} is that?"
        return _example(rng, text, [(a, "*", b), ("#0", "+", c)], 5)
    if kind == 2:
        c, b = rng.randint(2, 6), rng.randint(2, 15)
        a = c * b + rng.randint(0, 50)
        text = (f"{name} had {a} dollars and bought {c} {item} for {b} dollars each. "
                f"How many dollars does {name} have left?")
        return _example(rng, text, [(c, "*", b), (a, "-", "#0")], 5)
    a, b, c = rng.randint(5, 40), rng.randint(5, 40), rng.randint(1, 9)
    text = f"{name} collected {a} {item} on Monday and {b} on Tuesday, then lost {c}. How many {item} does {name} have?"
    return _example(rng, text, [(a, "+", b), ("#0", "-", c)], 5)


def sample(rng: random.Random, level: int | None = None, level_weights: dict | None = None) -> Example:
    """One problem of ``level``, or of a level drawn with ``level_weights`` (default ``LEVEL_WEIGHTS``)."""
    if level is None:
        weights = {int(k): float(v) for k, v in (level_weights or LEVEL_WEIGHTS).items()}
        if not weights or set(weights) - set(LEVEL_WEIGHTS) or min(weights.values()) < 0 or not sum(weights.values()):
            raise ValueError(f"level_weights={level_weights!r}: expected non-negative weights for levels "
                             f"{sorted(LEVEL_WEIGHTS)}, not all zero")
        level = rng.choices(list(weights), weights=list(weights.values()))[0]
    if level <= 3:
        return _arithmetic(rng, level)
    return _two_step(rng) if level == 4 else _word_problem(rng)
