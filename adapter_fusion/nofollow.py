"""Reach directories below a root without following a symlink, from a held file descriptor.

A path that was checked (resolved, found inside a root) can change before it is used: anyone
who may write inside the root can swap a directory on it for a symlink to elsewhere. So writes
never look a checked path up again by name: `open_below` walks it from the root's descriptor
one component at a time (`openat` with O_NOFOLLOW | O_DIRECTORY), refusing a component that has
become a symlink or a file, and what is then written goes through the descriptor it returns
(`held_path`: the kernel's /proc/self/fd link to that very directory, not a name to resolve).
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path
from typing import BinaryIO

from adapter_fusion.errors import OutputExistsError, PathNotAllowedError

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
HELD = Path("/proc/self/fd")  # Linux: <HELD>/<fd> reaches the directory an fd holds, whatever its name now
RENAME_NOREPLACE = 1  # renameat2(2)
_libc = ctypes.CDLL(None, use_errno=True)


class PathChangedError(PathNotAllowedError):
    """A directory on a checked path became a symlink or a file, or went away, before the write
    reached it."""

    def __init__(self) -> None:
        super().__init__(
            "the output's directory changed while it was being written (a part of its path was removed or is now a symlink "
            "or a file); nothing was written"
        )


def can_hold() -> bool:
    """Whether directories can be reached through their descriptors here (Linux /proc)."""
    return HELD.is_dir()


def held_path(fd: int) -> Path:
    """A path that reaches the directory `fd` holds, without looking up any name outside it."""
    return HELD / str(fd)


def open_below(root: Path, parts: tuple[str, ...], create: bool) -> int:
    """A descriptor of root/parts[0]/.../parts[-1] (missing ones made if `create`), reached
    without following a symlink below `root` (one met is `PathChangedError`); the caller closes it."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the root itself is the operator's
    try:
        for part in parts:
            if part in ("", ".", "..") or "/" in part:
                raise ValueError(f"{part!r} is not a single path component")
            child = _open_child(fd, part, create)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_child(fd: int, part: str, create: bool) -> int:
    try:
        return _open_dir_at(fd, part)
    except FileNotFoundError:
        if not create:
            raise
    try:
        os.mkdir(part, 0o755, dir_fd=fd)
    except FileExistsError:
        pass  # made meanwhile; what it is now is checked by the open below
    try:
        return _open_dir_at(fd, part)
    except FileNotFoundError:  # removed again at once
        raise PathChangedError() from None


def _open_dir_at(fd: int, part: str) -> int:
    try:
        return os.open(part, DIR_FLAGS, dir_fd=fd)
    except NotADirectoryError:  # O_NOFOLLOW | O_DIRECTORY on a symlink or a file
        raise PathChangedError() from None
    except PermissionError:
        raise PathNotAllowedError("a directory on the output's path cannot be entered by the server") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise PathChangedError() from None
        raise


def lexists_at(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def create_file(directory: Path, name: str) -> BinaryIO:
    """A new file (never an existing one, never through a symlink) in `directory`."""
    return os.fdopen(os.open(Path(directory) / name, NEW_FILE_FLAGS, 0o644), "wb")


def rename_noreplace(dir_fd: int, source: str, target: str) -> None:
    """Rename within one held directory, refusing to replace whatever appeared at `target`."""
    renameat2 = getattr(_libc, "renameat2", None)
    if renameat2 is not None and renameat2(dir_fd, os.fsencode(source), dir_fd, os.fsencode(target), RENAME_NOREPLACE) == 0:
        return
    code = ctypes.get_errno() if renameat2 is not None else errno.ENOSYS
    if code in (errno.EEXIST, errno.ENOTEMPTY):
        raise OutputExistsError("the output appeared while it was being written; choose another path or set overwrite")
    if code not in (errno.ENOSYS, errno.EINVAL):  # a kernel or filesystem without renameat2: check, then rename
        raise OSError(code, os.strerror(code))
    if lexists_at(dir_fd, target):
        raise OutputExistsError("the output appeared while it was being written; choose another path or set overwrite")
    os.rename(source, target, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
