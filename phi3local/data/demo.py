"""The embedded demo data: small, highly regular tasks that a 2-layer 64-dim model learns in minutes.

The generated files are checked in under `phi3local/assets/` (`make demo` and the fast tests train on
them); this module is how they were made. Regenerate with `python -m phi3local.data.demo` and check with
`python -m phi3local.data.demo --check`. Everything here was written for this project.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CHAT_FILE = ASSETS / "demo_chat.jsonl"
CLASSIFICATION_FILE = ASSETS / "demo_classification.jsonl"
DEMO_LABELS = ["negative", "neutral", "positive"]
SEED = 1234

WORDS = ["cat", "dog", "sun", "tree", "book", "fish", "bird", "milk", "star", "moon", "cake", "frog",
         "lamp", "rain", "ship", "rose", "bell", "wolf", "kite", "door", "hat", "pen", "cup", "box"]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("day", "night"),
             ("old", "new"), ("happy", "sad"), ("open", "closed"), ("light", "dark"), ("full", "empty"),
             ("wet", "dry"), ("early", "late"), ("loud", "quiet"), ("hard", "soft")]
COLORS = [("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("a banana", "yellow"),
          ("coal", "black"), ("a tomato", "red"), ("an orange", "orange"), ("a lemon", "yellow"),
          ("the sea", "blue"), ("a leaf", "green"), ("milk", "white"), ("a strawberry", "red")]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a friendly assistant. Answer in one short sentence."]


def _task(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(["plus", "plus", "minus", "backwards", "capitals", "after", "opposite", "color", "hello"])
    if kind == "plus":
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == "minus":
        a = rng.randint(1, 20)
        b = rng.randint(0, a)
        return f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."
    if kind == "backwards":
        w = rng.choice(WORDS)
        return f"Spell {w} backwards.", w[::-1]
    if kind == "capitals":
        w = rng.choice(WORDS)
        return f"Write {w} in capital letters.", w.upper()
    if kind == "after":
        n = rng.randint(0, 50)
        return f"What number comes after {n}?", f"{n + 1} comes after {n}."
    if kind == "opposite":
        a, b = rng.choice(OPPOSITES)
        if rng.random() < 0.5:
            a, b = b, a
        return f"What is the opposite of {a}?", f"The opposite of {a} is {b}."
    if kind == "color":
        thing, color = rng.choice(COLORS)
        return f"What color is {thing}?", f"{thing[0].upper() + thing[1:]} is {color}."
    return rng.choice(["Hello!", "Hi!", "Good morning!"]), "Hello! How can I help you today?"


def generate_chat(n: int = 400, seed: int = SEED) -> list[dict]:
    """n distinct conversations in Azure `messages` format; ~25% with a system prompt, ~20% multi-turn."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        messages = []
        if rng.random() < 0.25:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        turns = rng.choice([2, 3]) if rng.random() < 0.2 else 1
        for _ in range(turns):
            question, answer = _task(rng)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        key = json.dumps(messages)
        if key not in seen:
            seen.add(key)
            rows.append({"messages": messages})
    return rows


ITEMS = ["phone", "lamp", "chair", "book", "kettle", "jacket", "bike", "camera", "desk", "watch",
         "blender", "backpack", "radio", "pillow", "mug", "printer", "speaker", "toaster", "umbrella", "tent"]
CUES = {
    "positive": ["I love this {item}.", "This {item} is great!", "What a wonderful {item}.",
                 "The {item} works perfectly, excellent.", "Amazing {item}, I am very happy with it.",
                 "Best {item} ever, highly recommended."],
    "negative": ["I hate this {item}.", "This {item} is terrible.", "The {item} broke after a day, awful.",
                 "What a waste, the {item} is bad.", "Horrible {item}, I am very disappointed.",
                 "Worst {item} ever, do not buy it."],
    "neutral": ["The {item} arrived on {day}.", "This {item} is {color}.", "I bought the {item} last week.",
                "The {item} comes in a box.", "The {item} weighs about {n} kilos.", "My {item} is in the kitchen."],
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
PLAIN_COLORS = ["blue", "grey", "black", "white", "green", "red"]


def generate_classification(n: int = 300, seed: int = SEED) -> list[dict]:
    """n distinct {text, label} rows, balanced over DEMO_LABELS, each label with its own cue words."""
    rng = random.Random(seed + 1)
    rows, seen = [], set()
    per_label = n // len(DEMO_LABELS)
    for label in DEMO_LABELS:
        count = 0
        while count < per_label:
            text = rng.choice(CUES[label]).format(item=rng.choice(ITEMS), day=rng.choice(DAYS),
                                                  color=rng.choice(PLAIN_COLORS), n=rng.randint(1, 9))
            if text not in seen:
                seen.add(text)
                rows.append({"text": text, "label": label})
                count += 1
    rng.shuffle(rows)
    return rows


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_demo_files(folder: Path = ASSETS) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    chat, cls = folder / CHAT_FILE.name, folder / CLASSIFICATION_FILE.name
    chat.write_text(to_jsonl(generate_chat()), encoding="utf-8")
    cls.write_text(to_jsonl(generate_classification()), encoding="utf-8")
    return [chat, cls]


def demo_texts() -> list[str]:
    """Every text in the checked-in demo files (message contents, classification texts), in file order.

    The embedded tiny model builds its vocabulary from these.
    """
    texts = []
    for line in CHAT_FILE.read_text(encoding="utf-8").splitlines():
        texts += [m["content"] for m in json.loads(line)["messages"]]
    for line in CLASSIFICATION_FILE.read_text(encoding="utf-8").splitlines():
        texts.append(json.loads(line)["text"])
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="check the checked-in files match the generator")
    args = parser.parse_args(argv)
    expected = {CHAT_FILE: to_jsonl(generate_chat()), CLASSIFICATION_FILE: to_jsonl(generate_classification())}
    if args.check:
        stale = [p.name for p, text in expected.items() if not p.exists() or p.read_text(encoding="utf-8") != text]
        if stale:
            print(f"out of date: {', '.join(stale)}; run python -m phi3local.data.demo", file=sys.stderr)
            return 1
        print("demo files are up to date")
        return 0
    for path in write_demo_files():
        print(f"wrote {path.name} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
