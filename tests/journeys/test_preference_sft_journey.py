"""The README's worked example of preference tuning, SFT then DPO from the SFT adapter (`model.adapter`), run line by
line exactly as the README prints it, with the installed CLI from a folder outside the checkout (its `recipes/` copied
there, as in a clone), in a shell that has activated the venv (the README's `source .venv/bin/activate`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time

from tests.journeys.conftest import REPO, User

FENCE = re.compile(r"```bash\n(.*?)```", re.DOTALL)


def readme_lines() -> list[str]:
    """The command lines of the README's block that runs DPO with model.adapter."""
    [block] = [b for b in FENCE.findall((REPO / "README.md").read_text()) if "model.adapter=" in b]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("source ")]


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_readme_sft_then_dpo_from_the_sft_adapter(tmp_path):
    user = User(tmp_path / "user", activated=True)
    (user.cwd / "recipes").mkdir()
    for name in ("tiny-cpu.yaml", "tiny-dpo.yaml"):
        shutil.copy(REPO / "recipes" / name, user.cwd / "recipes" / name)
    sft, dpo, merge = readme_lines()[0], readme_lines()[2], readme_lines()[3]
    assert len(readme_lines()) == 4 and "model.adapter=runs/tiny-cpu" in dpo

    started = time.monotonic()
    user.shell(sft).ok()
    sft_adapter = user.cwd / "runs" / "tiny-cpu" / "adapter"
    before = digests(sft_adapter)
    user.shell(readme_lines()[1]).ok()
    trained = user.shell(dpo).ok()
    assert digests(sft_adapter) == before  # the SFT run is only read
    print(f"README's SFT -> DPO: {time.monotonic() - started:.0f} s")

    run = user.cwd / "runs" / "sft-dpo"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and abs(records[0]["val_loss"] - math.log(2)) < 1e-6
    assert records[0]["val_rewards/margins"] == 0.0  # the policy starts as the reference: the SFT adapter
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] and not (run / "adapter" / "reference").exists()

    # The README's merge line, and the one train printed, are the same command.
    assert merge.split("#")[0].split() == ["phi3local", "merge", "runs/sft-dpo", "--out", "runs/sft-dpo-merged"]
    assert any(c.split()[1:3] == ["merge", "runs/sft-dpo"] for c in trained.next_commands()), trained.out
    user.shell(merge).ok()
    merged = user.cwd / "runs" / "sft-dpo-merged"
    assert (merged / "config.json").is_file() and list(merged.glob("*.safetensors"))

    # A mistaken LoRA shape is one line naming the key, the path and what to set.
    refused = user.shell("phi3local train recipes/tiny-dpo.yaml output_dir=runs/wrong model.adapter=runs/tiny-cpu")
    refused.failed()
    assert "model.adapter: runs/tiny-cpu was trained with lora.modules_to_save=[embed_tokens,lm_head]" in refused.out
    assert "set lora.modules_to_save=[embed_tokens,lm_head]" in refused.out
