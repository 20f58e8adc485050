"""Small function-writing tasks with MBPP-style unit tests (asserts computed from a reference function).

``rejected`` is a near miss (an off-by-one constant or the wrong operation), which fails at least one test.
"""

from __future__ import annotations

import random

from . import Example, dress, pick

ASK = [
    "Write a Python function `{f}({args})` that {what}.",
    "Implement `{f}({args})` in Python: it {what}.",
    "Define a Python function named {f} taking {args} that {what}.",
]
PROBES = {"x": lambda k, c: [37], "xs": lambda k, c: [[k, k + 3, -1, 4, k]],
          "s": lambda k, c: ["river", "aeiou", f"x{c}{c}"]}
WORDS = ["apple", "banana", "river", "stone", "planet", "window", "garden", "silver", "candle", "rocket", "level"]


def _int_tasks(rng, k, c):
    return [
        (f"add_{k}", "x", f"returns x plus {k}", f"x + {k}", f"x + {k + 1}", lambda x: x + k),
        (f"times_{k}", "x", f"returns x multiplied by {k}", f"x * {k}", f"x + {k}", lambda x: x * k),
        (f"square_plus_{k}", "x", f"returns the square of x plus {k}", f"x * x + {k}", f"x * {k}",
         lambda x: x * x + k),
        (f"mod_{k}", "x", f"returns the remainder of x divided by {k}", f"x % {k}", f"x // {k}", lambda x: x % k),
    ]


def _list_tasks(rng, k, c):
    return [
        ("sum_list", "xs", "returns the sum of the numbers in the list xs", "sum(xs)", "sum(xs) + 1", sum),
        ("max_list", "xs", "returns the largest number in the non-empty list xs", "max(xs)", "min(xs)", max),
        (f"count_greater_{k}", "xs", f"returns how many numbers in xs are greater than {k}",
         f"sum(1 for x in xs if x > {k})", f"sum(1 for x in xs if x >= {k})", lambda xs: sum(x > k for x in xs)),
        ("evens", "xs", "returns the even numbers of xs in order", "[x for x in xs if x % 2 == 0]",
         "[x for x in xs if x % 2 == 1]", lambda xs: [x for x in xs if x % 2 == 0]),
        ("reverse_list", "xs", "returns the list xs reversed", "xs[::-1]", "sorted(xs)", lambda xs: xs[::-1]),
        (f"sum_plus_{k}", "xs", f"returns the sum of the numbers in xs plus {k}", f"sum(xs) + {k}",
         f"sum(xs) + {k - 1}", lambda xs: sum(xs) + k),
        (f"count_equal_{k}", "xs", f"returns how many times {k} occurs in xs", f"xs.count({k})",
         f"xs.count({k + 1})", lambda xs: xs.count(k)),
        (f"scale_{k}", "xs", f"returns a list with every number of xs multiplied by {k}", f"[x * {k} for x in xs]",
         f"[x + {k} for x in xs]", lambda xs: [x * k for x in xs]),
    ]


def _str_tasks(rng, k, c):
    return [
        ("reverse_string", "s", "returns the string s reversed", "s[::-1]", "s[1:]", lambda s: s[::-1]),
        ("to_upper", "s", "returns s in upper case", "s.upper()", "s.lower()", str.upper),
        (f"repeat_{k}", "s", f"returns s repeated {k} times", f"s * {k}", f"s * {k + 1}", lambda s: s * k),
        ("is_palindrome", "s", "returns True if s reads the same backwards, else False", "s == s[::-1]",
         "s[0] == s[-1]", lambda s: s == s[::-1]),
        (f"count_{c}", "s", f"returns how many times the letter '{c}' occurs in s", f"s.count('{c}')",
         f"s.count('{c}') + 1", lambda s: s.count(c)),
        (f"starts_with_{c}", "s", f"returns True if s starts with the letter '{c}', else False", f"s.startswith('{c}')",
         f"'{c}' in s", lambda s: s.startswith(c)),
        ("count_vowels", "s", "returns the number of vowels (a, e, i, o, u) in the lower-case string s",
         "sum(c in 'aeiou' for c in s)", "len(s) // 2", lambda s: sum(c in "aeiou" for c in s)),
    ]


def _inputs(rng, arg):
    if arg == "x":
        return [rng.randint(-20, 50) for _ in range(3)]
    if arg == "xs":
        return [[rng.randint(-9, 20) for _ in range(rng.randint(1, 6))] for _ in range(3)]
    return [pick(rng, WORDS) for _ in range(3)]


def sample(rng: random.Random) -> Example:
    k, letter = rng.randint(2, 199), pick(rng, "abcdeilmnoprst")
    family = pick(rng, [_int_tasks, _list_tasks, _str_tasks])
    name, arg, what, body, wrong_body, reference = pick(rng, family(rng, k, letter))
    tests = [f"assert {name}({value!r}) == {reference(value)!r}" for value in _inputs(rng, arg)]
    # fixed cases that separate each near miss from the reference (>= vs >, min vs max, s[0] == s[-1], ...)
    for probe in PROBES[arg](k, letter):
        tests.append(f"assert {name}({probe!r}) == {reference(probe)!r}")
    prompt = dress(rng, pick(rng, ASK).format(f=name, args=arg, what=what))

    def code(expr):
        return f"```python\ndef {name}({arg}):\n    return {expr}\n```"

    return Example("code", prompt, code(body), rejected=code(wrong_body), tests=tests, entry_point=name,
                   difficulty=1)
