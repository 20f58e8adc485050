"""Scoring for the lm-evaluation-harness tasks in this folder: the project's own math verifier."""

from rewards.math import score


def process_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": score(results[0], str(doc["answer"]))}
