"""The one math verifier: find the final answer a completion states, and decide if it equals the gold.

RL rewards and eval both import this module, so what GRPO optimises is what eval reports (the
DeepSeekMath / DeepSeek-V2 math reward is exactly this kind of rule: final answer right or wrong).

    math_accuracy(["... so the answer is $\\boxed{\\frac{1}{2}}$."], answer=["0.5"])   # [1.0]

Final answers are read from, in the order they appear: every `\\boxed{...}` / `\\fbox{...}` (nested
braces), every "the answer is X", every GSM8K "#### X" line, and a last line "Answer: X". A
completion that states two different final answers scores 0, so hedging ("\\boxed{3} ... \\boxed{4}")
never pays; stating the same answer twice is fine. No stated answer scores 0 too: we do not guess
the last number in free text, so the policy learns to commit to one answer.

Equivalence: when both sides are plain numbers (after dropping thousands commas, $ and %), compare
them with a relative tolerance; otherwise ask math-verify (LaTeX, fractions, sets, intervals, ...).
math-verify's timeouts use SIGALRM, which only works in the main thread, so elsewhere (TRL reward
threads, thread pools) we call it with timeouts off; worker processes have their own main thread and
keep them. Either way a timeout cannot interrupt sympy inside one huge integer operation, so answers
that could ask for one -- power towers (9^{9^{9^9}}), exponents over MAX_EXPONENT_DIGITS digits,
factorials and binomials of big numbers -- never reach math-verify (they match only by equal text),
and answers over MAX_ANSWER_CHARS are prose, not answers.
"""

import functools
import math
import re
import threading

from math_verify import parse, verify

from rewards.completions import completion_text

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}  # a stated step "a op b = c."

MAX_ANSWER_CHARS = 300  # longer "answers" are prose; also bounds math-verify's time
REL_TOL = 1e-6  # numeric fast path, relative, when either side has a decimal point (integers compare exactly)
MATH_VERIFY_TIMEOUT_S = 5  # math-verify's own timeout, main thread only (SIGALRM)
MAX_EXPONENT_DIGITS = 4  # 99999^{9999} still evaluates in milliseconds; 10^{10^9} would not finish
CACHE_SIZE = 1 << 14  # GRPO scores G samples per prompt: the gold and common answers repeat

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOXED_BARE = re.compile(r"\\boxed[ \t]+([^\s${}]+)")  # "\boxed 5"
_ANSWER_IS = re.compile(r"\banswer\s+is\s*:?[ \t]*([^\n]+)", re.IGNORECASE)
_GSM8K = re.compile(r"####[ \t]*([^\n]*?)[ \t]*$", re.MULTILINE)
_ANSWER_LINE = re.compile(r"^\W*(?:final\s+)?answer\W*?:\**\s*(.+?)\s*$", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?=\s|$)")
_FILLER = re.compile(r"^(?:therefore|thus|hence|so|then|clearly|simply|just|exactly|approximately|about|"
                     r"equal\s+to|given\s+by|:)\s+", re.IGNORECASE)
_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**"), ("`", "`"), ('"', '"'))
_THOUSANDS = re.compile(r"(?<=\d)(?:,|\\,|\{,\})(?=\d{3}(?!\d))")
_TEXT_UNIT = re.compile(r"\\(?:text|mbox|mathrm)\{[^{}\d]*\}")
_UNIT_WORDS = re.compile(r"(?:\s+[A-Za-z]{2,}\.?){1,2}$")  # "18 apples", "5 km" -- not "2 x"
_WORD = re.compile(r"[A-Za-z]{2,}")
# An exponent: {braced}, (parenthesised), or one token (LaTeX's ^23 is 2 then 3, but ** takes 23).
_EXPONENT = re.compile(r"(?:\^|\*\*)\s*(\{(?:[^{}]|\{[^{}]*\})*\}|\((?:[^()]|\([^()]*\))*\)|\d+|\\?[A-Za-z]+)")
_DIGITS = re.compile(r"\d+")
_SMALL_FACTORIAL = re.compile(r"(?<![\d.])\d{1,3}!")
_BINOMIAL = re.compile(r"\\[dt]?binom|\\choose")
_INTEGER = re.compile(r"[-+]?\d+")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def stated_answers(text: str) -> list[str]:
    """Every final answer `text` states, cleaned, in order of appearance."""
    found = []  # (position, answer, in prose: its trailing "." or "!" is punctuation, not maths)
    for match in _BOXED.finditer(text):
        content = _braced(text, match.end() - 1)
        if content is not None:
            found.append((match.start(), content, False))
    found += [(m.start(), m.group(1), False) for m in _BOXED_BARE.finditer(text)]
    # GSM8K answers are numbers; anything else after "####" is a markdown heading ("#### Step 1: ...").
    found += [(m.start(), m.group(1), True) for m in _GSM8K.finditer(text) if _as_number(m.group(1)) is not None]
    for m in _ANSWER_IS.finditer(text):
        if "\\boxed" not in m.group(1) and "\\fbox" not in m.group(1):  # the boxed one is already counted
            found.append((m.start(), _first_sentence(m.group(1)), True))
    last_line = text.rstrip().rsplit("\n", 1)[-1]
    answer_line = _ANSWER_LINE.match(last_line)
    if answer_line and not _BOXED.search(answer_line.group(1)) and not _ANSWER_IS.search(answer_line.group(1)):
        found.append((len(text), answer_line.group(1), True))
    answers = (_clean(answer, prose) for _, answer, prose in sorted(found, key=lambda item: item[0]))
    return [answer for answer in answers if answer]


def extract_final_answer(text: str) -> str | None:
    """The last final answer `text` states ("\\boxed{..}", "The answer is ..", "#### ..", "Answer: .."), or None."""
    answers = stated_answers(text)
    return answers[-1] if answers else None


def answers_match(gold: str, predicted: str) -> bool:
    """Whether two (already extracted) answers are the same value."""
    if gold.strip() == predicted.strip():
        return True
    gold_number, predicted_number = _as_number(gold), _as_number(predicted)
    if isinstance(gold_number, int) and isinstance(predicted_number, int):
        return gold_number == predicted_number  # exact: 1450001 is not 1450000, whatever the tolerance says
    if gold_number is not None and predicted_number is not None:
        return math.isclose(gold_number, predicted_number, rel_tol=REL_TOL)
    gold_parsed, predicted_parsed = _parsed(gold), _parsed(predicted)
    if not gold_parsed or not predicted_parsed:
        return False
    return verify(gold_parsed, predicted_parsed, timeout_seconds=_timeout())


def score(completion: str, gold: str) -> float:
    """1.0 if `completion` states exactly one distinct final answer and it matches `gold`, else 0.0.
    `gold` may be a bare answer ("0.5", "\\frac{1}{2}") or a worked solution ending in "#### 42"."""
    answers = stated_answers(completion)
    if not answers:
        return 0.0
    final = answers[-1]
    if any(not answers_match(other, final) for other in set(answers[:-1]) - {final}):
        return 0.0
    return 1.0 if answers_match(gold_answer(gold), final) else 0.0


@functools.lru_cache(maxsize=CACHE_SIZE)
def gold_answer(gold: str) -> str:
    """The answer inside a gold solution ("... #### 42" -> "42"); a bare gold answer is returned cleaned."""
    return extract_final_answer(gold) or _clean(gold, prose=False) or gold.strip()


def math_accuracy(completions, answer, **unused) -> list[float | None]:
    """TRL reward: 1.0 per completion whose single final answer equals `answer` (a dataset column), else 0.0.
    Rows whose answer is None get None (TRL then ignores this reward for them, e.g. code rows in a mix)."""
    if len(answer) != len(completions):
        raise ValueError(f"math_accuracy got {len(completions)} completions but {len(answer)} answers; "
                         "the `answer` column must have one entry per completion")
    return [None if gold is None else score(completion_text(c), str(gold)) for c, gold in zip(completions, answer)]


_STEP = re.compile(r"(?<![\d.])(-?\d+) ([-+*]) (-?\d+) = (-?\d+)(?=\.(?:\s|$))")


def false_steps(text: str) -> list[re.Match]:
    """The arithmetic steps ("a op b = c.", integers) that `text` states and that are false, in order."""
    return [m for m in _STEP.finditer(text) if OPS[m.group(2)](int(m.group(1)), int(m.group(3))) != int(m.group(4))]


def math_steps_accuracy(completions, answer, **unused) -> list[float | None]:
    """TRL reward: 1.0 when the final answer equals `answer` (as `math_accuracy`) and every arithmetic step the
    completion states ("a op b = c.") is true. A right answer reached through a false step (two slips that cancel,
    a copied operand that happens to fit) scores 0: GRPO's largest advantages go to the one right sample of a hard
    group, and rewarding a lucky one teaches the false step."""
    return [None if value is None else value * (not false_steps(completion_text(c)))
            for value, c in zip(math_accuracy(completions, answer), completions)]


def _braced(text: str, open_at: int) -> str | None:
    """The text inside the brace at `open_at` up to its matching close, or None if unbalanced."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{" and text[i - 1] != "\\":
            depth += 1
        elif text[i] == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
    return None


def _first_sentence(text: str) -> str:
    end = _SENTENCE_END.search(text)
    return text[: end.start()] if end else text


def _clean(answer: str, prose: bool = True) -> str | None:
    """Strip wrappers ($..$, \\(..\\), **..**), filler words and, in prose, trailing punctuation; None if the
    answer is itself prose."""
    answer = answer.strip()
    while True:
        before = answer
        answer = _FILLER.sub("", answer).strip()
        if prose:
            answer = answer.rstrip(".,;:!").strip()
        for left, right in _WRAPPERS:
            if len(answer) > len(left) + len(right) and answer.startswith(left) and answer.endswith(right):
                answer = answer[len(left) : -len(right)].strip()
        if answer == before:
            break
    # A multi-word phrase with no digit and no LaTeX ("not obvious", "that x is even") is prose, not an answer.
    if not answer or len(answer) > MAX_ANSWER_CHARS:
        return None
    if len(_WORD.findall(answer)) > 1 and not any(ch.isdigit() for ch in answer) and "\\" not in answer:
        return None
    return answer


def _as_number(answer: str) -> int | float | None:
    """A plain number ("1,000", "$5", "50%", "18 apples", "-0.5"), or None if it is anything else.
    Integers stay int (exact, any size); decimals become float."""
    text = _TEXT_UNIT.sub("", answer)
    for junk in ("\\$", "$", "\\%", "%", "\\!", "^\\circ", "°"):
        text = text.replace(junk, "")
    text = _THOUSANDS.sub("", text).replace("\u2212", "-").strip()
    text = _UNIT_WORDS.sub("", text)
    if _INTEGER.fullmatch(text):
        return int(text)
    if not _NUMBER.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


@functools.lru_cache(maxsize=CACHE_SIZE)
def _parsed(answer: str):
    if _too_costly(answer):
        return []
    return parse("\\boxed{" + answer + "}", parsing_timeout=_timeout())


def _too_costly(answer: str) -> bool:
    """Could sympy be asked for an astronomically large integer (which no timeout can interrupt)?"""
    for match in _EXPONENT.finditer(answer):
        exponent, after = match.group(1), answer[match.end():].lstrip()
        if "^" in exponent or "**" in exponent or after.startswith(("^", "**")):  # a power tower
            return True
        if any(len(digits) > MAX_EXPONENT_DIGITS for digits in _DIGITS.findall(exponent)):
            return True
    if answer.count("!") != len(_SMALL_FACTORIAL.findall(answer)):  # only n! for n < 1000
        return True
    big_number = any(len(digits) > MAX_EXPONENT_DIGITS for digits in _DIGITS.findall(answer))
    return bool(_BINOMIAL.search(answer)) and (big_number or "^" in answer)


def _timeout() -> int | None:
    return MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
