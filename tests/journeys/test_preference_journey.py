"""Preference tuning as a user runs it: copy the tiny DPO recipe, train it with the installed CLI, merge the result.

The recipe trains on the demo pairs shipped in the package (phi3local/assets/demo_preference.jsonl), so it runs from
the user's own folder; the adapter it leaves is a plain causal-LM adapter that `merge` takes unchanged.
"""

from __future__ import annotations

import json
import shutil

from tests.journeys.conftest import REPO


def test_tiny_dpo_recipe_trains_and_its_adapter_merges(user):
    shutil.copy(REPO / "recipes" / "tiny-dpo.yaml", user.cwd / "dpo.yaml")
    trained = user.run("train", "dpo.yaml", "output_dir=runs/dpo", "training.max_steps=6", "training.log_every=2",
                       "eval.every=3", "training.checkpoint_every=0", "training.display=plain").ok()
    records = [json.loads(line) for line in (user.cwd / "runs" / "dpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4, 6]
    for r in steps:
        assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"} <= set(r), r
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6] and all("val_rewards/accuracies" in r for r in evals)
    assert abs(evals[0]["val_loss"] - 0.6931471805599453) < 1e-6  # a fresh adapter is the reference: ln 2
    assert "rewards/accuracies=" in trained.out  # the plain panel's log lines
    summary = json.loads((user.cwd / "runs" / "dpo" / "summary.json").read_text())
    assert summary["final"]["val_rewards/accuracies"] >= 0 and summary["samples"]

    [merge] = trained.next_commands()  # as printed: phi3local merge runs/dpo --out runs/dpo-merged
    user.shell(merge).ok()
    merged = user.cwd / "runs" / "dpo-merged"
    assert (merged / "config.json").is_file() and list(merged.glob("*.safetensors"))
    gen = json.loads((merged / "generation_config.json").read_text())
    assert gen["eos_token_id"]  # the stop ids of the chat model, as an SFT run leaves them

    # `eval` of the run on pairs: the preference figures, not a causal LM's perplexity.
    data = REPO / "phi3local" / "assets" / "demo_preference.jsonl"
    evaluated = user.run("eval", "runs/dpo", "--data", data).ok()
    assert "reward accuracy" in evaluated.out and "perplexity" not in evaluated.out
    out = user.run("eval", "runs/dpo", "--data", data, "--json").ok().out
    as_json = json.loads(out)
    assert 0 <= as_json["val_rewards/accuracies"] <= 1

