"""Bake an adapter into the base model's weights: a standard sharded safetensors model directory.

Streamed tensor by tensor: every output shard's header is planned from the base's headers alone
(names, shapes, dtypes), then each tensor is read (`safe_open`), ΔW added in float32 if it is a
target, cast, and its bytes written straight to the open shard. Peak memory is therefore one
tensor plus its ΔW plus the adapter's factors, whatever the model's or the shards' size (mergekit's
TensorWriter, by contrast, holds a whole shard). Written into a temp dir and renamed when the
output is complete and verified, with a sha256 per shard in a manifest.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from adapter_fusion.adapters import Adapter
from adapter_fusion.atomic import atomic_directory
from adapter_fusion.errors import IncompatibleAdaptersError
from adapter_fusion.nofollow import create_file
from adapter_fusion.peft_format import DTYPES
from adapter_fusion.safetensors_files import (
    INDEX_NAME, BakeError, StoredTensor, parse_size, plan_shards, read_tensor, shard_header, stored_tensors, verify_shards,
)

MANIFEST_NAME = "adapter_fusion_bake.json"
WEIGHT_FILES = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|gguf)$|.*\.index\.json$")
ProgressCallback = Callable[[int, int], None]  # (bytes written, bytes total)


@dataclass
class BakeManifest:
    """What was written and from what: enough to verify and reproduce the output."""

    base: str
    adapter: str
    dtype: str
    merged_modules: int
    tensors: int
    total_bytes: int
    shards: dict[str, dict] = field(default_factory=dict)  # file -> {"sha256", "bytes", "tensors"}
    untied: list[str] = field(default_factory=list)
    recipe: dict | None = None


def _targets(adapter: Adapter, tensors: dict[str, StoredTensor], tied: bool) -> tuple[dict[str, str], list[str]]:
    """Map tensor name -> adapter module; refuse anything that does not fit, before writing."""
    targets: dict[str, str] = {}
    untied: list[str] = []
    for path, delta in adapter.modules.items():
        name = f"{path}.weight"
        if name not in tensors and path == "lm_head" and tied:
            untied.append(name)  # tied to the embeddings: write it as its own tensor
            continue
        if name not in tensors:
            raise IncompatibleAdaptersError(f"adapter {adapter.name!r} targets {path!r}, which the base model does not have")
        expected = delta.shape[::-1] if adapter.fan_in_fan_out else delta.shape
        if tensors[name].shape != expected:
            raise IncompatibleAdaptersError(
                f"adapter {adapter.name!r} module {path!r} is {delta.shape[0]}x{delta.shape[1]} but the base weight "
                f"{name} is {'x'.join(map(str, tensors[name].shape))}: the adapter is for another base model"
            )
        targets[name] = path
    return targets, untied


class _Plan(NamedTuple):
    config: dict  # the base's config.json
    base: list[StoredTensor]  # as stored
    tensors: list[StoredTensor]  # as written, in order (the untied lm_head appended)
    targets: dict[str, str]  # tensor name -> adapter module
    untied: list[str]
    embed: StoredTensor | None


def _plan(base_dir: Path, adapter: Adapter, dtype: str | None) -> _Plan:
    """What a bake writes, from the base's headers alone; refuses what does not fit."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    config_path = base_dir / "config.json"
    if not config_path.is_file():
        raise BakeError(f"{base_dir}: no config.json; give a transformers model directory")
    config = json.loads(config_path.read_text())
    out_dtype = DTYPES[dtype] if dtype else None

    def written(dt: torch.dtype) -> torch.dtype:
        return out_dtype if out_dtype is not None and dt.is_floating_point else dt

    base = stored_tensors(base_dir)
    by_name = {t.name: t for t in base}
    tied = bool(config.get("tie_word_embeddings", False))
    targets, untied = _targets(adapter, by_name, tied)
    plan = [StoredTensor(t.name, t.source, t.shape, written(t.dtype), t.offset) for t in base]
    embed = next((t for t in plan if t.name.endswith("embed_tokens.weight")), None)
    for name in untied:
        if embed is None:
            raise IncompatibleAdaptersError("adapter targets the tied lm_head but no embed_tokens weight was found")
        plan.append(StoredTensor(name, embed.source, embed.shape, embed.dtype, embed.offset))
        targets[name] = "lm_head"
    return _Plan(config, base, plan, targets, untied, embed)


def planned_bytes(base_dir: str | Path, adapter: Adapter, dtype: str | None = None) -> int:
    """An upper bound on what `bake` writes, before a byte is written: the tensors, their
    headers and index, the base's other files, the manifest."""
    base_dir = Path(base_dir)
    plan = _plan(base_dir, adapter, dtype)
    extras = sum(f.stat().st_size for f in base_dir.iterdir() if f.is_file() and not WEIGHT_FILES.match(f.name))
    names = sum(3 * len(t.name) + 256 for t in plan.tensors)  # shard header, index, manifest mentions
    return sum(t.nbytes for t in plan.tensors) + names + 2 * extras + (64 << 10)


def bake(
    base_dir: str | Path,
    adapter: Adapter,
    output_dir: str | Path,
    dtype: str | None = None,
    max_shard_size: int | str = "50GB",
    overwrite: bool = False,
    on_progress: ProgressCallback | None = None,
    root: Path | None = None,
) -> BakeManifest:
    """Write base + ΔW as a model directory that `AutoModelForCausalLM.from_pretrained` loads.

    `dtype` (float32/bfloat16/float16) casts floating tensors; None keeps each stored dtype.
    `root`: the write root `output_dir` was checked against (see `atomic_directory`).
    """
    base_dir, output_dir = Path(base_dir), Path(output_dir)
    cap = parse_size(max_shard_size)
    if cap <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size!r}")
    config, base, plan, targets, untied, embed = _plan(base_dir, adapter, dtype)
    shards = plan_shards(plan, cap)
    total = sum(t.nbytes for t in plan)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    manifest = BakeManifest(
        base=str(base_dir),
        adapter=adapter.source or adapter.name,
        dtype=dtype or "as stored",
        merged_modules=len(targets),
        tensors=len(plan),
        total_bytes=total,
        untied=untied,
        recipe=adapter.extra.get("recipe"),
    )
    stored = {t.name: t.dtype for t in base}
    stored |= {name: stored[embed.name] for name in untied if embed is not None}
    done = 0
    handles: dict[Path, object] = {}
    with atomic_directory(output_dir, overwrite=overwrite, root=root) as tmp:
        try:
            for file, shard in zip(names, shards):
                digest = hashlib.sha256()
                with create_file(tmp, file) as out:
                    header = shard_header(shard)
                    out.write(header)
                    digest.update(header)
                    for t in shard:
                        if t.source not in handles:
                            handles[t.source] = open(t.source, "rb")  # noqa: SIM115 (closed below)
                        tensor = read_tensor(handles[t.source], t, stored[t.name])
                        if t.name in targets:
                            delta = adapter.modules[targets[t.name]].dense()  # (out, in) float32
                            tensor = tensor.float() + (delta.T if adapter.fan_in_fan_out else delta)
                        data = tensor.to(t.dtype).contiguous().reshape(-1).view(torch.uint8).numpy()
                        out.write(memoryview(data))
                        digest.update(memoryview(data))
                        done += t.nbytes
                        if on_progress is not None:
                            on_progress(done, total)
                manifest.shards[file] = {"sha256": digest.hexdigest(), "bytes": (tmp / file).stat().st_size, "tensors": len(shard)}
        finally:
            for handle in handles.values():
                handle.close()
        verify_shards(tmp, names, shards)
        if len(shards) > 1:
            weight_map = {t.name: file for file, shard in zip(names, shards) for t in shard}
            (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        for extra in base_dir.iterdir():  # config, generation config, tokenizer files, chat template
            if extra.is_file() and not WEIGHT_FILES.match(extra.name):
                shutil.copy2(extra, tmp / extra.name)
        if dtype or untied:
            if dtype:
                config["dtype"] = dtype
                config.pop("torch_dtype", None)
            if untied:
                config["tie_word_embeddings"] = False
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / MANIFEST_NAME).write_text(json.dumps(asdict(manifest), indent=2, default=str))
    return manifest
