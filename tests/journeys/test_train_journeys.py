"""The README's training path as a user walks it: prepare, train, merge, export, chat, the demo, Ctrl-C and resume.

Each journey runs the installed `phi3local` from a folder outside the checkout with an empty cache, and runs
every command the CLI prints (`next:`, `continue with:`, the demo's "Ask it yourself", --help's "Start with")
exactly as printed, in a fresh shell (the venv not activated) unless the journey activates it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.journeys.conftest import MAIN_BIN, REPO, User

TINY = REPO / "recipes" / "tiny-cpu.yaml"
QUICK = ["training.max_steps=8", "training.log_every=4", "eval.every=0", "eval.generate_samples=0",
         "training.checkpoint_every=0"]


def _copy_recipe(user: User, name: str = "my.yaml") -> str:
    """The README's `cp recipes/... my.yaml`: the recipe lives in the user's folder, not the checkout."""
    shutil.copy(TINY, user.cwd / name)
    return name


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wait_for(path: Path, proc, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not (path.is_file() and path.stat().st_size):
        assert proc.poll() is None, f"ended before {path} was written (exit {proc.returncode})"
        assert time.monotonic() < end, f"{path} not written within {timeout} s"
        time.sleep(0.2)


@pytest.mark.parametrize("output_dir", ["runs/mine", "ABSOLUTE"])
def test_prepare_then_the_printed_chain_runs_as_printed(user, output_dir):
    """Break 2 and 5: prepare into a run folder, then train/merge/export/chat exactly as each `next:` says."""
    recipe = _copy_recipe(user)
    out = str(user.cwd / "runs" / "mine") if output_dir == "ABSOLUTE" else output_dir
    if output_dir == "ABSOLUTE":
        user.env["COLUMNS"] = "200"  # and a wide terminal: the hints are the same words
    prepared = user.run("prepare", recipe, f"output_dir={out}", *QUICK).ok()
    # A summary, not the whole resolved recipe (that is saved in the run folder, and shown with -v).
    assert not {"lora:", "quantization:", "training:"} & set(map(str.strip, prepared.out.splitlines()))
    [train] = prepared.next_commands()
    assert train.startswith(f"{user.script} train {recipe} output_dir={out} ")  # the user's own words
    stats = user.cwd / out / "prepared" / "stats.json"
    prepared_at = stats.stat().st_mtime_ns
    trained = user.shell(train).ok()
    assert stats.stat().st_mtime_ns == prepared_at  # train took the prepared data as its own, unchanged
    assert (user.cwd / out / "adapter" / "adapter_model.safetensors").is_file()
    if output_dir == "ABSOLUTE":
        return  # the relative variant walks the rest of the chain
    [merge] = trained.next_commands()
    merged = user.shell(merge).ok()
    [export] = merged.next_commands()
    exported = user.shell(export + " --precision fp32").ok()
    [chat] = exported.next_commands()
    # Interactive chat with no terminal input: the end of input ends it cleanly.
    user.shell(chat).ok()
    answered = user.shell(chat + " --prompt 'Who and what?' --max-new-tokens 4").ok()
    assert answered.out.strip()


def test_hints_say_phi3local_in_an_activated_venv(tmp_path):
    """`source .venv/bin/activate`: the same hints, with the short name that now works."""
    user = User(tmp_path / "activated", activated=True)
    recipe = _copy_recipe(user)
    prepared = user.shell(f"phi3local prepare {recipe} output_dir=run {' '.join(QUICK)}").ok()
    [train] = prepared.next_commands()
    assert train.startswith(f"phi3local train {recipe} output_dir=run ")
    user.shell(train).ok()


def test_a_run_is_the_same_bit_for_bit_whatever_the_cache_holds(user):
    """Break 4: the tiny model built now or read from the cache gives the same LoRA init, losses and adapter."""
    recipe = _copy_recipe(user)
    args = [*QUICK, "training.max_steps=12", "training.log_every=1"]
    user.run("train", recipe, "output_dir=first", *args).ok()  # empty cache: the model is built
    assert any((Path(user.env["PHI3LOCAL_CACHE"])).rglob("config.json"))
    user.run("train", recipe, "output_dir=second", *args).ok()  # the model comes from the cache
    other = dict(PHI3LOCAL_CACHE=str(user.home / "other-cache"))
    user.run("train", recipe, "output_dir=third", *args, env=other).ok()  # empty again, after a filled one
    first, second, third = (_losses(user.cwd / d) for d in ("first", "second", "third"))
    assert len(first) == 12 and first == second == third
    digests = {_sha256(user.cwd / d / "adapter" / "adapter_model.safetensors") for d in ("first", "second", "third")}
    assert len(digests) == 1


def test_ctrl_c_prints_a_resume_that_runs_with_the_users_overrides(user):
    """Break 5: Ctrl-C's `continue with:` repeats the recipe and overrides; --resume on a finished run stops."""
    recipe = _copy_recipe(user)
    line = f"{user.script} train {recipe} output_dir=run training.max_steps=300 training.log_every=10 eval.every=0"
    proc = user.start(line, user.home / "train.log")
    _wait_for(user.cwd / "run" / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 128 + signal.SIGINT
    out = (user.home / "train.log").read_text()
    assert "Traceback" not in out, out
    [resume] = [ln.split("continue with:", 1)[1].strip() for ln in out.splitlines() if "continue with:" in ln]
    assert resume == f"{line} --resume"
    resumed = user.shell(resume).ok()
    assert "resumed from" in resumed.out
    assert json.loads((user.cwd / "run" / "trainer_state.json").read_text())["finished"]
    adapter = user.cwd / "run" / "adapter" / "adapter_model.safetensors"
    before = (adapter.stat().st_mtime_ns, _sha256(adapter))
    again = user.shell(resume).ok()  # break 7: a finished run is not trained again
    assert "finished run: nothing to resume" in again.out
    assert (adapter.stat().st_mtime_ns, _sha256(adapter)) == before


def test_helps_first_command_runs_as_printed_from_any_folder(user):
    """Break 5: --help's "Start with" command, typed in a fresh shell in the user's folder, trains."""
    helped = user.run("--help").ok()
    lines = helped.out.splitlines()
    command = lines[[i for i, ln in enumerate(lines) if ln.startswith("Start with")][0] + 1].strip()
    assert command == f"{user.script} train {TINY}"
    proc = user.start(command + " training.log_every=5", user.home / "start.log")
    _wait_for(user.cwd / "runs" / "tiny-cpu" / "metrics.jsonl", proc)  # the recipe's output_dir, from here
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 128 + signal.SIGINT
    assert "Traceback" not in (user.home / "start.log").read_text()


def test_a_bad_override_is_one_line_without_the_recipe(user):
    """Break 7: no 120-line recipe before a one-line error."""
    result = user.run("train", _copy_recipe(user), "training.lr=-1").failed(code=2)
    assert len(result.out.strip().splitlines()) == 1, result.out
    assert "training.lr" in result.out


def test_the_demo_as_make_demo_runs_it_and_its_chat_line(user):
    """Breaks 1, 4, 5: the demo's chain (shortened as tests/test_demo.py), its report at 60 columns, and the
    "Ask it yourself" command run as printed answers right; a second run with the cache filled is the same."""
    recipe = _copy_recipe(user, "demo.yaml")
    short = ["training.max_steps=200", "training.lr=8e-3", "training.checkpoint_every=0", "eval.every=0",
             "eval.generate_samples=0"]
    user.run("train", recipe, "output_dir=demo/run", *short).ok()
    user.run("merge", "demo/run", "--out", "demo/merged").ok()
    user.run("export", "demo/merged", "--out", "demo/onnx", "--precision", "fp32", "--target", "cpu").ok()
    python = str(MAIN_BIN / "python")
    report = user.run("-m", "phi3local.demo_report", "demo/run", "demo/onnx", "--json", program=python).ok()
    figures = json.loads(report.out[report.out.index("{\n"):])
    assert figures["after"]["right"] >= 24, figures["after"]
    lines = report.out[:report.out.index("{\n")].rstrip().splitlines()
    assert lines[-2] == "Ask it yourself:"
    ask = lines[-1].strip()
    assert ask.startswith(f"{user.script} chat demo/onnx --prompt "), ask
    answer = user.shell(ask).ok().out.strip()
    # The question it suggests is one the exported model answered right in the report.
    question = ask.split(" --prompt ", 1)[1].strip("'")
    assert question in report.out and answer.splitlines()[-1] in report.out

    user.run("train", recipe, "output_dir=demo/run2", *short).ok()  # the cache now holds the tiny model
    adapters = [user.cwd / "demo" / d / "adapter" / "adapter_model.safetensors" for d in ("run", "run2")]
    assert _sha256(adapters[0]) == _sha256(adapters[1])


def test_checkpointing_turned_on_is_selective_when_it_fits_and_trains_the_same(user):
    """A user turns checkpointing on: the plan keeps the matmul outputs (auto), says so, and the run's losses and
    adapter equal a run that recomputes every op (training.selective_checkpointing=false)."""
    recipe = _copy_recipe(user)
    args = [*QUICK, "training.log_every=1", "training.gradient_checkpointing=true"]
    selective = " ".join(user.run("train", recipe, "output_dir=selective", *args).ok().out.split())  # any width
    assert "float32, selective checkpointing" in selective and "auto selective_checkpointing: on" in selective
    full = " ".join(user.run("train", recipe, "output_dir=full", *args, "training.selective_checkpointing=false")
                    .ok().out.split())
    assert "float32, checkpointing on" in full and "selective checkpointing" not in full
    losses = {d: _losses(user.cwd / d) for d in ("selective", "full")}
    assert len(losses["full"]) == 8 and losses["selective"] == losses["full"]  # the same ops on the same inputs
    assert _sha256(user.cwd / "selective" / "adapter" / "adapter_model.safetensors") == _sha256(
        user.cwd / "full" / "adapter" / "adapter_model.safetensors")
