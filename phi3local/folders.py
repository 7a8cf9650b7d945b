"""The folders a stage writes: recognised by a marker, never anyone else's replaced, one writer at a time.

Every stage output (a training run, a merged model, an ONNX export) carries `.phi3local.json` naming the
stage that wrote it. A stage writes into, or replaces, only a folder that is missing, empty, or marked as
that stage's own output; a folder holding anything else is the user's and is refused whatever the flags.
Nothing here follows a symbolic link: a link is refused as an output and removed as a link, never its target.
A training run additionally holds an exclusive lock on its folder for as long as the process lives.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from phi3local.errors import Phi3LocalError

MARKER = ".phi3local.json"
LOCK = ".lock"
STAGES = ("train", "merge", "export", "prepare", "safety")
# Outputs written before the marker existed, recognised by a file only that stage writes.
LEGACY_SIGNS = {
    "train": lambda d: ((d / "recipe.yaml").is_file() and "\n# versions: {\"phi3local\"" in _head(d / "recipe.yaml"))
    or _is_prepared_run(d),
    "merge": lambda d: (d / "merge_report.json").is_file(),
    "export": lambda d: (d / "export_report.json").is_file() and (d / "genai_config.json").is_file(),
    "prepare": lambda d: _is_prepared(d),
}


class OutputExistsError(Phi3LocalError, FileExistsError):
    """The output folder is in the way: someone else's, or this stage's own without --overwrite."""


class FolderInUseError(Phi3LocalError):
    """Another live process is writing into the folder."""


def _is_prepared(folder: Path) -> bool:
    """A prepared-data folder written before the marker: its splits and a stats.json with our cache key."""
    if not ((folder / "train").is_dir() and (folder / "validation").is_dir() and (folder / "stats.json").is_file()):
        return False
    try:
        stats = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(stats, dict) and "cache_key" in stats and "steps" in stats


def _is_prepared_run(folder: Path) -> bool:
    """A run folder that `prepare` alone filled before it claimed run folders: only prepared/ (and our lock)."""
    try:
        names = {p.name for p in folder.iterdir()}
    except OSError:
        return False
    return "prepared" in names and names <= {"prepared", LOCK} and _is_prepared(folder / "prepared")


def _head(path: Path, size: int = 1 << 16) -> str:
    with open(path, "rb") as f:
        return f.read(size).decode("utf-8", "replace")


def owner(folder: Path) -> str | None:
    """The stage whose output `folder` is, or None when phi3local did not write it."""
    folder = Path(folder)
    marker = folder / MARKER
    if marker.is_file() and not marker.is_symlink():
        try:
            stage = json.loads(marker.read_text()).get("stage")
        except (OSError, ValueError, AttributeError):
            return None
        return stage if stage in STAGES else None
    for stage, sign in LEGACY_SIGNS.items():
        if sign(folder):
            return stage
    return None


def dir_size(path: Path) -> int:
    """Bytes of all the files below path (a stage's output, as its report states it)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def write_marker(folder: Path, stage: str) -> None:
    from phi3local import __version__

    data = {"stage": stage, "phi3local": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (Path(folder) / MARKER).write_text(json.dumps(data) + "\n")


def _contents(folder: Path, limit: int = 4) -> str:
    names = sorted(p.name for p in folder.iterdir())
    shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
    return shown


def check_output_dir(out_dir: Path, stage: str, overwrite: bool) -> None:
    """Refuse an output folder that may not be written: anything but missing, empty, or our own + overwrite."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink():
        raise OutputExistsError(f"{out_dir} is a symbolic link; give the real folder (phi3local never writes "
                                "through a link)")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise OutputExistsError(f"{out_dir} exists and is not a folder")
    if not any(out_dir.iterdir()):
        return
    found = owner(out_dir)
    if found is None:
        raise OutputExistsError(
            f"{out_dir} holds files phi3local did not write ({_contents(out_dir)}); it is never replaced, "
            "--overwrite or not: choose a new or empty folder")
    if found != stage:
        raise OutputExistsError(f"{out_dir} is a phi3local {found} folder, not a {stage} output; choose another "
                                "folder")
    if not overwrite:
        raise OutputExistsError(f"{out_dir} holds an earlier {stage} output; pass --overwrite to replace it")


def claim(folder: Path, stage: str) -> Path:
    """Make `folder` this stage's own (create it, or mark an empty one); refuse anyone else's."""
    folder = Path(folder)
    check_output_dir(folder, stage, overwrite=True)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # e.g. a file where a parent folder should be
        raise OutputExistsError(f"cannot create {folder}: {e.strerror} ({e.filename})") from e
    if not (folder / MARKER).is_file():
        write_marker(folder, stage)
    return folder


def write_text_atomic(path: Path, text: str) -> None:
    """Write a whole file or nothing: a temporary file beside it, renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove(path: Path) -> None:
    """Delete a file, a link (not what it points to) or a folder tree (links inside are unlinked)."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


@contextlib.contextmanager
def staged(out_dir: Path, stage: str | None = None, overwrite: bool = False) -> Iterator[Path]:
    """Build out_dir whole or not at all: the block writes into a fresh folder beside it
    (`.NAME.tmp-PID-*`), which replaces out_dir when the block ends (`replace_dir`) and is removed when it
    raises. stage: out_dir must be empty or that stage's own output (checked again before the swap, and
    the folder is marked as it: `publish_dir`); None: the caller owns out_dir (a run's adapter). What an
    earlier, killed write left beside out_dir is tidied first (`settle`)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    settle(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if stage is None:
            replace_dir(tmp, out_dir)
        else:
            publish_dir(tmp, out_dir, stage, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_dir(tmp: Path, out_dir: Path, stage: str, overwrite: bool) -> None:
    """Mark the finished staging folder and move it to out_dir, replacing only an output of the same stage."""
    tmp, out_dir = Path(tmp), Path(out_dir)
    check_output_dir(out_dir, stage, overwrite)  # again: the folder may have changed while we worked
    write_marker(tmp, stage)
    replace_dir(tmp, out_dir)


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished folder tmp to out_dir. An existing out_dir is first renamed aside
    (`.NAME.old-PID-*`) and deleted after; if the second rename fails the old folder is put back. Only a
    process killed between the two renames leaves out_dir missing, with the old folder beside it for
    `settle` to restore."""
    tmp, out_dir = Path(tmp), Path(out_dir)
    old = None
    if out_dir.exists() or out_dir.is_symlink():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        try:
            remove(old)
        except OSError:  # the new folder is in place; a leftover copy is for the next settle
            pass


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, but someone else's
        return True
    return True


def _writer_alive(path: Path) -> bool:
    """Whether the process named in a `.NAME.tmp-PID-*` or `.NAME.old-PID-*` folder still runs."""
    pid = path.name.rsplit(".tmp-" if ".tmp-" in path.name else ".old-", 1)[1].split("-", 1)[0]
    return pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid))


def settle(out_dir: Path) -> None:
    """Tidy what killed writes left beside out_dir (those of live processes are theirs): staging folders
    `.NAME.tmp-*` are removed; of the folders renamed aside, `.NAME.old-*` (a kill between replace_dir's two
    renames), the newest is put back as out_dir if out_dir is gone, and the others are removed."""
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return
    name = glob.escape(out_dir.name)
    for tmp in out_dir.parent.glob(f".{name}.tmp-*"):
        if not _writer_alive(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    olds = sorted((p for p in out_dir.parent.glob(f".{name}.old-*") if not _writer_alive(p)),
                  key=lambda p: p.lstat().st_ctime, reverse=True)  # a rename sets ctime: newest first
    if olds and not (out_dir.exists() or out_dir.is_symlink()):
        os.replace(olds.pop(0), out_dir)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def exclusive(folder: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (a lock file inside it) while the block runs.

    The kernel drops the lock when the process dies, so a killed run never leaves the folder locked.
    """
    import fcntl

    folder = Path(folder)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise FolderInUseError(f"{folder} is in use: another process (pid {holder}) is {what} into it; wait "
                                   "for it to finish or choose another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
