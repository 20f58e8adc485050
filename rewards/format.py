"""Format and rule rewards: cheap checks on the shape of a completion, not its correctness.

    chat_format                 1.0 clean, 0.0 if special tokens or role markers ("User:") leaked in
    AnswerFormat(style)         1.0 if the final answer is stated in the expected form, else 0.0
    LanguageConsistency(...)    [0, 1]: share of letters in the target script(s) (DeepSeek-R1's
                                language-consistency reward: proportion of target-language words)
    RepetitionPenalty(n, max)   [max_penalty, 0]: -(share of repeated word n-grams), scaled
    LengthPenalty(max, cache)   [-1, 0]: DAPO's soft overlong punishment (Yu et al. 2025, eq. 13)

The classes are factories: picklable, and each instance has a `__name__` for TRL's logging.
"""

import re
import unicodedata

from rewards.completions import completion_text
from rewards.math import answers_match, stated_answers

LEFTOVER_TOKENS = re.compile(
    r"<\|[^|<>\n]{1,40}\|>"  # ChatML / Llama-3 specials: <|im_start|>, <|eot_id|>, <|endoftext|>
    r"|<｜[^｜<>\n]{1,40}｜>"  # DeepSeek's full-width specials: <｜end▁of▁sentence｜>
    r"|</?s>|\[/?INST\]|<<SYS>>"  # Llama-2 / Mistral
)
ROLE_MARKER = re.compile(r"^\s*(?:User|Assistant|System|Human)\s*:", re.MULTILINE)  # DeepSeek-V2's template roles
ANSWER_STYLES = ("any", "boxed", "gsm8k", "tags")
TAGGED = re.compile(r"\s*(?:<think>.*?</think>\s*)?<answer>(.*?)</answer>\s*", re.DOTALL)
CODE_BLOCK = re.compile(r"```.*?(?:```|\Z)", re.DOTALL)
LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
WORD = re.compile(r"\w+")
LENGTH_UNITS = ("tokens", "words", "chars")


def chat_format(completions, **unused) -> list[float]:
    """1.0 when the completion has no leftover special tokens and does not start another chat turn, else 0.0."""
    return [0.0 if LEFTOVER_TOKENS.search(t) or ROLE_MARKER.search(t) else 1.0
            for t in map(completion_text, completions)]


class AnswerFormat:
    """1.0 when the completion states its final answer in `style`, and only one distinct answer; else 0.0.

    "boxed": a non-empty \\boxed{...}; "gsm8k": a "#### n" line; "any": any form rewards.math reads;
    "tags": the whole completion is `<think>...</think><answer>...</answer>` (think optional), with
    exactly one answer block.
    """

    def __init__(self, style: str = "any"):
        if style not in ANSWER_STYLES:
            raise ValueError(f"AnswerFormat(style={style!r}): style must be one of {ANSWER_STYLES}")
        self.style = style
        self.__name__ = f"answer_format_{style}"

    def __call__(self, completions, **unused) -> list[float]:
        return [self._score(completion_text(c)) for c in completions]

    def _score(self, text: str) -> float:
        if self.style == "tags":
            match = TAGGED.fullmatch(text)
            return 1.0 if match and match.group(1).strip() and "<answer>" not in match.group(1) else 0.0
        answers = stated_answers(text)
        if not answers or any(not answers_match(answers[-1], a) for a in set(answers[:-1])):
            return 0.0
        if self.style == "boxed":
            return 1.0 if "\\boxed" in text else 0.0
        if self.style == "gsm8k":
            return 1.0 if re.search(r"####[ \t]*\S", text) else 0.0
        return 1.0


class LanguageConsistency:
    """Share of letters written in `scripts` (Unicode script names: "LATIN", "GREEK", "CJK", "CYRILLIC",
    "HANGUL", ...), in [0, 1]. Code blocks and LaTeX commands are ignored; no letters at all scores 1.0.
    The default accepts Greek because maths uses it (π, θ) in otherwise English text."""

    def __init__(self, scripts: tuple[str, ...] = ("LATIN", "GREEK")):
        if not scripts:
            raise ValueError("LanguageConsistency needs at least one script name, e.g. scripts=('LATIN',)")
        self.scripts = tuple(s.upper() for s in scripts)
        self.__name__ = "language_consistency_" + "_".join(s.lower() for s in self.scripts)

    def __call__(self, completions, **unused) -> list[float]:
        return [self._score(completion_text(c)) for c in completions]

    def _score(self, text: str) -> float:
        text = LATEX_COMMAND.sub(" ", CODE_BLOCK.sub(" ", text))
        letters = [ch for ch in text if ch.isalpha()]
        if not letters:
            return 1.0
        in_script = sum(unicodedata.name(ch, "").startswith(self.scripts) for ch in letters)
        return in_script / len(letters)


class RepetitionPenalty:
    """-max_penalty * (share of word n-grams that repeat an earlier one): 0.0 for no repetition, down to
    `max_penalty` (negative) for a completion that loops. Texts shorter than n words score 0.0."""

    def __init__(self, ngram_size: int = 3, max_penalty: float = -1.0):
        if ngram_size < 1 or max_penalty > 0:
            raise ValueError(f"RepetitionPenalty(ngram_size={ngram_size}, max_penalty={max_penalty}): "
                             "need ngram_size >= 1 and max_penalty <= 0 (it is a penalty)")
        self.ngram_size, self.max_penalty = ngram_size, max_penalty
        self.__name__ = f"repetition_penalty_{ngram_size}gram"

    def __call__(self, completions, **unused) -> list[float]:
        return [self._score(completion_text(c)) for c in completions]

    def _score(self, text: str) -> float:
        words = WORD.findall(text.lower())
        ngrams = [tuple(words[i : i + self.ngram_size]) for i in range(len(words) - self.ngram_size + 1)]
        if not ngrams:
            return 0.0
        repeated = 1.0 - len(set(ngrams)) / len(ngrams)
        return self.max_penalty * repeated


class LengthPenalty:
    """DAPO's soft overlong punishment (eq. 13): 0 up to max_length - cache_length, then falling linearly
    to -1 at max_length, and -1 beyond. Lengths in `unit`: "tokens" (TRL's completion_ids), "words", "chars"."""

    def __init__(self, max_length: int, cache_length: int = 0, unit: str = "tokens"):
        if unit not in LENGTH_UNITS:
            raise ValueError(f"LengthPenalty(unit={unit!r}): unit must be one of {LENGTH_UNITS}")
        if not 0 <= cache_length < max_length:
            raise ValueError(f"LengthPenalty(max_length={max_length}, cache_length={cache_length}): "
                             "need 0 <= cache_length < max_length")
        self.max_length, self.cache_length, self.unit = max_length, cache_length, unit
        self.__name__ = f"length_penalty_{max_length}_{unit}"

    def __call__(self, completions, completion_ids=None, **unused) -> list[float]:
        if self.unit == "tokens":
            if completion_ids is None:
                raise ValueError("LengthPenalty(unit='tokens') needs the completion_ids keyword (TRL passes it); "
                                 "when calling it yourself, pass completion_ids or use unit='words' or 'chars'")
            lengths = [len(ids) for ids in completion_ids]
        else:
            texts = [completion_text(c) for c in completions]
            lengths = [len(WORD.findall(t)) if self.unit == "words" else len(t) for t in texts]
        return [self._score(n) for n in lengths]

    def _score(self, length: int) -> float:
        soft_limit = self.max_length - self.cache_length
        if length <= soft_limit:
            return 0.0
        if length > self.max_length:
            return -1.0
        return (soft_limit - length) / self.cache_length
