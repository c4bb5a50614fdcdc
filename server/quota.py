"""Disk quotas: the bytes a directory tree may hold, checked before a write starts.

A write first claims its size, computed from shapes and dtypes before any byte is written; a
claim that would take the tree past its limit is refused (LimitExceededError, RESOURCE_EXHAUSTED)
with the quota's name and how to free room. Claims in flight count, so concurrent writes cannot
pass the limit together; when a write ends its claim becomes what it really wrote (or nothing).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from adapter_fusion.atomic import tree_bytes
from adapter_fusion.errors import LimitExceededError


def megabytes(n: int) -> str:
    """As the --*-mb flags count: 2^20 bytes."""
    return f"{n / (1 << 20):,.1f} MB"


@dataclass
class Claim:
    """What a write has claimed; the writer sets `written` to the bytes it really added."""

    nbytes: int
    written: int = 0


class DiskQuota:
    def __init__(self, what: str, limit: int, flag: str, how_to_free: str) -> None:
        self.what = what  # "the adapter store", "output root /srv/exports"
        self.limit = limit
        self.flag = flag  # the option that sets it, named in refusals
        self.how_to_free = how_to_free
        self._used = 0
        self._claimed = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        with self._lock:
            return self._used

    def recount(self, used: int) -> None:
        """Set what the tree holds (counted at start, or again before a write)."""
        with self._lock:
            self._used = used

    def freed(self, nbytes: int) -> None:
        with self._lock:
            self._used = max(0, self._used - nbytes)

    def check(self, nbytes: int, label: str) -> None:
        """Refuse now what `claim` would refuse: before the work that makes the bytes."""
        with self._lock:
            self._refuse_over(nbytes, label)

    def _refuse_over(self, nbytes: int, label: str) -> None:
        taken = self._used + self._claimed
        if taken + nbytes > self.limit:
            raise LimitExceededError(
                f"{label} needs {megabytes(nbytes)} but {self.what} holds {megabytes(taken)} of its "
                f"{megabytes(self.limit)} quota ({self.flag}); {self.how_to_free}"
            )

    @contextmanager
    def claim(self, nbytes: int, label: str) -> Iterator[Claim]:
        """Hold room for a write of at most `nbytes` while it runs; refused if it does not fit."""
        with self._lock:
            self._refuse_over(nbytes, label)
            self._claimed += nbytes
        claim = Claim(nbytes)
        try:
            yield claim
        finally:
            with self._lock:
                self._claimed -= nbytes
                self._used = max(0, self._used + claim.written)


class RootQuotas:
    """One quota per write root (ExportAdapter, BakeModel). A root's usage is counted from the
    disk before each claim, so files deleted there by hand free room at once."""

    def __init__(self, roots: Iterable[Path], limit: int) -> None:
        how = "delete old exports or bakes under it to free room, or restart the server with a larger quota"
        self._quotas = {Path(root): DiskQuota(f"output root {root}", limit, "--output-quota-mb", how) for root in roots}

    @contextmanager
    def claim(self, root: Path, nbytes: int, label: str) -> Iterator[Claim]:
        quota = self._quotas[root]
        quota.recount(tree_bytes(root))
        with quota.claim(nbytes, label) as claim:
            yield claim
