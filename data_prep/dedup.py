"""Exact and near-duplicate removal, and decontamination against evaluation sets by n-gram overlap.

Texts are compared after ``normalize`` (lower case, punctuation dropped, whitespace collapsed). Near duplicates
are found with MinHash over word 5-gram shingles and LSH banding (``NUM_PERM`` = BANDS x ROWS): two texts
whose shingle sets have Jaccard similarity s collide in some band with probability 1 - (1 - s^ROWS)^BANDS,
about 0.96 at s = 0.8 and 0.06 at s = 0.4. It is off for the generated sources, whose templates make many texts
near-identical on purpose ("What is 12 + 35?" vs "What is 12 + 36?").
"""

from __future__ import annotations

import re
import zlib

import numpy as np

DECONTAMINATION_NGRAM = 13  # words, as in GPT-3's decontamination
SHINGLE = 5
BANDS, ROWS = 16, 4
NUM_PERM = BANDS * ROWS
_MERSENNE = (1 << 61) - 1
_PUNCT = re.compile(r"[^\w\s]")
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    return _SPACE.sub(" ", _PUNCT.sub(" ", text.lower())).strip()


def ngrams(text: str, n: int = DECONTAMINATION_NGRAM) -> set[str]:
    """Word n-grams of the normalised text; a text shorter than n words is one gram (itself)."""
    words = normalize(text).split()
    if len(words) <= n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


class Decontaminator:
    """Flags texts that share an n-gram with any of the evaluation texts it was built from."""

    def __init__(self, eval_texts, n: int = DECONTAMINATION_NGRAM):
        self.n = n
        self.grams: set[str] = set()
        for text in eval_texts:
            self.grams |= ngrams(text, n)

    def contaminated(self, text: str) -> bool:
        return not self.grams.isdisjoint(ngrams(text, self.n))


class MinHashLSH:
    """Streaming near-duplicate filter: ``seen(text)`` is True when an earlier text is a near duplicate."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        # a < 2^32 and b < 2^31 keep a * h + b (h a 32-bit CRC) inside uint64 before the modulus
        self.a = rng.integers(1, 1 << 32, NUM_PERM, dtype=np.uint64)
        self.b = rng.integers(0, 1 << 31, NUM_PERM, dtype=np.uint64)
        self.buckets: list[set[int]] = [set() for _ in range(BANDS)]

    def signature(self, text: str) -> np.ndarray:
        words = normalize(text).split()
        shingles = {" ".join(words[i : i + SHINGLE]) for i in range(max(1, len(words) - SHINGLE + 1))}
        hashes = np.array([zlib.crc32(s.encode()) for s in shingles], dtype=np.uint64)
        # (a * h + b) mod p for every permutation and shingle, then the minimum per permutation
        return ((np.outer(self.a, hashes) + self.b[:, None]) % _MERSENNE).min(axis=1)

    def seen(self, text: str) -> bool:
        bands = self.signature(text).reshape(BANDS, ROWS)
        keys = [hash(band.tobytes()) for band in bands]
        duplicate = any(key in bucket for key, bucket in zip(keys, self.buckets))
        if not duplicate:
            for key, bucket in zip(keys, self.buckets):
                bucket.add(key)
        return duplicate
