"""A user with a preference file made for Azure's preference fine-tuning prepares it here, unchanged.

The installed `phi3local prepare` of a recipe the user writes (task: preference, the embedded tiny model), run
from the user's folder: it succeeds and prints the pair statistics; a file with one bad row fails with one
line naming file:line and the field.
"""

from __future__ import annotations

import json

RECIPE = """\
task: preference
output_dir: runs/prefs
model:
  name_or_path: tiny
data:
  train_file: {train}
  val_fraction: 0.2
preference:
  loss: dpo
  beta: 0.1
"""


def _azure_row(q: str, good: str, bad: str) -> str:
    return json.dumps({"input": {"messages": [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": q}]},
                       "preferred_output": [{"role": "assistant", "content": good}],
                       "non_preferred_output": [{"role": "assistant", "content": bad}]})


def test_prepare_an_azure_preference_file(user):
    rows = [_azure_row(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.", f"It is {2 * i + 1}.") for i in range(10)]
    (user.cwd / "prefs.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (user.cwd / "prefs.yaml").write_text(RECIPE.format(train="prefs.jsonl"), encoding="utf-8")

    done = user.run("prepare", "prefs.yaml", timeout=900).ok()
    assert "Pairs: 8 train, 2 validation" in done.out, done.out
    assert "Pair lengths in tokens" in done.out and "azure_preference" in done.out
    prepared = user.cwd / "runs" / "prefs" / "prepared"
    stats = json.loads((prepared / "stats.json").read_text())
    assert stats["task"] == "preference" and stats["preference"]["all"]["pairs"] == 10
    assert (prepared / "train").is_dir() and (prepared / "validation").is_dir()

    # One bad row: the user is told where and which field, in one line.
    rows[3] = json.dumps({**json.loads(rows[3]), "non_preferred_output": [{"role": "user", "content": "It is 7."}]})
    (user.cwd / "bad.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (user.cwd / "bad.yaml").write_text(RECIPE.format(train="bad.jsonl"), encoding="utf-8")
    failed = user.run("prepare", "bad.yaml", "output_dir=runs/bad").failed()
    named = [line for line in failed.out.splitlines() if "bad.jsonl:4" in line]
    assert len(named) == 1, failed.out
    assert "non_preferred_output[0].role: must be assistant, got 'user'" in named[0]
