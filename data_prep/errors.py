"""Bad input: an error that names the place, or (``on_error="skip"``) a count of every skipped row and why."""

from __future__ import annotations

import logging
from collections import Counter

logger = logging.getLogger("data_prep")

ON_ERROR = ("raise", "skip")


class DataError(ValueError):
    """A row that cannot be used. ``where`` is ``file:line`` (or ``hub-id[row]``), ``field`` the offending field."""

    def __init__(self, where: str, field: str | None, reason: str):
        self.where, self.field, self.reason = where, field, reason
        at = f"{where}: {field}: " if field else f"{where}: "
        super().__init__(at + reason)


class SkipReport:
    """Counts of skipped rows by reason, with the first few places of each, for ``on_error="skip"``."""

    EXAMPLES_PER_REASON = 3

    def __init__(self, name: str = ""):
        self.name = name
        self.kept = 0
        self.skipped: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def skip(self, error: DataError) -> None:
        key = f"{error.field}: {error.reason}" if error.field else error.reason
        key = key.split(" (")[0]  # group by reason, not by detail
        self.skipped[key] += 1
        self.examples.setdefault(key, [])
        if len(self.examples[key]) < self.EXAMPLES_PER_REASON:
            self.examples[key].append(error.where)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.name}: kept {self.kept}, skipped 0"
        lines = [f"{self.name}: kept {self.kept}, skipped {self.total_skipped}:"]
        for reason, count in self.skipped.most_common():
            lines.append(f"  {count:>7}  {reason}  (e.g. {', '.join(self.examples[reason])})")
        return "\n".join(lines)


def handle(error: DataError, on_error: str, report: SkipReport) -> None:
    if on_error == "raise":
        raise error
    report.skip(error)
