"""Safetensors model files read and written without loading a model: the headers, one tensor at
a time by a plain read, shards planned from sizes alone. What `bake` streams through."""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from adapter_fusion.errors import AdapterFusionError

INDEX_NAME = "model.safetensors.index.json"
ST_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
FROM_ST = {v: k for k, v in ST_DTYPES.items()}


class BakeError(AdapterFusionError):
    """The base model directory cannot be baked (no safetensors weights, broken index)."""


@dataclass(frozen=True)
class StoredTensor:
    name: str
    source: Path  # base shard it is read from
    shape: tuple[int, ...]
    dtype: torch.dtype  # as written
    offset: int = 0  # where its bytes start in `source`

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def parse_size(size: int | str) -> int:
    """Bytes from 5000000, "500MB", "5GB" (10^n) or "2GiB" (2^n), as transformers reads them."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", size.upper())
    if not match:
        raise ValueError(f"cannot read a size from {size!r}; use e.g. 500MB, 5GB or 2GiB")
    number, unit, binary = match.groups()
    return int(float(number) * (1024 if binary else 1000) ** "_KMGT".index(unit or "_"))


def readshard_header(path: Path) -> tuple[int, dict]:
    """(where the data starts, the header's tensor entries) of a safetensors file."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BakeError(f"{path}: truncated safetensors file")
        (length,) = struct.unpack("<Q", head)
        try:
            entries = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BakeError(f"{path}: unreadable safetensors header ({error})") from None
    entries.pop("__metadata__", None)
    return 8 + length, entries


def read_tensor(f, t: StoredTensor, stored: torch.dtype) -> torch.Tensor:
    """One tensor by a plain read (no mmap: the pages of the whole model never count as ours)."""
    n = 1
    for d in t.shape:
        n *= d
    buffer = bytearray(n * torch.empty((), dtype=stored).element_size())
    f.seek(t.offset)
    if f.readinto(buffer) != len(buffer):
        raise BakeError(f"{t.source}: truncated while reading {t.name}")
    return torch.frombuffer(buffer, dtype=stored).reshape(t.shape) if n else torch.empty(t.shape, dtype=stored)


def stored_tensors(base_dir: Path) -> list[StoredTensor]:
    """Every tensor of the model in `base_dir` (its index's shards, or model.safetensors) as stored."""
    index = base_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise BakeError(f"{index}: broken index ({error})") from None
        files = list(dict.fromkeys(weight_map.values()))
    elif (base_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise BakeError(f"{base_dir}: no model.safetensors or {INDEX_NAME}; bake reads safetensors weights only")
    tensors = []
    for file in files:
        path = base_dir / file
        if not path.is_file():
            raise BakeError(f"{path}: listed in the index but missing")
        start, entries = readshard_header(path)
        for name, entry in sorted(entries.items(), key=lambda item: item[1]["data_offsets"][0]):
            if entry["dtype"] not in FROM_ST:
                raise BakeError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
            shape = tuple(entry["shape"])
            tensors.append(StoredTensor(name, path, shape, FROM_ST[entry["dtype"]], start + entry["data_offsets"][0]))
    return tensors


def plan_shards(tensors: list[StoredTensor], cap: int) -> list[list[StoredTensor]]:
    """Fill shards in order, starting a new one when the next tensor would overflow the cap."""
    shards: list[list[StoredTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > cap:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_header(shard: list[StoredTensor]) -> bytes:
    """A shard's safetensors header: its tensors packed in order."""
    entries: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in shard:
        entries[t.name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def verify_shards(directory: Path, names: list[str], shards: list[list[StoredTensor]]) -> None:
    """Every planned tensor is in its shard with its shape and dtype (headers only, cheap)."""
    for file, shard in zip(names, shards):
        with safe_open(directory / file, framework="pt") as f:
            found = {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}
        expected = {t.name: (t.shape, ST_DTYPES[t.dtype]) for t in shard}
        if found != expected:
            raise BakeError(f"{file}: written tensors do not match the plan; nothing was published")
