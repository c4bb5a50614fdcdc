"""The persistent adapter store: the source of truth for what clients registered.

Every loaded or composed adapter is written here as a PEFT dir (atomically) with its metadata, so
a restarted server re-registers all of them, and the engine reloads evicted adapters from here.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path

from adapter_fusion.adapters import Adapter, load_adapter, save_adapter
from adapter_fusion.engine import AdapterInfo
from adapter_fusion.errors import InvalidRequestError

META = "adapter_fusion_store.json"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str) -> str:
    """Adapter names become directory names: letters, digits, '.', '_', '-', at most 128."""
    if not NAME.match(name) or name in (".", ".."):
        raise InvalidRequestError(
            f"invalid adapter name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


class AdapterStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def save(self, adapter: Adapter, info: AdapterInfo) -> None:
        target = self.root / check_name(info.name)
        save_adapter(adapter, target, overwrite=True)
        (target / META).write_text(json.dumps(asdict(info), indent=2))

    def load(self, name: str) -> Adapter:
        return load_adapter(self.root / check_name(name), name=name)

    def delete(self, name: str) -> None:
        shutil.rmtree(self.root / check_name(name), ignore_errors=True)

    def entries(self) -> list[AdapterInfo]:
        """What was registered before, from metadata only (factors stay on disk until used)."""
        found = []
        for meta in sorted(self.root.glob(f"*/{META}")):
            found.append(AdapterInfo(**json.loads(meta.read_text())))
        return found
