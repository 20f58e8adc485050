"""A reward a fresh model can learn in a few GRPO steps: 1 when a completion contains a digit (about one in five
8-token samples of an untrained model does), else 0."""


def has_digit(completions, **unused) -> list[float]:
    return [float(any(ch.isdigit() for ch in c)) for c in completions]


def alternating(completions, **unused) -> list[float]:
    """1, 0, 1, 0, ... by position in the call: every group of 3 adjacent samples holds both values."""
    return [float(i % 2 == 0) for i in range(len(completions))]
