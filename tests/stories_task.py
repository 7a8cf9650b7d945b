"""A small task stories260K has never seen: answer a one-line story with a fixed two-field format.

"Lily saw a big dog in the park." -> "Who: Lily. What: dog."  The model must learn the format and
copy the right words from the prompt; it is in the words of TinyStories so its 512-token vocabulary
covers it.
"""

import json
import random
from pathlib import Path

NAMES = ["Lily", "Tom", "Ben", "Sue", "Max", "Mia", "Sam", "Anna", "Tim", "Lucy", "Jack", "Amy"]
THINGS = ["dog", "cat", "bird", "ball", "tree", "car", "cake", "fish", "box", "hat", "toy", "frog"]
PLACES = ["in the park", "at home", "by the tree", "in the garden", "at school", "near the river"]
VERBS = ["saw", "found", "liked", "had", "wanted"]
ADJ = ["big", "small", "red", "happy", "little", "blue"]


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        story = f"{name} {rng.choice(VERBS)} a {rng.choice(ADJ)} {thing} {rng.choice(PLACES)}."
        rows.append({"messages": [{"role": "user", "content": story},
                                  {"role": "assistant", "content": f"Who: {name}. What: {thing}."}]})
    return rows


def write_task(folder: Path, n_train: int = 400, n_val: int = 40) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    train, val = folder / "train.jsonl", folder / "validation.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in make_rows(n_train, seed=1)))
    val.write_text("".join(json.dumps(r) + "\n" for r in make_rows(n_val, seed=2)))
    return train, val
