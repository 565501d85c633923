#!/usr/bin/env python3
"""Write ``stories.txt``: simple synthetic English stories for the tiny bundled model.

Every word comes from the lists below and every sentence from the templates below, so the
text is ours to ship (no third-party text). A fixed seed makes the file byte-identical on
every run. Stories are separated by blank lines.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

SEED = 1234
STORIES = 400
OUT = Path(__file__).resolve().parent / "stories.txt"

NAMES = {
    "she": ["Lily", "Anna", "Mia", "Rosa", "Ella", "Nora", "Sara", "Ruby", "Ivy", "Maya"],
    "he": ["Tom", "Ben", "Sam", "Leo", "Max", "Jack", "Finn", "Noah", "Owen", "Hugo"],
}
ANIMALS = ["cat", "dog", "rabbit", "fox", "bear", "duck", "mouse", "owl", "frog", "pig"]
ADJECTIVES = ["little", "happy", "brave", "kind", "curious", "shy", "clever", "sleepy"]
PLACES = ["forest", "village", "garden", "farm", "town", "meadow", "valley", "park"]
LANDMARKS = ["old tree", "river", "big rock", "pond", "hill", "bridge", "fence", "well"]
OBJECTS = ["ball", "kite", "box", "hat", "book", "boat", "drum", "key", "shell", "cup"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "brown"]
HOBBIES = [
    "play in the sun",
    "sing songs",
    "read books",
    "dig in the dirt",
    "count the stars",
    "pick flowers",
    "bake bread",
    "run in the grass",
]
GOALS = [
    ("climb the hill", "the path was steep"),
    ("cross the river", "the water was too deep"),
    ("find the lost key", "it was getting dark"),
    ("fly the kite", "there was no wind"),
    ("build a house", "the wood was too heavy"),
    ("catch a fish", "the fish swam away"),
    ("open the box", "the lid was stuck"),
    ("reach the apple", "the branch was too high"),
]
FOODS = ["soup", "cake", "apples", "honey", "bread", "berries", "carrots", "cookies"]
TIMES = ["morning", "afternoon", "evening", "day"]
WEATHER = ["the sun was warm", "the sky was grey", "it was raining", "the wind was cold"]
LESSONS = [
    "always helped others",
    "never gave up",
    "shared with friends",
    "listened carefully",
    "was careful near the water",
    "said thank you",
]


@dataclass(frozen=True)
class Hero:
    name: str
    pronoun: str
    animal: str

    @property
    def possessive(self) -> str:
        return "her" if self.pronoun == "she" else "his"


def hero(rng: random.Random) -> Hero:
    pronoun = rng.choice(["she", "he"])
    return Hero(rng.choice(NAMES[pronoun]), pronoun, rng.choice(ANIMALS))


def opening(rng: random.Random, h: Hero) -> list[str]:
    adjective, place = rng.choice(ADJECTIVES), rng.choice(PLACES)
    first = rng.choice(
        [
            f"Once upon a time, there was a {adjective} {h.animal} named {h.name}.",
            f"In a quiet {place}, there lived a {adjective} {h.animal} called {h.name}.",
            f"{h.name} was a {adjective} {h.animal} who lived near the {place}.",
        ]
    )
    color, thing = rng.choice(COLORS), rng.choice(OBJECTS)
    return [
        first,
        f"{h.pronoun.capitalize()} liked to {rng.choice(HOBBIES)}.",
        f"{h.pronoun.capitalize()} had a {color} {thing} that {h.pronoun} loved very much.",
        f"Every day, {h.name} took {h.possessive} {thing} to the {rng.choice(LANDMARKS)}.",
    ]


def problem(rng: random.Random, h: Hero) -> tuple[list[str], str]:
    goal, trouble = rng.choice(GOALS)
    time, weather = rng.choice(TIMES), rng.choice(WEATHER)
    feeling = rng.choice(["sad", "scared", "tired", "worried"])
    lines = [
        f"One {time}, {weather}.",
        f"{h.name} wanted to {goal}, but {trouble}.",
        f"{h.name} felt {feeling}.",
        f'"What can I do?" {h.pronoun} said.',
    ]
    return lines, goal


def helper(rng: random.Random, h: Hero, goal: str) -> list[str]:
    friend = hero(rng)
    while friend.name == h.name:
        friend = hero(rng)
    landmark = rng.choice(LANDMARKS)
    return [
        f"Just then, {friend.name} the {friend.animal} came by the {landmark}.",
        f'"Why are you {rng.choice(["sad", "quiet", "alone"])}?" asked {friend.name}.',
        f'"I want to {goal}," said {h.name}.',
        f'"I will help you," said {friend.name}. "We can do it together."',
        f"So {h.name} and {friend.name} worked together, and at last they did it.",
        f"{h.name} felt {rng.choice(['happy', 'proud', 'excited'])}.",
        f'"Thank you, {friend.name}," said {h.name}. "You are a good friend."',
    ]


def ending(rng: random.Random, h: Hero) -> list[str]:
    food, place = rng.choice(FOODS), rng.choice(PLACES)
    return [
        f"That {rng.choice(['evening', 'night'])}, they ate {food} and went home to the {place}.",
        f"From that day on, {h.name} {rng.choice(LESSONS)}.",
    ]


def story(rng: random.Random) -> str:
    h = hero(rng)
    trouble, goal = problem(rng, h)
    sentences = opening(rng, h) + trouble + helper(rng, h, goal) + ending(rng, h)
    return " ".join(sentences)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rng = random.Random(SEED)
    args.out.write_text("\n\n".join(story(rng) for _ in range(STORIES)) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
