"""Arithmetic and templated word problems with numeric answers, in five levels of difficulty.

Levels (sampled with ``LEVEL_WEIGHTS``): 1 one-digit ±; 2 two-digit ±; 3 three-digit ±, two-digit × one-digit;
4 two-step expressions; 5 two- and three-step word problems. Every operation is worked through place values
(``worked``), so that a solution is made of one-digit facts, facts times ten or a hundred, borrows and adding up.
Solutions state each step as ``a op b = c.`` and end with ``The answer is N.``: every intermediate result can be
checked (process supervision), and the final sentence is what ``rewards.math`` extracts. ``rejected`` makes one
arithmetic slip and carries it through.
"""

from __future__ import annotations

import random

from . import Example, pick

LEVEL_WEIGHTS = {1: 0.1, 2: 0.2, 3: 0.25, 4: 0.25, 5: 0.2}
ASK = ["What is {e}?", "Compute {e}.", "Calculate {e}.", "Find the value of {e}.", "{e} = ?", "Evaluate {e}."]
NAMES = ["Tom", "Anna", "Liam", "Mia", "Noah", "Emma", "Omar", "Sara", "Ivan", "Lena", "Ken", "Zoe", "Ravi", "Nora"]
ITEMS = ["apples", "books", "coins", "pencils", "stickers", "marbles", "cards", "eggs", "shells", "stamps"]
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

# A program is a list of steps (left, op, right); an operand "#k" is the result of step k. Each step of a problem's
# program is written out as the worked steps of ``worked``.


def worked(a: int, op: str, b: int) -> list:
    """The step ``a op b`` as steps a small model can take: one-digit facts, facts times a power of ten (40 + 30,
    40 * 6), borrow facts (13 - 7), and adding up the place values (70 + 15). 47 + 38 is 40 + 30, 7 + 8, then
    70 + 15; 83 - 47 borrows a ten: 70 - 40, 13 - 7, then 30 + 6; 47 * 6 is 40 * 6, 7 * 6, then 240 + 42; a
    negative difference is worked the other way round and negated (0 - 367). Written at once, a multi-digit answer
    needs the operands' digits aligned and every carry looked ahead, which a small model learns far more slowly."""
    if min(a, b) < 0 or a < 10 and b < 10:
        return [(a, op, b)]  # a one-digit fact (or a slip made a number negative)
    if op == "-" and a < b:
        inner = worked(b, "-", a)
        return inner + [(0, "-", f"#{len(inner) - 1}")]
    pa, pb = _places(a), _places(b)
    if len(pa) <= 1 and len(pb) <= 1 and (op != "-" or not pb or pa[0][0] == pb[0][0]):
        return [(a, op, b)]  # a fact times a power of ten: 40 * 6, 700 - 500, 40 + 8
    if op == "*":
        if a >= 10 and b >= 10:
            return [(a, op, b)]
        parts = ([(d * 10 ** p, "*", b) for p, d in pa] if b < 10 else [(a, "*", d * 10 ** p) for p, d in pb])
        return parts + _sum_up(parts, [f"#{i}" for i in range(len(parts))])
    da, db = _digits(a), _digits(b)
    both = min(len(da), len(db))  # the places both operands have: a step each
    if op == "+" and not any(da[p] and db[p] for p in range(both)):
        return [(a, op, b)]  # no two digits to add: 40 + 8, 130 + 7
    if op == "-":  # borrow from the next place where a's digit is the smaller, ones first
        borrow = 0
        for p in range(len(da)):
            da[p] -= borrow
            borrow = int(da[p] < (db[p] if p < both else 0))
            da[p] += 10 * borrow
    longer = da if len(da) > both else db
    high = sum(d * 10 ** p for p, d in enumerate(longer) if p >= both)  # places only one operand has: one term
    steps = [(da[p] * 10 ** p, op, db[p] * 10 ** p) for p in reversed(range(both))]
    return steps + _sum_up(steps, ([high] if high else []) + [f"#{i}" for i in range(len(steps))])


def _digits(n: int) -> list[int]:
    return [int(c) for c in reversed(str(n))]  # ones first


def _places(n: int) -> list[tuple[int, int]]:
    """(place, digit) of the non-zero digits of ``n``, highest place first."""
    return [(p, d) for p, d in reversed(list(enumerate(_digits(n)))) if d]


def _sum_up(steps: list, terms: list) -> list:
    """Steps adding ``terms`` (numbers or "#k") left to right, numbered after ``steps``."""
    out, total = [], terms[0]
    for term in terms[1:]:
        out.append((total, "+", term))
        total = f"#{len(steps) + len(out) - 1}"
    return out


def run_program(program, slip_at: int | None = None, slip: int = 0) -> tuple[list[str], int]:
    """The worked step sentences and final result; ``slip_at`` adds ``slip`` to the result of that worked step (a
    mistake, carried through: the later steps are worked from the wrong value)."""
    results, lines = [], []
    for left, op, right in program:
        a = results[int(left[1:])] if isinstance(left, str) else left
        b = results[int(right[1:])] if isinstance(right, str) else right
        values = []
        for x, step_op, y in worked(a, op, b):
            x = values[int(x[1:])] if isinstance(x, str) else x
            y = values[int(y[1:])] if isinstance(y, str) else y
            values.append(OPS[step_op](x, y) + (slip if len(lines) == slip_at else 0))
            lines.append(f"{x} {step_op} {y} = {values[-1]}.")
        results.append(values[-1])
    return lines, results[-1]


def _example(rng: random.Random, text: str, program, level: int, lead: str = "") -> Example:
    def steps(lines, answer):
        return ([lead] if lead else []) + lines + [f"The answer is {answer}."]

    lines, answer = run_program(program)
    slip = pick(rng, [-1, 1]) * rng.randint(1, 10)
    wrong_lines, wrong = run_program(program, slip_at=rng.randrange(len(lines)), slip=slip)
    right, mistaken = steps(lines, answer), steps(wrong_lines, wrong)
    # a step is right when it states what the correct solution states at that step (a slip can change how the
    # later steps are worked, and so their number)
    labels = [i < len(right) and step == right[i] for i, step in enumerate(mistaken)]
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
    return _example(rng, pick(rng, ASK).format(e=f"{a} {op} {b}"), [(a, op, b)], level)


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
