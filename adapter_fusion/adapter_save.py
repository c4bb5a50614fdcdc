"""An Adapter written back as a PEFT LoRA directory that `PeftModel.from_pretrained` loads as is,
and what writing it would take, from the shapes alone."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from adapter_fusion.atomic import atomic_directory
from adapter_fusion.errors import AdapterFormatError
from adapter_fusion.peft_format import DTYPES, KEY_PREFIX, WEIGHTS_NAME

if TYPE_CHECKING:
    from adapter_fusion.adapters import Adapter


def save_adapter(adapter: Adapter, directory: str | Path, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write a PEFT LoRA dir (atomically and durably, see `atomic_directory`) that
    `PeftModel.from_pretrained` loads as is."""
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        write_adapter_files(adapter, tmp, dtype)
    return Path(directory)


def saved_bytes(adapter: Adapter, dtype: str = "float32") -> int:
    """An upper bound on what `write_adapter_files` writes, from the shapes alone (no byte
    written): the factors in `dtype`, plus the safetensors header, the config and metadata."""
    element = torch.empty((), dtype=DTYPES[dtype]).element_size()
    modules = {path: d for path, d in adapter.modules.items() if d.rank > 0}
    tensors = sum(d.A.numel() + d.B.numel() for d in modules.values()) * element
    names = sum(6 * len(path) + 1024 for path in modules)  # 2 header entries, target_modules, 2 patterns (escaped)
    extra = len(json.dumps(adapter.extra, indent=2, default=str)) if adapter.extra else 0
    return tensors + names + extra + (16 << 10)  # the config's other fields are ~1 KB


def write_adapter_files(adapter: Adapter, directory: Path, dtype: str = "float32") -> None:
    """Write the PEFT files of `adapter` into an existing (temp) directory.

    The scale is already in the factors, so each module's alpha equals its rank (scale 1); modules whose
    rank differs from the most common one go to rank_pattern/alpha_pattern. target_modules lists
    the exact module paths, so PEFT recreates precisely these layers.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    from peft import LoraConfig  # heavy import, needed only here

    modules = {path: d for path, d in adapter.modules.items() if d.rank > 0}
    if not modules:
        raise AdapterFormatError(f"adapter {adapter.name!r} is zero everywhere: nothing to save")
    ranks = {path: d.rank for path, d in modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(path): rank for path, rank in ranks.items() if rank != r}
    config = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=sorted(modules),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        fan_in_fan_out=adapter.fan_in_fan_out,
        task_type=adapter.task_type,
        base_model_name_or_path=adapter.base_model,
        lora_dropout=0.0,
    )
    torch_dtype = DTYPES[dtype]
    tensors = {}
    for path, delta in modules.items():
        tensors[f"{KEY_PREFIX}{path}.lora_A.weight"] = delta.A.to(torch_dtype).contiguous()
        tensors[f"{KEY_PREFIX}{path}.lora_B.weight"] = delta.B.to(torch_dtype).contiguous()
    config.save_pretrained(directory)
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    if adapter.extra:
        (directory / "adapter_fusion.json").write_text(json.dumps(adapter.extra, indent=2, default=str))
