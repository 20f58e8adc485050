"""Side-by-side speed measurements (``make bench`` = ``python -m benchmarks``); each section writes its figures to
``benchmarks/results/<section>.{json,md}`` through ``save``."""

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def save(stem: str, data, text: str) -> None:
    """Print a section's table and keep it, with its raw figures, under benchmarks/results/."""
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=2))
    (RESULTS / f"{stem}.md").write_text(text)
