"""Write a directory all at once and durably: into a temp dir beside the target, renamed when complete.

An interrupted write (exception, Ctrl-C, full disk) leaves nothing under the target's name and
removes its temp dir; a kill -9 or power loss may leave a hidden `.NAME.*.tmp` dir, which
`sweep_leftovers` removes. Every file and the directory are fsynced before the rename and the
parent after it, so a name that is visible after a crash has all its bytes. Replacing an
existing target moves it aside to a unique `.NAME.*.old` first; a crash between the two renames
leaves that `.old`, which `sweep_leftovers` puts back.

Given the `root` the target was checked against, the target's parent is opened from the root's
descriptor without following a symlink (`adapter_fusion.nofollow`), and the temp dir, the renames
and the fsyncs all go through held descriptors: a directory swapped for a symlink after the
check makes the write fail cleanly instead of landing where the link points.

Every directory written here carries `MARKER`, so a server can tell its own outputs (which it
may replace) from anyone else's directories (which it never touches).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adapter_fusion.errors import OutputExistsError, PathNotAllowedError
from adapter_fusion.nofollow import DIR_FLAGS, PathChangedError, can_hold, held_path, lexists_at, open_below, rename_noreplace

MARKER = ".adapter_fusion_output"
_MARKER_TEXT = (json.dumps({"written_by": "adapter-fusion"}) + "\n").encode()
MARKER_BYTES = len(_MARKER_TEXT)


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


def tree_bytes(root: Path) -> int:
    """Bytes of the regular files under `root` (links not followed; temp dirs of writes in
    progress skipped: those are counted by whoever writes them)."""
    total = 0
    stack = [Path(root)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if not (entry.name.startswith(".") and entry.name.endswith(".tmp")):
                        stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue  # removed while counted
    return total


def is_ours(directory: Path) -> bool:
    """Whether `directory` was written by this project (and so may be replaced on request)."""
    return (directory / MARKER).is_file() and not (directory / MARKER).is_symlink()


def _is_ours_at(parent_fd: int, name: str) -> bool:
    """`is_ours` for parent_fd/name, no link followed (neither the dir nor its marker)."""
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    except OSError:
        return False
    try:
        return stat.S_ISREG(os.stat(MARKER, dir_fd=fd, follow_symlinks=False).st_mode)
    except OSError:
        return False
    finally:
        os.close(fd)


def _open_parent(target: Path, root: Path | None) -> int:
    if root is None:
        target.parent.mkdir(parents=True, exist_ok=True)
        return os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    parts = target.relative_to(root).parts
    if not parts:
        raise ValueError(f"{target} is the root itself")
    return open_below(root, parts[:-1], create=True)


@contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False, root: Path | None = None) -> Iterator[Path]:
    """Yield an empty temp dir; on success it replaces `target` (only if `overwrite`).

    With `root` (a directory `target` was checked to lie strictly inside), no symlink below the
    root is followed, and an existing target is replaced only if this project wrote it. The
    yielded path reaches the temp dir through its descriptor, so what is written there stays
    there, whatever happens to the names above it.
    """
    target = Path(target)
    parent = _open_parent(target, Path(root) if root is not None else None)
    try:
        if lexists_at(parent, target.name) and not overwrite:
            raise OutputExistsError(f"{target} already exists; choose another output or pass overwrite")
        tmp_name = f".{target.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.mkdir(tmp_name, 0o755, dir_fd=parent)
        except FileNotFoundError:  # the held parent was removed since it was opened
            raise PathChangedError() from None
        published = False
        try:
            tmp = os.open(tmp_name, DIR_FLAGS, dir_fd=parent)
            try:
                where = held_path(tmp) if can_hold() else target.parent / tmp_name  # elsewhere: by name, as before
                yield where
                marker = os.open(where / MARKER, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)  # a copied tree may hold one
                with os.fdopen(marker, "wb") as file:
                    file.write(_MARKER_TEXT)
                fsync_tree(where)
            finally:
                os.close(tmp)
            try:
                _publish(parent, tmp_name, target.name, overwrite, only_ours=root is not None)
            except FileNotFoundError:  # the parent (and the temp dir in it) was removed meanwhile
                raise PathChangedError() from None
            published = True
        finally:
            if not published:
                _remove_at(parent, tmp_name)
    finally:
        os.close(parent)


def _publish(parent: int, tmp_name: str, name: str, overwrite: bool, only_ours: bool) -> None:
    """Rename the finished temp dir to `name` (moving a previous one aside first), then fsync the parent."""
    if overwrite and lexists_at(parent, name):
        old = f".{name}.{uuid.uuid4().hex[:12]}.old"
        os.rename(name, old, src_dir_fd=parent, dst_dir_fd=parent)
        if only_ours and not _is_ours_at(parent, old):  # checked once moved aside: what is checked is what goes
            os.rename(old, name, src_dir_fd=parent, dst_dir_fd=parent)
            raise PathNotAllowedError("the output exists and was not written by adapter-fusion; it is never replaced")
        try:
            rename_noreplace(parent, tmp_name, name)
        except BaseException:
            os.rename(old, name, src_dir_fd=parent, dst_dir_fd=parent)  # the previous one stays
            raise
        os.fsync(parent)
        _remove_at(parent, old)
    else:
        rename_noreplace(parent, tmp_name, name)
        os.fsync(parent)


def _remove_at(parent: int, name: str) -> None:
    """`remove_tree` for parent/name."""
    try:
        if stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
            shutil.rmtree(name, ignore_errors=True, dir_fd=parent)
        else:
            os.unlink(name, dir_fd=parent)
    except FileNotFoundError:
        pass


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
