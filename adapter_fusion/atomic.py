"""Write a directory all at once and durably: into a temp dir beside the target, renamed when complete.

An interrupted write (exception, Ctrl-C, full disk) leaves nothing under the target's name and
removes its temp dir; a kill -9 or power loss may leave a hidden `.NAME.*.tmp` dir, which
`sweep_leftovers` removes. Every file and the directory are fsynced before the rename and the
parent after it, so a name that is visible after a crash has all its bytes. Replacing an
existing target moves it aside to a unique `.NAME.*.old` first; a crash between the two renames
leaves that `.old`, which `sweep_leftovers` puts back.

Every directory written here carries `MARKER`, so a server can tell its own outputs (which it
may replace) from anyone else's directories (which it never touches).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adapter_fusion.errors import OutputExistsError

MARKER = ".adapter_fusion_output"


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(directory) / name)
        fsync_path(Path(directory))


def is_ours(directory: Path) -> bool:
    """Whether `directory` was written by this project (and so may be replaced on request)."""
    return (directory / MARKER).is_file() and not (directory / MARKER).is_symlink()


@contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temp dir; on success it replaces `target` (only if `overwrite`)."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} already exists; choose another output or pass overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"written_by": "adapter-fusion"}) + "\n")
        fsync_tree(tmp)
        if target.exists() or target.is_symlink():
            old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.old")
            target.rename(old)
            tmp.rename(target)
            fsync_path(target.parent)
            remove_tree(old)
        else:
            tmp.rename(target)
            fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_tree(path: Path) -> None:
    """Delete a directory (or a link to one, never what it points to)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def sweep_leftovers(parent: Path) -> list[str]:
    """Undo what a crash left in `parent`: temp dirs go, a `.old` whose target is missing comes
    back (the crash fell between the two renames of a replace), other `.old` dirs go. Returns
    what it did, one line per entry, for the log."""
    done = []
    for entry in sorted(parent.glob(".*")):
        if entry.name.endswith(".tmp") or entry.name.endswith(".deleted"):
            remove_tree(entry)
            done.append(f"removed leftover {entry.name}")
        elif entry.name.endswith(".old"):
            name = entry.name[1:].rsplit(".", 2)[0]  # ".NAME.<id>.old" -> NAME
            target = parent / name
            if name and not target.exists():
                entry.rename(target)
                done.append(f"restored {name} from an interrupted replace")
            else:
                remove_tree(entry)
                done.append(f"removed leftover {entry.name}")
    if done:
        fsync_path(parent)
    return done
