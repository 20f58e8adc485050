"""General knowledge questions from small fact tables. ``rejected`` is a wrong or evasive reply."""

from __future__ import annotations

import random

from . import Example, dress, pick

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Egypt": "Cairo",
    "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "Greece": "Athens", "Chile": "Santiago",
    "India": "New Delhi", "China": "Beijing", "Brazil": "Brasilia", "Mexico": "Mexico City", "Poland": "Warsaw",
    "Ireland": "Dublin", "Portugal": "Lisbon", "Sweden": "Stockholm", "Turkey": "Ankara", "Vietnam": "Hanoi",
    "Australia": "Canberra", "Argentina": "Buenos Aires", "Austria": "Vienna", "Cuba": "Havana", "Finland": "Helsinki",
}
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "early": "late",
             "open": "closed", "full": "empty", "strong": "weak", "high": "low", "new": "old", "hard": "soft"}
SOUNDS = {"dog": "barks", "cat": "meows", "cow": "moos", "duck": "quacks", "lion": "roars", "owl": "hoots",
          "horse": "neighs", "sheep": "bleats", "frog": "croaks", "bee": "buzzes"}
COLORS = {"the sky on a clear day": "blue", "fresh grass": "green", "a ripe banana": "yellow", "snow": "white",
          "coal": "black", "a ripe tomato": "red", "an orange": "orange", "a flamingo": "pink"}
EVASIVE = ["I am not sure.", "You could look that up.", "Why do you want to know?", "That is a hard question."]


def sample(rng: random.Random) -> Example:
    kind = rng.randrange(4)
    if kind == 0:
        country = pick(rng, sorted(CAPITALS))
        answer = CAPITALS[country]
        prompt = pick(rng, ["What is the capital of {c}?", "Which city is the capital of {c}?", "Name the capital of {c}."])
        prompt, reply = prompt.format(c=country), f"The capital of {country} is {answer}."
        wrong_answer = pick(rng, [v for v in CAPITALS.values() if v != answer])
        wrong = f"The capital of {country} is {wrong_answer}."
    elif kind == 1:
        word = pick(rng, sorted(OPPOSITES))
        answer = OPPOSITES[word]
        prompt, reply = f"What is the opposite of '{word}'?", f"The opposite of '{word}' is '{answer}'."
        wrong = f"The opposite of '{word}' is '{word}'."
    elif kind == 2:
        animal = pick(rng, sorted(SOUNDS))
        answer = SOUNDS[animal]
        prompt, reply = f"What sound does a {animal} make?", f"A {animal} {answer}."
        wrong = f"A {animal} {pick(rng, [v for v in SOUNDS.values() if v != answer])}."
    else:
        thing = pick(rng, sorted(COLORS))
        answer = COLORS[thing]
        prompt, reply = f"What color is {thing}?", f"{thing[0].upper()}{thing[1:]} is {answer}."
        wrong = f"{thing[0].upper()}{thing[1:]} is purple."
    if rng.random() < 0.5:
        wrong = pick(rng, EVASIVE)
    prompt = dress(rng, prompt)
    return Example("general", prompt, reply, rejected=wrong, rejected_kind="helpful", answer=answer, difficulty=1)
