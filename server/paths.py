"""Where clients may read and write: every path a request carries is hostile until checked here.

Read roots (`--adapter-root`) are where LoadAdapter may read adapter dirs; write roots
(`--output-root`) are where ExportAdapter and BakeModel may write. A relative path resolves
against the first root of its kind; `..` and symlinks are followed before the check, and every
file LoadAdapter reads must itself resolve inside a read root (a symlinked weights file pointing
elsewhere is refused). A write never targets a root itself, an ancestor of any root, the store or
the base model, or anything inside those two; it replaces an existing directory only when asked
to and only if this project wrote it (`atomic.MARKER`). Errors name the allowed roots, never
where a path led outside them.

The checks resolve a path once; the write that follows never resolves it again: it walks down
from the write root's descriptor without following links (`write_root_of`, `atomic_directory`),
so a directory swapped for a symlink after the check ends the write with PERMISSION_DENIED.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from adapter_fusion.adapters import CONFIG_NAME, PICKLE_WEIGHTS_NAME, WEIGHTS_NAME
from adapter_fusion.atomic import is_ours
from adapter_fusion.errors import AdapterFusionError, InvalidRequestError, OutputExistsError, PathNotAllowedError, quoted

MAX_PATH_BYTES = 4096  # PATH_MAX on Linux
MAX_COMPONENT_BYTES = 255  # NAME_MAX
WRITE_SUFFIX_BYTES = 18  # an output is written as ".NAME.<12 hex>.old" / ".NAME.XXXXXXXX.tmp" beside its target


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


@dataclass(frozen=True)
class PathPolicy:
    read_roots: tuple[Path, ...]
    write_roots: tuple[Path, ...]
    protected: tuple[Path, ...] = ()  # never written into or over: the store, the base model

    @classmethod
    def of(cls, read_roots, write_roots, protected=()) -> PathPolicy:
        def real(paths) -> tuple[Path, ...]:
            return tuple(Path(p).resolve() for p in paths)

        return cls(real(read_roots), real(write_roots), real(protected))

    def readable(self, path: str) -> Path:
        """The adapter dir `path` names, if it and every file in it that loading reads lie under a read root."""
        with _os_errors(path):
            return self._readable(path)

    def writable(self, path: str, overwrite: bool) -> Path:
        """The output dir `path` names, if writing it there is allowed (see the module doc)."""
        with _os_errors(path):
            return self._writable(path, overwrite)

    def write_root_of(self, real: Path) -> Path:
        """The write root a `writable` path lies in (the innermost, if roots nest): writes walk
        down from it without following links (`atomic_directory(root=...)`)."""
        return max((root for root in self.write_roots if real != root and real.is_relative_to(root)), key=lambda root: len(root.parts))

    def _readable(self, path: str) -> Path:
        real = self._resolve(path, self.read_roots, "read")
        if not any(_inside(real, root) for root in self.read_roots):
            raise self._denied(path, "read")
        for name in (CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME):
            file = real / name
            if (file.exists() or file.is_symlink()) and not any(_inside(file.resolve(), root) for root in self.read_roots):
                raise PathNotAllowedError(f"{quoted(path)}: its {name} links outside the read roots; copy the file in instead")
        return real

    def _writable(self, path: str, overwrite: bool) -> Path:
        real = self._resolve(path, self.write_roots, "write")
        if len(real.name.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES - WRITE_SUFFIX_BYTES:
            raise InvalidRequestError(f"the output's name is over {MAX_COMPONENT_BYTES - WRITE_SUFFIX_BYTES} bytes (its temp dir needs the rest)")
        if not any(real != root and real.is_relative_to(root) for root in self.write_roots):
            raise self._denied(path, "write")
        for special in (*self.read_roots, *self.write_roots, *self.protected):
            if special.is_relative_to(real):
                raise PathNotAllowedError(f"{quoted(path)} is a server root or contains one; write to a new directory under a write root")
        for special in self.protected:
            if real.is_relative_to(special):
                raise PathNotAllowedError(f"{quoted(path)} lies inside the server's store or base model; write elsewhere")
        if real.exists() or real.is_symlink():
            if not overwrite:
                raise OutputExistsError(f"{quoted(path)} already exists; choose another path or set overwrite")
            if not real.is_dir() or real.is_symlink() or not is_ours(real):
                raise PathNotAllowedError(f"{quoted(path)} exists and was not written by adapter-fusion; it is never replaced")
        for parent in real.parents:  # a file where a directory must go: say so now, not as an OS error later
            if parent.exists() and not parent.is_dir():
                raise InvalidRequestError(f"{quoted(path)}: a part of the path is a file, not a directory")
        return real

    def _resolve(self, path: str, roots: tuple[Path, ...], kind: str) -> Path:
        _check_text(path)
        if not roots:
            raise PathNotAllowedError(f"this server allows no {kind} paths (start it with --{'adapter' if kind == 'read' else 'output'}-root)")
        candidate = Path(path) if os.path.isabs(path) else roots[0] / path
        try:
            real = candidate.resolve()
        except RuntimeError:  # a symlink loop
            raise InvalidRequestError(f"{quoted(path)} cannot be resolved (a symlink loop)") from None
        if len(str(real).encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES - MAX_COMPONENT_BYTES:  # room for the files inside
            raise InvalidRequestError(f"{quoted(path)} is too long once resolved under the root")
        return real

    def _denied(self, path: str, kind: str) -> PathNotAllowedError:
        roots = self.read_roots if kind == "read" else self.write_roots
        where = "inside" if kind == "read" else "strictly inside"
        listing = ", ".join(str(r) for r in roots)
        return PathNotAllowedError(f"{quoted(path)} is not {where} a {kind} root of this server ({listing})")


@contextmanager
def _os_errors(path: str) -> Iterator[None]:
    """What the filesystem refuses while checking (a name too long, a loop, no access) is the
    request's problem, named without the resolved path."""
    try:
        yield
    except AdapterFusionError:
        raise  # PathNotAllowedError is a PermissionError, hence an OSError: our own verdict stands
    except OSError as error:
        raise InvalidRequestError(f"{quoted(path)} cannot be used: {error.strerror or type(error).__name__}") from None


def _check_text(path: str) -> None:
    if not path:
        raise InvalidRequestError("path is empty")
    if "\x00" in path:
        raise InvalidRequestError("path contains a NUL character")
    raw = path.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_PATH_BYTES:
        raise InvalidRequestError(f"path is {len(raw)} bytes; the limit is {MAX_PATH_BYTES}")
    if any(len(part.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES for part in Path(path).parts):
        raise InvalidRequestError(f"a component of the path is over {MAX_COMPONENT_BYTES} bytes")
