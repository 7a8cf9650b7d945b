"""Journeys of issue 28: a user plans Phi-4 QLoRA for a 24 GB card, and prepares reasoning data for a Phi-4 model
with the reasoning trace trained and then masked.

The real Phi-4 is not downloaded: `plan` needs only its known shapes, and `prepare` runs on the project's tiny
Phi-4 stand-in (`phi3local/model/family.py`, member "phi4": Phi-4's chat tokens and template), built here and
named by its folder in `model.name_or_path`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.journeys.conftest import REPO

COLUMNS = 60  # the `user` fixture's terminal


def test_plan_of_phi4_on_a_24gb_card_fits(user):
    result = user.run("plan", REPO / "recipes" / "phi4-qlora.yaml", "--device-memory", "24GB").ok()
    lines = result.out.splitlines()
    assert not [line for line in lines if len(line) > COLUMNS]
    assert "24 GiB card: 1 x 4096 tokens" in result.out
    verdict = next(line.split() for line in lines if line.split()[:1] == ["verdict"])
    assert verdict == ["verdict", "fits"]
    peak = next(line for line in lines if line.strip().startswith("peak (step's tensors)"))
    value = float(re.search(r"([\d.]+) GiB$", peak.strip()).group(1))
    assert 11 < value < 13, peak  # about half of the card: what the README states
    assert "does not fit" not in result.out


def _rows() -> list[dict]:
    """Twenty reasoning chats: traces in a `reasoning` field, in the content as <think>...</think>, a system turn
    and a second exchange in some."""
    rows = []
    for i in range(20):
        a, b = 3 + i, 4 + 2 * i
        trace = f"Start at {a} and count {b} more: {a} plus {b} is {a + b}."
        question = {"role": "user", "content": f"What is {a} plus {b}?"}
        if i % 2:
            answer = {"role": "assistant", "content": f"{a + b}.", "reasoning": trace}
        else:
            answer = {"role": "assistant", "content": f"<think>\n{trace}\n</think>\n\n{a + b}."}
        messages = [question, answer]
        if i % 5 == 0:
            messages = [{"role": "system", "content": "Think, then answer with the number."}] + messages + [
                {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You are welcome."}]
        rows.append({"messages": messages})
    return rows


def _tokens(run: Path) -> dict:
    return json.loads((run / "prepared" / "stats.json").read_text())["tokens"]["all"]


def test_prepare_reasoning_data_with_the_trace_trained_then_masked(user):
    from phi3local.data.demo import demo_texts
    from phi3local.data.formats import to_example
    from phi3local.data.records import Location, RawRecord
    from phi3local.data.template import encode_conversation
    from phi3local.model.family import ensure_tiny_member
    from phi3local.model.tokenizer import load_tokenizer

    model = ensure_tiny_member("phi4", user.home / "models" / "tiny-phi4", demo_texts())
    data = user.cwd / "reasoning.jsonl"
    rows = _rows()
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    recipe = REPO / "recipes" / "phi4-reasoning-qlora.yaml"
    common = [f"model.name_or_path={model}", f"data.train_file={data}", "output_dir=run", "data.max_seq_len=256"]

    on = user.run("prepare", recipe, *common).ok()
    assert "20" in on.out
    trained = _tokens(user.cwd / "run")
    # The user turns the trace off in the same run folder: prepare sees the changed setting and prepares again.
    user.run("prepare", recipe, *common, "data.train_on_reasoning=false").ok()
    masked = _tokens(user.cwd / "run")

    assert trained["rows"] == masked["rows"] == 20 and trained["tokens"] == masked["tokens"]  # the same text
    assert 0 < masked["trained_tokens"] < trained["trained_tokens"], (
        "prepare ignored data.train_on_reasoning=false: phi3local/data/prepare.py must pass it to "
        "encode_conversation (encode_example) and count it in CACHE_FIELDS")
    # What is no longer trained is exactly the traces (<think> ... </think> and the blank line after them).
    tokenizer = load_tokenizer(model)
    expected = 0
    for row in rows:
        messages = to_example(RawRecord(row, Location("reasoning.jsonl", line=1)), "messages").messages
        expected += (encode_conversation(tokenizer, messages, 256).n_trained
                     - encode_conversation(tokenizer, messages, 256, train_on_reasoning=False).n_trained)
    assert trained["trained_tokens"] - masked["trained_tokens"] == expected > 20 * 15
