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

# The chat demo: three kinds of question a 2-layer, 64-wide model learns to answer exactly in under a
# minute of CPU training, each in several phrasings, so that a newcomer can check every answer at a glance.
# - who/what: copy the person and the thing out of a one-line story ("Who: Lily. What: dog."); it
#   generalises to stories, and person-thing pairs, the training data never has.
# - capitals and opposites: small closed sets of facts (an opposite is asked one way only: hot -> cold),
#   held out in a phrasing the training data never pairs with that fact (each fact leaves one out).
# Each name, and each thing, starts with a letter no other one does: the model copies a word it sees as
# a few pieces, and the first piece then tells which word it is.
NAMES = ["Anna", "Ben", "Dan", "Emma", "Finn", "Gus", "Jack", "Kim", "Lily", "Max", "Rosa", "Tom"]
THINGS = ["ball", "cat", "dog", "fish", "hat", "kite", "lamp", "mug", "pen", "toy"]
VERBS = ["saw", "found", "liked", "had", "wanted", "lost"]
ADJECTIVES = ["red", "blue", "green", "pink", "little", "funny", "shiny", "tiny"]  # none is an OPPOSITES word
PLACES = ["in the park", "at home", "by the lake", "in the garden", "at school", "near the river"]  # no THINGS
STORY_ASKS = ["{story} Who and what?", "Who and what: {story}", "Read this: {story} Tell me who and what.",
              "Find who and what. {story}"]
CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Egypt", "Cairo"),
            ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Greece", "Athens"), ("Norway", "Oslo")]
CAPITAL_ASKS = ["What is the capital of {country}?", "Capital of {country}?", "Name the capital of {country}.",
                "Which city is the capital of {country}?"]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("day", "night"),
             ("old", "new"), ("happy", "sad"), ("open", "closed"), ("light", "dark"), ("full", "empty")]
OPPOSITE_ASKS = ["What is the opposite of {word}?", "Opposite of {word}?", "Give the opposite of {word}.",
                 "What word means the opposite of {word}?"]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a friendly assistant. Answer in one short sentence.",
                  "Answer briefly."]
KINDS = ("who_what", "capital", "opposite")


def _held_out_pair(name: int, thing: int) -> bool:
    """Person-thing pairs kept out of the training data (one in six), for the held-out stories."""
    return (name + thing) % 6 == 0


def _held_out_ask(fact: int, n_asks: int) -> int:
    """The phrasing each capital / opposite is never asked in during training."""
    return fact % n_asks


def _fact(kind: str, i: int, ask: int) -> tuple[str, str]:
    """Fact i of CAPITALS or OPPOSITES asked in phrasing `ask`, and its answer."""
    if kind == "capital":
        country, city = CAPITALS[i]
        return CAPITAL_ASKS[ask].format(country=country), f"The capital of {country} is {city}."
    word, opposite = OPPOSITES[i]
    return OPPOSITE_ASKS[ask].format(word=word), f"The opposite of {word} is {opposite}."


def _task(rng: random.Random, kind: str, held_out: bool = False) -> tuple[str, str]:
    """One question and its answer; held_out picks only combinations the training rows never have."""
    if kind == "who_what":
        while True:
            n, t = rng.randrange(len(NAMES)), rng.randrange(len(THINGS))
            if _held_out_pair(n, t) == held_out:
                break
        name, thing = NAMES[n], THINGS[t]
        story = f"{name} {rng.choice(VERBS)} a {rng.choice(ADJECTIVES)} {thing} {rng.choice(PLACES)}."
        return rng.choice(STORY_ASKS).format(story=story), f"Who: {name}. What: {thing}."
    facts, asks = (CAPITALS, CAPITAL_ASKS) if kind == "capital" else (OPPOSITES, OPPOSITE_ASKS)
    i = rng.randrange(len(facts))
    left_out = _held_out_ask(i, len(asks))
    ask = left_out if held_out else rng.choice([a for a in range(len(asks)) if a != left_out])
    return _fact(kind, i, ask)


def generate_chat(n: int = 400, seed: int = SEED) -> list[dict]:
    """n distinct conversations in Azure `messages` format; ~25% with a system prompt, ~20% multi-turn.

    A multi-turn conversation asks each kind of question at most once.
    """
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        messages = []
        if rng.random() < 0.25:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        turns = rng.choice([2, 3]) if rng.random() < 0.2 else 1
        # Half the one-question chats are stories; a longer chat asks each kind at most once.
        kinds = [rng.choice(KINDS[:1] + KINDS)] if turns == 1 else rng.sample(KINDS, turns)
        for kind in kinds:
            question, answer = _task(rng, kind)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        key = json.dumps(messages)
        if key not in seen:
            seen.add(key)
            rows.append({"messages": messages})
    return rows


def generate_held_out(stories: int = 10, seed: int = SEED + 2) -> list[dict]:
    """Single-turn chats none of the training rows has: `stories` stories, every capital and every opposite.

    Each held-out story pairs a person with a thing no training story pairs them with (_held_out_pair);
    each capital and opposite is asked in the one phrasing the training rows never use for it
    (_held_out_ask). The kinds take turns (story, capital, opposite, ...); ~25% have a system prompt.
    """
    rng = random.Random(seed)
    story_rows, seen = [], set()
    while len(story_rows) < stories:
        question, answer = _task(rng, "who_what", held_out=True)
        if question not in seen:
            seen.add(question)
            story_rows.append((question, answer))
    facts = {kind: [_fact(kind, i, _held_out_ask(i, len(asks))) for i in range(len(table))]
             for kind, table, asks in (("capital", CAPITALS, CAPITAL_ASKS), ("opposite", OPPOSITES, OPPOSITE_ASKS))}
    queues = [story_rows, facts["capital"], facts["opposite"]]
    rows = []
    for k in range(max(map(len, queues))):
        for queue in queues:
            if k < len(queue):
                question, answer = queue[k]
                system = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.25 else []
                rows.append({"messages": system + [{"role": "user", "content": question},
                                                   {"role": "assistant", "content": answer}]})
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
