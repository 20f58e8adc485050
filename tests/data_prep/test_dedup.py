"""Near-duplicate detection and n-gram decontamination."""

import pytest

from data_prep.dedup import Decontaminator, MinHashLSH, ngrams, normalize

BASE = ("The quick brown fox jumps over the lazy dog while the farmer watches from the old red barn "
        "near the river on a bright summer morning")


@pytest.mark.parametrize("text,duplicate", [
    (BASE, True),
    (BASE.upper() + "!!", True),  # normalisation
    (BASE.replace("bright", "sunny"), True),  # one word changed: Jaccard of 5-gram shingles ~0.8
    ("A completely different sentence about databases, indexes and query planners in production systems", False),
])
def test_minhash_flags_near_duplicates_only(text, duplicate):
    lsh = MinHashLSH(seed=0)
    assert not lsh.seen(BASE)
    assert lsh.seen(text) is duplicate


def test_decontamination_by_13_gram_overlap():
    eval_text = "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins."
    decon = Decontaminator([eval_text, "What is 2 + 2?"])
    assert decon.contaminated("Question: janet's ducks lay 16 eggs per day, she eats three for breakfast every day")
    assert decon.contaminated("what is 2+2?")  # same words once case and punctuation are normalised
    assert not decon.contaminated("What is 2 + 3?")
    assert not decon.contaminated("Janet's ducks lay eggs.")


def test_short_texts_are_one_gram():
    assert ngrams("What is 2 + 2?") == {normalize("What is 2 + 2?")}
