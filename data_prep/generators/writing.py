"""Templated writing tasks (short poems, notes, descriptions, sentences). ``rejected`` is an unhelpful reply."""

from __future__ import annotations

import random

from . import Example, dress, pick

TOPICS = ["the sea", "autumn", "the moon", "a city at night", "friendship", "the mountains", "rain", "a garden",
          "winter", "the stars", "a quiet morning", "the forest", "a river", "summer", "a lighthouse", "snow"]
ADJECTIVES = ["quiet", "bright", "gentle", "endless", "golden", "silver", "soft", "wild", "calm", "deep"]
VERBS = ["sings", "waits", "shines", "drifts", "glows", "whispers", "rests", "dances"]
GIFTS = ["the book", "the flowers", "the kind letter", "the birthday cake", "your help with the move", "the scarf"]
PEOPLE = ["Anna", "Mr. Lee", "Grandma", "my neighbor", "the team", "Professor Diaz", "Sam", "Aunt Rosa"]
THINGS = ["a bicycle", "a teapot", "a library", "a violin", "a lighthouse", "a compass", "an umbrella", "a clock"]
DESCRIPTIONS = {
    "a bicycle": "a two-wheeled vehicle that you pedal to move forward",
    "a teapot": "a pot with a spout and a handle, used to brew and pour tea",
    "a library": "a place that keeps books and other media for people to borrow and read",
    "a violin": "a wooden string instrument played with a bow",
    "a lighthouse": "a tower with a bright light that guides ships near the coast",
    "a compass": "a tool with a magnetic needle that points north",
    "an umbrella": "a folding canopy on a stick that keeps the rain off",
    "a clock": "a device that shows the time with hands or digits",
}
UNHELPFUL = ["I don't know.", "That is not something I can write.", "Maybe later.", "Write it yourself.", "Okay."]


def _poem(rng):
    topic = pick(rng, TOPICS)
    a, b = rng.sample(ADJECTIVES, 2)
    v1, v2 = rng.sample(VERBS, 2)
    lines = [f"Above {topic} the {a} light {v1},", f"and every {b} moment {v2} slow;",
             f"I keep {topic} close in mind,", "a small song for the road ahead."]
    return f"Write a short poem about {topic}.", "\n".join(lines)


def _note(rng):
    person, gift = pick(rng, PEOPLE), pick(rng, GIFTS)
    prompt = f"Write a short thank-you note to {person} for {gift}."
    reply = (f"Dear {person},\n\nThank you so much for {gift}. It meant a lot to me, and I am grateful for your "
             f"kindness.\n\nWith warm wishes")
    return prompt, reply


def _describe(rng):
    thing = pick(rng, THINGS)
    return f"Describe {thing} in one sentence.", f"{thing[0].upper()}{thing[1:]} is {DESCRIPTIONS[thing]}."


def _sentence(rng):
    adjective, topic = pick(rng, ADJECTIVES), pick(rng, TOPICS)
    return (f"Write a sentence that uses the word '{adjective}'.",
            f"We walked beside {topic} on a {adjective} evening and said nothing at all.")


def sample(rng: random.Random) -> Example:
    prompt, reply = pick(rng, [_poem, _note, _describe, _sentence])(rng)
    return Example("writing", dress(rng, prompt), reply, rejected=pick(rng, UNHELPFUL), rejected_kind="helpful", difficulty=1)
