"""adapter-fusion: compose PEFT LoRA adapters exactly and fast, serve and export them.

The names below load on first use: `import adapter_fusion.client` (the gRPC client, the proto, the
name rules) needs neither torch nor the server, so a program that only calls a server stays light."""

from __future__ import annotations

import importlib

_WHERE = {
    "Adapter": "adapter_fusion.adapters",
    "load_adapter": "adapter_fusion.adapters",
    "save_adapter": "adapter_fusion.adapter_save",
    "LowRankDelta": "adapter_fusion.delta",
    "METHODS": "adapter_fusion.merge",
    "MergeResult": "adapter_fusion.merge",
    "ModuleReport": "adapter_fusion.merge",
    "merge": "adapter_fusion.merge",
    **{
        name: "adapter_fusion.errors"
        for name in (
            "AdapterFormatError", "AdapterFusionError", "AlreadyExistsError", "IncompatibleAdaptersError", "InvalidRequestError",
            "LimitExceededError", "NotFoundError", "OutputExistsError", "PathNotAllowedError", "RecipeError", "UnsupportedAdapterError",
        )
    },
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'adapter_fusion' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # once
    return value
