"""Journey: the disk fills up during a run (issue 23), on a real small filesystem, not a simulated error.

The run folder lives on a tmpfs the test mounts (root, as on the development machine and CI). A reference
run on the ordinary disk measures what the run writes; a filler file then leaves exactly enough room for
the first checkpoint and half of the second one's optimizer.pt, so torch's own zip writer hits ENOSPC (it
raises RuntimeError("... iostream error"), not OSError). Then, with room for the last checkpoint but not for
the final adapter, the end of the run fills the disk. Both must be one `error:` line naming the file,
leave the checkpoints before it intact, and resume once space is freed.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from phi3local.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "phi3local" / "assets" / "demo_chat.jsonl"
PAGE = os.sysconf("SC_PAGE_SIZE")  # tmpfs allocates whole pages
# Two optimizer steps, a checkpoint after each, short rows, no validation and no measured peak FLOP/s (saves
# seconds): about ten seconds a run on two CPU cores.
ARGS = ["training.max_steps=2", "training.checkpoint_every=1", "training.keep_checkpoints=2",
        "training.display=none", "training.log_every=1", "training.micro_batch_size=2", "training.peak_flops=1e12",
        "eval.every=0", "eval.generate_samples=0", "data.val_fraction=0", "data.max_seq_len=64", "data.on_error=skip",
        f"data.train_file={DATA}"]
ERROR_LINE = re.compile(r"^phi3local train: error: no space left on device while writing (?P<path>.+?); (?P<rest>.*)$",
                        re.MULTILINE)
# What the run writes only after its last checkpoint (absent when the second checkpoint is being written).
END_FILES = ("adapter", "loss.png", "summary.json", "trainer_state.json")


def pages(path: Path) -> int:
    """Pages the files under path (or path itself) take on a tmpfs."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    return sum(-(-p.stat().st_size // PAGE) for p in files)


def run_cmd(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True)


def mount_tmpfs(folder: Path, size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    proc = run_cmd("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder))
    if proc.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs at {folder} ({proc.stderr.strip() or proc.returncode}): this test needs "
                    "root (CAP_SYS_ADMIN) to make a real small filesystem; a simulated ENOSPC does not show the bug. "
                    "Run it as root (the development machine and CI do).")


def leave_free(disk: Path, free_pages: int) -> None:
    """Fill disk with a real (not sparse) filler file until free_pages pages are left."""
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    st = os.statvfs(disk)
    fill = st.f_bavail * st.f_frsize - free_pages * PAGE
    assert fill >= 0, f"the tmpfs at {disk} is too small: {st.f_bavail} pages free, {free_pages} wanted"
    with open(filler, "wb") as f:
        chunk = b"\0" * (1 << 20)
        while fill > 0:
            fill -= f.write(chunk[:fill])
    st = os.statvfs(disk)
    assert st.f_bavail * st.f_frsize == free_pages * PAGE, (st.f_bavail, free_pages)


def full_disk_error(result, run: Path) -> Path:
    """The one error line's path, checked to lie inside the run folder."""
    found = ERROR_LINE.search(result.out)
    assert found, f"no one-line 'no space left on device while writing PATH' error:\n{result.out}"
    path = Path(found["path"].removeprefix("a file in "))
    assert path == run or run in path.parents, f"{path} is not inside the run folder {run}:\n{result.out}"
    assert "--resume" in found["rest"], found[0]
    return path


def test_a_full_disk_is_one_clear_error_and_the_run_resumes_after_space_is_freed(user, tmp_path):
    disk = tmp_path / "disk"
    mount_tmpfs(disk, 64 << 20)  # first: without a real filesystem to fill there is nothing to test
    try:
        # What the run writes, measured on the ordinary disk (this also builds the tiny model into the user's cache).
        ref = tmp_path / "ref"
        recipe = REPO / "recipes" / "tiny-cpu.yaml"
        user.run("train", recipe, f"output_dir={ref}", *ARGS).ok()
        step2 = ref / "checkpoints" / "step-2"
        before_second = pages(ref) - pages(step2) - sum(pages(ref / name) for name in END_FILES if (ref / name).exists())
        checkpoint_pages, adapter_pages = pages(step2), pages(ref / "adapter")
        optimizer_pages = pages(step2 / "optimizer.pt")
        assert optimizer_pages >= 16 and adapter_pages >= 16, (optimizer_pages, adapter_pages)

        # 1. Room for the first checkpoint, the second one's adapter and half its optimizer.pt.
        run = disk / "run"
        leave_free(disk, before_second + pages(step2 / "adapter") + optimizer_pages // 2)
        first = user.run("train", recipe, f"output_dir={run}", *ARGS).failed(1)
        path = full_disk_error(first, run)
        assert "step-2" in str(path) and path.name == "optimizer.pt", first.out
        assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-1"], first.out
        assert ckpt.verify(run / "checkpoints" / "step-1") == []
        assert not list((run / "checkpoints").glob(f"{ckpt.TMP_PREFIX}*")), "the half-written checkpoint is left"

        # 2. Some space freed: enough for the last checkpoint, not for the final adapter after it.
        leave_free(disk, checkpoint_pages + adapter_pages // 2 + 4)
        end = user.run("train", recipe, f"output_dir={run}", *ARGS, "training.checkpoint_every=0",
                       "--resume").failed(1)
        full_disk_error(end, run)
        assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-1", "step-2"], end.out
        assert all(ckpt.verify(p) == [] for p in ckpt.list_checkpoints(run))
        assert not list((run / "checkpoints").glob(f"{ckpt.TMP_PREFIX}*"))

        # 3. Space freed: the run finishes from its last checkpoint.
        (disk / "filler").unlink()
        done = user.run("train", recipe, f"output_dir={run}", *ARGS, "--resume").ok()
        assert "resumed from" in done.out and (run / "adapter" / "adapter_model.safetensors").is_file(), done.out
        assert all(ckpt.verify(p) == [] for p in ckpt.list_checkpoints(run))
    finally:
        proc = run_cmd("umount", str(disk))
        assert proc.returncode == 0, f"could not unmount {disk}: {proc.stderr}"
