"""Misuse that must never lose a user's files, run code from a checkpoint, or resume silently from damage.

Each test points a stage at something a user could plausibly hand it and checks the one-line error, the
exit status, and that every file the user owns is byte-for-byte as it was.
"""

import errno
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from phi3local import folders
from phi3local.cli import main
from phi3local.config import load_recipe
from phi3local.train import checkpoint as ckpt
from phi3local.train import recipe as loop

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny-cpu.yaml"
QUICK = ["training.display=none", "eval.generate_samples=0", "eval.every=0", "training.log_every=1",
         "training.micro_batch_size=2"]


def recipe_for(run_dir, *overrides):
    return load_recipe(TINY, [f"output_dir={run_dir}", *QUICK, *overrides])


def snapshot(folder: Path, ignore: tuple[str, ...] = ()) -> dict[str, str]:
    """Every entry under folder (links not followed) with its bytes' sha256 (or the link's target)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            if name in ignore:
                continue
            p = Path(root) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = "link->" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


def users_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "recipe.yaml").write_text("my own recipe, not phi3local's\n")
    (path / "adapter").mkdir()
    (path / "adapter" / "weights.bin").write_bytes(os.urandom(64))
    return path


def cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# ------------------------------------------------------------------------------------ user's folders


@pytest.mark.parametrize("flag", [[], ["--overwrite"], ["--resume"]])
def test_train_refuses_a_folder_it_did_not_write(tmp_path, capsys, flag):
    mine = users_folder(tmp_path / "mine")
    before = snapshot(mine)
    code, out = cli(capsys, "train", TINY, f"output_dir={mine}", *QUICK, *flag)
    assert code == 1
    assert "holds files phi3local did not write" in out and str(mine) in out and "Traceback" not in out
    assert snapshot(mine) == before


@pytest.mark.parametrize("stage", ["merge", "export"])
def test_merge_and_export_never_replace_a_folder_they_did_not_write(tmp_path, capsys, stage):
    mine = users_folder(tmp_path / "mine")
    before = snapshot(mine)
    code, out = cli(capsys, stage, tmp_path / "does-not-matter", "--out", mine, "--overwrite")
    assert code == 1 and "holds files phi3local did not write" in out and "Traceback" not in out
    assert snapshot(mine) == before


def test_an_output_that_is_a_link_is_refused_and_a_link_inside_a_run_is_removed_not_followed(tmp_path, capsys):
    mine = users_folder(tmp_path / "mine")
    before = snapshot(mine)
    link = tmp_path / "link"
    link.symlink_to(mine)
    code, out = cli(capsys, "train", TINY, f"output_dir={link}", *QUICK, "training.max_steps=1")
    assert code == 1 and "symbolic link" in out
    # A run folder of ours with a link planted in it: --overwrite removes the link, never its target.
    run = tmp_path / "run"
    loop.run_training(recipe_for(run, "training.max_steps=1", "training.checkpoint_every=0"))
    (run / "adapter-link").symlink_to(mine)
    (run / "checkpoints" / "step-9").symlink_to(mine)
    loop.run_training(recipe_for(run, "training.max_steps=1", "training.checkpoint_every=0"), overwrite=True)
    assert not (run / "adapter-link").is_symlink() and not (run / "checkpoints" / "step-9").exists()
    assert snapshot(mine) == before


def test_a_second_train_into_a_live_run_is_refused_and_touches_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    folders.claim(run, "train")
    pending = run / "checkpoints" / ".tmp-step-3-4242"
    pending.mkdir(parents=True)
    (pending / "optimizer.pt").write_bytes(b"half written by the live run")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from phi3local import folders\n"
         "with folders.exclusive(Path(sys.argv[1]), 'training'):\n print('locked', flush=True); time.sleep(60)",
         str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run)
        started = time.time()
        for flag in ([], ["--overwrite"], ["--resume"]):
            code, out = cli(capsys, "train", TINY, f"output_dir={run}", *QUICK, *flag)
            assert code == 1 and f"pid {holder.pid}" in out and "in use" in out, out
        assert time.time() - started < 10  # refused at once, not after loading anything
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()
    # Once the holder is gone (even killed), the folder is free again.
    with folders.exclusive(run, "training"):
        pass


# ------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A run stopped after step 4 with checkpoints at steps 2 and 4 (the state resume starts from)."""
    run = tmp_path_factory.mktemp("interrupted") / "run"
    recipe = recipe_for(run, "training.max_steps=6", "training.checkpoint_every=2")
    real = loop.train_step
    calls = []

    def stop_after_four(r, batches):
        out = real(r, batches)
        calls.append(1)
        if len(calls) == 4:
            r.stop_signal.append(15)
        return out

    loop.train_step = stop_after_four
    try:
        with pytest.raises(loop.TrainingInterrupted):
            loop.run_training(recipe)
    finally:
        loop.train_step = real
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-2", "step-4"]
    return run


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(folders.LOCK))
    return dst


def test_checkpoints_hold_no_pickled_objects(interrupted_run):
    latest = ckpt.list_checkpoints(interrupted_run)[-1]
    assert ckpt.verify(latest) == []
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        torch.load(latest / name, weights_only=True)  # raises if anything but tensors and plain values


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PWNED_MARKER']}",))


def test_a_crafted_pickle_in_a_checkpoint_is_never_executed(interrupted_run, tmp_path, capsys, monkeypatch):
    run = copy_run(interrupted_run, tmp_path / "run")
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED_MARKER", str(marker))
    latest = ckpt.list_checkpoints(run)[-1]
    torch.save({"python": Payload()}, latest / "rng.pt")
    ckpt.write_checksums(latest)  # the attacker fixes the checksums too
    base = [f"output_dir={run}", *QUICK, "training.max_steps=6", "training.checkpoint_every=2"]
    code, out = cli(capsys, "train", TINY, *base, "training.on_damaged_checkpoint=stop", "--resume")
    assert code == 1 and "rng.pt holds pickled Python objects" in out, out
    # By default it is one more damaged checkpoint: reported, and the previous one is used.
    code, out = cli(capsys, "train", TINY, *base, "--resume")
    assert code == 0 and "step-4 is damaged" in out and "rng.pt holds pickled" in out and "step-2 (step 2)" in out
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["safetensors header", "trainer_state", "recipe", "optimizer"])
def test_a_checkpoint_damaged_behind_matching_checksums_is_not_resumed(interrupted_run, tmp_path, damage):
    run = copy_run(interrupted_run, tmp_path / "run")
    latest = ckpt.list_checkpoints(run)[-1]
    if damage == "safetensors header":
        path = latest / "adapter" / "adapter_model.safetensors"
        path.write_bytes(b"\xff" * 8 + path.read_bytes()[8:])
    elif damage == "trainer_state":
        (latest / "trainer_state.json").write_text('{"step": 4, "epo')
    elif damage == "recipe":
        (latest / "recipe.yaml").write_text("lora: [unclosed\n")
    else:
        path = latest / "optimizer.pt"
        path.write_bytes(path.read_bytes()[:200])
    ckpt.write_checksums(latest)  # written broken: the checksums match the broken files
    warnings = []
    found = ckpt.find_resumable(run, warn=warnings.append)
    assert found.path.name == "step-2" and "step-4 is damaged" in warnings[0] and "cannot be read" in warnings[0]
    (run / "checkpoints" / "step-3.bak").mkdir()  # a user's copy beside ours is left alone
    (run / "checkpoints" / "step-3.bak" / "trainer_state.json").write_text("{}")
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-2", "step-4"]


def test_a_damaged_latest_checkpoint_is_detected_and_the_previous_one_used(interrupted_run, tmp_path, capsys):
    run = copy_run(interrupted_run, tmp_path / "run")
    latest = ckpt.list_checkpoints(run)[-1]
    weights = latest / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100:-90] = bytes(10)  # flip bytes inside the tensor data, length unchanged
    weights.write_bytes(bytes(data))
    recipe = recipe_for(run, "training.max_steps=6", "training.checkpoint_every=2")
    stop = recipe_for(run, "training.max_steps=6", "training.checkpoint_every=2", "training.on_damaged_checkpoint=stop")
    with pytest.raises(ckpt.CheckpointError, match="step-4 is damaged.*adapter_model.safetensors.*checksum"):
        loop.run_training(stop, resume=True)
    from rich.console import Console

    console = Console(record=True, width=200)
    summary = loop.run_training(recipe, resume=True, console=console)
    shown = console.export_text()
    assert "step-4 is damaged" in shown and "resumed from" in shown and "step-2 (step 2)" in shown
    assert summary["steps"] == 6
    # The result equals an uninterrupted run of the same recipe: nothing of the damaged step-4 was used.
    clean = recipe_for(tmp_path / "clean", "training.max_steps=6", "training.checkpoint_every=2")
    loop.run_training(clean)
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    ref = [json.loads(x)["loss"] for x in (tmp_path / "clean" / "metrics.jsonl").read_text().splitlines()
           if '"loss"' in x]
    assert losses[-2:] == pytest.approx(ref[-2:], rel=1e-6, abs=1e-7)


def test_a_truncated_checkpoint_is_detected(interrupted_run, tmp_path):
    run = copy_run(interrupted_run, tmp_path / "run")
    latest = ckpt.list_checkpoints(run)[-1]
    with open(latest / "optimizer.pt", "r+b") as f:
        f.truncate(100)
    assert any("optimizer.pt" in p and "truncated" in p for p in ckpt.verify(latest))
    assert ckpt.find_resumable(run, warn=lambda m: None).path.name == "step-2"


def test_resume_with_a_changed_recipe_or_data_is_refused_before_anything_changes(interrupted_run, tmp_path, capsys):
    run = copy_run(interrupted_run, tmp_path / "run")
    before = snapshot(run, ignore=(folders.LOCK,))  # the refused attempts take (and drop) the run's lock
    base = [f"output_dir={run}", *QUICK, "training.max_steps=6", "training.checkpoint_every=2"]
    code, out = cli(capsys, "train", TINY, *base, "lora.r=8", "--resume")
    assert code == 1 and "lora.r: 16 -> 8" in out, out
    changed = tmp_path / "changed.jsonl"
    lines = (REPO / "phi3local" / "assets" / "demo_chat.jsonl").read_text().splitlines()
    changed.write_text("\n".join(lines[:-1]) + "\n")
    code, out = cli(capsys, "train", TINY, *base, f"data.train_file={changed}", "--resume")
    assert code == 1 and "data.train_file" in out, out  # the recipe key changed
    assert snapshot(run, ignore=(folders.LOCK,)) == before  # recipe.yaml, metrics and checkpoints untouched by the refusals


def test_resume_notices_changed_data_behind_the_same_path(tmp_path):
    data = tmp_path / "data.jsonl"
    lines = (REPO / "phi3local" / "assets" / "demo_chat.jsonl").read_text().splitlines()
    data.write_text("\n".join(lines[:60]) + "\n")
    run = tmp_path / "run"
    recipe = recipe_for(run, "training.max_steps=2", "training.checkpoint_every=1", f"data.train_file={data}")
    loop.run_training(recipe)
    # As a run killed after its step-2 checkpoint, before it finished (a finished run has nothing to resume).
    state = json.loads((run / "trainer_state.json").read_text())
    (run / "trainer_state.json").write_text(json.dumps({**state, "finished": False}))
    recipe_yaml = (run / "recipe.yaml").read_bytes()
    data.write_text("\n".join(lines[1:61]) + "\n")
    with pytest.raises(loop.TrainingError, match="train data changed since .*step-2"):
        loop.run_training(recipe, resume=True)
    assert (run / "recipe.yaml").read_bytes() == recipe_yaml


def test_a_full_disk_during_a_checkpoint_is_one_clear_error(tmp_path, monkeypatch):
    recipe = recipe_for(tmp_path / "run", "training.max_steps=4", "training.checkpoint_every=2")
    real_save = torch.save

    def disk_full(obj, f, *a, **k):
        # What torch's zip writer raises on ENOSPC (tests/journeys/test_full_disk.py fills a real tmpfs): a
        # RuntimeError whose context is the OSError when it writes to a Python file object, and only another
        # RuntimeError ("iostream error") when it opens a path itself.
        name = str(getattr(f, "name", f))
        if "step-4" in name and name.endswith("optimizer.pt"):
            try:
                if isinstance(f, (str, os.PathLike)):
                    raise RuntimeError("basic_ios::clear: iostream error")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except (OSError, RuntimeError):
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    monkeypatch.setattr(loop, "plot_losses", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "no space")))
    with pytest.raises(ckpt.CheckpointError, match=r"no space left on device while writing .*step-4.*optimizer\.pt; "
                       r"the last complete checkpoint .*step-2 is intact"):
        loop.run_training(recipe)
    run = Path(recipe.output_dir)
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-2"]
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the half-written folder is removed
    monkeypatch.undo()
    assert loop.run_training(recipe, resume=True)["steps"] == 4


# ------------------------------------------------------------------------------- runs that train nothing


@pytest.mark.parametrize("overrides, names", [
    (["training.max_steps=-5"], ["training.max_steps"]),
    (["training.epochs=0", "training.max_steps=0"], ["training.epochs", "training.max_steps"]),
])
def test_a_recipe_that_trains_nothing_is_refused_before_loading(tmp_path, capsys, overrides, names):
    run = tmp_path / "run"
    code, out = cli(capsys, "train", TINY, f"output_dir={run}", *QUICK, *overrides)
    assert code == 2 and all(n in out for n in names) and "Traceback" not in out, out
    assert not run.exists()


# -------------------------------------------------------------------------------- one-line errors


@pytest.mark.parametrize("argv, expected", [
    (["chat", "{tmp}/nowhere", "--prompt", "hi"], "no such folder"),
    (["chat", "{tmp}", "--prompt", "hi"], "not an ONNX export"),
    (["eval", "{tmp}/nowhere", "--data", "x.jsonl"], "no such folder"),
    (["eval", "{tmp}", "--data", "x.jsonl"], "not a run, checkpoint, adapter or model folder"),
    (["merge", "{tmp}/nowhere", "--out", "{tmp}/out"], "no such folder"),
    (["export", "{tmp}/nowhere", "--out", "{tmp}/out"], "no such folder"),
    (["export", "{tmp}", "--out", "{tmp}/out"], "no config.json"),
    (["train", "{tmp}/missing.yaml"], "recipe file not found"),
])
def test_stage_errors_are_one_line_not_a_traceback(tmp_path, capsys, argv, expected):
    code, out = cli(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code in (1, 2) and expected in out and "Traceback" not in out, out
    assert len(out.strip().splitlines()) == 1, out


@pytest.mark.parametrize("value", ["0", "-3", "ten"])
def test_max_new_tokens_must_be_positive(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exited:
        main(["chat", str(tmp_path), "--prompt", "hi", "--max-new-tokens", value])
    assert exited.value.code == 2 and "--max-new-tokens" in capsys.readouterr().err


def test_a_real_bug_keeps_its_traceback(monkeypatch):
    import phi3local.cli as cli_module

    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli_module, "cmd_chat", broken)
    with pytest.raises(ZeroDivisionError):
        main(["chat", "x", "--prompt", "hi"])


def test_bench_runs_the_package_benchmarks_not_the_current_folders_makefile(tmp_path, monkeypatch):
    (tmp_path / "Makefile").write_text("bench:\n\ttouch hijacked\n")
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, cwd=None: calls.append((cmd, cwd)) or 0)
    assert main(["bench", "kernels"]) == 0
    [(cmd, cwd)] = calls
    assert cmd[:3] == [sys.executable, "-m", "kernels_bench.run_all"] and "--only" in cmd and Path(cwd) == REPO
    assert not (tmp_path / "hijacked").exists()


# ------------------------------------------------------------------------- what the sweep found next


def test_prepare_never_replaces_a_users_folder_or_a_link(tmp_path, capsys):
    mine = users_folder(tmp_path / "mine")
    (mine / "stats.json").write_text('{"mine": true}')  # a stats.json of the user's own is not ours
    before = snapshot(mine)
    link = tmp_path / "link"
    link.symlink_to(mine)
    for out, expected in ((mine, "holds files phi3local did not write"), (link, "symbolic link")):
        code, out_text = cli(capsys, "prepare", TINY, f"output_dir={tmp_path / 'run'}", "--out", out)
        assert code == 1 and expected in out_text and "Traceback" not in out_text, out_text
    assert snapshot(mine) == before and link.is_symlink()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".link.old")]


@pytest.mark.parametrize("argv, expected, status", [
    (["prepare", "{tmp}/dup.yaml"], "dup.yaml:3: not valid YAML: key 'lora' appears twice", 2),
    (["prepare", "{tmp}/binary.yaml"], "binary.yaml: not a text file in UTF-8", 2),
    (["prepare", TINY, "lora.target_modules=[qkv_proj"], "override 'lora.target_modules=[qkv_proj': the value is "
                                                          "not valid YAML", 2),
    (["prepare", TINY, "lora.target_modules=[]"], "lora.target_modules is empty", 2),
    (["prepare", TINY, "output_dir={tmp}/run", "model.name_or_path={tmp}/no-model"], "no-model: no such folder", 1),
    (["train", TINY, "output_dir={tmp}/a-file/run"], "cannot create", 1),
    (["train", TINY, "output_dir={tmp}/run", "--resume", "--overwrite"], "give one of them", 2),
    (["chat", "{tmp}/cut-export", "--prompt", "hi"], "genai_config.json:1: not valid JSON", 1),
    (["chat", "{tmp}/empty-export", "--prompt", "hi"], "has no \"model\" section", 1),
])
def test_more_misuse_is_one_clear_line(tmp_path, capsys, argv, expected, status):
    (tmp_path / "dup.yaml").write_text("lora:\n  r: 8\nlora:\n  r: 4\n")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "a-file").write_text("not a folder")
    for name, text in (("cut-export", '{"model": {"eos_tok'), ("empty-export", "{}")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "genai_config.json").write_text(text)
    code, out = cli(capsys, *[str(a).format(tmp=tmp_path) for a in argv])
    assert code == status and expected in out and "Traceback" not in out, out


@pytest.mark.parametrize("flag, value", [("--temperature", "-1"), ("--top-p", "5"), ("--top-p", "0")])
def test_chat_sampling_flags_are_range_checked(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exited:
        main(["chat", str(tmp_path), "--prompt", "hi", flag, value])
    assert exited.value.code == 2 and flag in capsys.readouterr().err


def test_export_names_a_damaged_weights_file(tmp_path, capsys):
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text('{"architectures": ["Phi3ForCausalLM"]}')
    (merged / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")  # cut short
    code, out = cli(capsys, "export", merged, "--out", tmp_path / "onnx", "--precision", "fp32")
    assert code == 1 and "model.safetensors cannot be read" in out and "Traceback" not in out, out


def test_resume_accepts_keys_that_do_not_change_training_and_keys_newer_than_the_checkpoint():
    from phi3local.config import Recipe

    now = Recipe().to_dict()
    saved = Recipe().to_dict()
    del saved["training"]["trackers"]  # written by a phi3local without that key
    saved["training"]["on_damaged_checkpoint"] = "stop"
    assert ckpt.recipe_changes(saved, now) == []
    now["training"]["trackers"] = ["mlflow"]
    assert ckpt.recipe_changes(saved, now) == []
    del saved["lora"]["use_dora"]
    now["lora"]["use_dora"] = True  # a newer key set to something else than its default does change training
    assert ckpt.recipe_changes(saved, now) == ["lora.use_dora: None -> True"]


def test_a_staged_folder_is_whole_or_absent_and_replaces_only_its_own_stage(tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(RuntimeError), folders.staged(out, "merge") as tmp:
        (tmp / "model.safetensors").write_text("half")
        raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []  # neither out nor its staging folder
    with folders.staged(out, "merge") as tmp:
        (tmp / "model.safetensors").write_text("first")
    with folders.staged(out, "merge", overwrite=True) as tmp:
        (tmp / "model.safetensors").write_text("second")
    assert (out / "model.safetensors").read_text() == "second" and folders.owner(out) == "merge"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("keep")
    with pytest.raises(folders.OutputExistsError), folders.staged(mine, "merge", overwrite=True) as tmp:
        (tmp / "model.safetensors").write_text("x")
    assert [p.name for p in mine.iterdir()] == ["todo.txt"] and len(list(tmp_path.iterdir())) == 2


def test_settle_restores_a_folder_a_crash_left_renamed_aside_and_removes_stale_staging(tmp_path):
    dead = 999_999_999  # above any pid_max: no process has it
    run = tmp_path / "run"
    adapter = run / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_text("trained")
    adapter.rename(run / f".adapter.old-{dead}-ab")  # killed between replace_dir's two renames
    (run / f".adapter.tmp-{dead}-cd").mkdir()
    (run / ".tmp-adapter").mkdir()  # the staging folder of earlier releases
    ckpt.clean_stale_temporaries(run)
    assert sorted(p.name for p in run.iterdir()) == ["adapter"]
    assert (adapter / "adapter_model.safetensors").read_text() == "trained"
    (run / f".adapter.old-{dead}-ef").mkdir()  # out_dir exists: the old copy is the stale one
    ckpt.clean_stale_temporaries(run)
    assert sorted(p.name for p in run.iterdir()) == ["adapter"]
    # Two copies renamed aside: the newest is put back (by rename time, not by the pid in its name).
    adapter.rename(run / f".adapter.old-{dead}-older")
    time.sleep(0.05)
    newer = run / f".adapter.old-{dead - 1}-newer"
    newer.mkdir()
    (newer / "adapter_model.safetensors").write_text("newer")
    # A live writer's folders are its own: left alone.
    live = run / f".adapter.tmp-{os.getppid()}-gh"
    live.mkdir()
    folders.settle(adapter)
    assert (adapter / "adapter_model.safetensors").read_text() == "newer"
    assert sorted(p.name for p in run.iterdir()) == [live.name, "adapter"]


def test_a_failed_swap_puts_the_previous_folder_back(tmp_path, monkeypatch):
    out = tmp_path / "merged"
    with folders.staged(out, "merge") as tmp:
        (tmp / "model.safetensors").write_text("first")
    real_replace, calls = os.replace, []

    def second_rename_fails(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if Path(src).name.startswith(".merged.tmp-") and Path(dst) == out:  # the staging folder onto out_dir
            raise OSError("simulated failure of the second rename")
        return real_replace(src, dst)

    monkeypatch.setattr(folders.os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="simulated"), folders.staged(out, "merge", overwrite=True) as tmp:
        (tmp / "model.safetensors").write_text("second")
    monkeypatch.setattr(folders.os, "replace", real_replace)
    renames = [c for c in calls if ".old-" in c[0] + c[1]]
    assert renames[0][0] == "merged" and renames[-1][1] == "merged"  # moved aside, then put back
    assert (out / "model.safetensors").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_resume_sees_a_checkpoint_a_kill_left_renamed_aside(tmp_path):
    run = tmp_path / "run"
    step = run / "checkpoints" / "step-4"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text("{}")
    step.rename(run / "checkpoints" / ".step-4.old-999999999-ab")  # killed while step 4 was saved again
    ckpt.restore_renamed_checkpoints(run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-4"]
