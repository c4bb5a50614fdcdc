"""Adapter: a PEFT LoRA adapter as {module path: LowRankDelta}; loading checks everything.

Loading folds each module's scale s into the factors once (lora_alpha/r, or lora_alpha/√r with
rsLoRA, per-module rank_pattern/alpha_pattern honoured), so every later operation works on plain
products B @ A. The scale is split √s into each factor rather than all into B: the product is the
same, and factor-space rules (PEFT's `linear`, LoraHub's (Σw·B)(Σw·A)) then match their originals
for sources of different scales too. Every refusal names the file and says why; unsupported PEFT features are
collected into one error rather than reported one at a time.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from adapter_fusion.delta import LowRankDelta
from adapter_fusion.errors import IncompatibleAdaptersError, UnsupportedAdapterError
from adapter_fusion.peft_format import (
    CONFIG_NAME, DTYPES, KEY_PREFIX, PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, check_supported, fail, read_config, scale_fields, target_patterns,
)

# the format's names, where callers have always found them
__all__ = [
    "CONFIG_NAME", "DTYPES", "PICKLE_WEIGHTS_NAME", "WEIGHTS_NAME", "Adapter", "check_compatible", "load_adapter", "read_config",
]
# PEFT names factors "<module>.lora_A.weight"; older files keep the adapter name before ".weight".
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class Adapter:
    """A LoRA adapter in memory: float32 factors with the scale folded in."""

    name: str
    modules: dict[str, LowRankDelta]  # module path in the base model -> ΔW = B @ A
    base_model: str | None = None  # base_model_name_or_path of the source(s)
    task_type: str | None = "CAUSAL_LM"
    fan_in_fan_out: bool = False  # base weights stored (in, out), e.g. GPT-2 Conv1D
    source: str | None = None  # where it was loaded from
    extra: dict = field(default_factory=dict)  # free metadata kept for reports (e.g. the recipe)

    @property
    def ranks(self) -> dict[str, int]:
        return {path: delta.rank for path, delta in self.modules.items()}

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {path: delta.shape for path, delta in self.modules.items()}

    @property
    def target_names(self) -> list[str]:
        """Leaf module names targeted (q_proj, ...), as PEFT users think of them."""
        return sorted({path.rsplit(".", 1)[-1] for path in self.modules})

    @property
    def size_bytes(self) -> int:
        return sum((d.A.numel() + d.B.numel()) * d.A.element_size() for d in self.modules.values())

    def fingerprint(self) -> str:
        """Identity of the base model as seen by this adapter: its target paths and shapes."""
        text = ";".join(f"{path}={out}x{inp}" for path, (out, inp) in sorted(self.shapes.items()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_tensors(directory: Path, allow_pickle: bool) -> tuple[Path, dict[str, torch.Tensor]]:
    weights = directory / WEIGHTS_NAME
    if weights.is_file():
        try:
            return weights, load_file(weights)
        except (SafetensorError, OSError, ValueError) as error:
            raise fail(weights, f"unreadable or truncated safetensors file ({error})") from None
    pickled = directory / PICKLE_WEIGHTS_NAME
    if pickled.is_file():
        if not allow_pickle:
            raise fail(
                pickled,
                "pickle weights refused: loading them can run arbitrary code. Convert the adapter to "
                "safetensors, or pass allow_pickle=True if you trust its origin",
            )
        try:
            return pickled, torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many kinds for a broken pickle
            raise fail(pickled, f"unreadable pickle weights ({type(error).__name__}: {error})") from None
    raise fail(directory, f"no {WEIGHTS_NAME} found")


def load_adapter(directory: str | Path, name: str | None = None, allow_pickle: bool = False) -> Adapter:
    """Load and validate a PEFT LoRA directory."""
    directory = Path(directory)
    config = read_config(directory)
    config_path = directory / CONFIG_NAME
    check_supported(config_path, config)
    weights_path, tensors = _read_tensors(directory, allow_pickle)

    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key.removeprefix(KEY_PREFIX))
        if match is None:
            what = "embedding LoRA" if "lora_embedding" in key else "DoRA magnitude" if "magnitude" in key else "unexpected tensor"
            raise fail(weights_path, f"unsupported: {what} {key!r}", UnsupportedAdapterError)
        factors.setdefault(match["module"], {})[match["factor"]] = tensor
    if not factors:
        raise fail(weights_path, "holds no LoRA weights")

    r_default, alpha_default, rank_pattern, alpha_pattern = scale_fields(config_path, config)
    found = target_patterns(config_path, config, sorted(factors), rank_pattern, alpha_pattern)
    modules: dict[str, LowRankDelta] = {}
    for module, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "B" not in pair else "lora_A"
            raise fail(weights_path, f"module {module!r} has no {missing} weight")
        A, B = pair["A"], pair["B"]
        if A.ndim != 2 or B.ndim != 2:
            raise fail(weights_path, f"module {module!r}: only 2-D (linear) LoRA weights compose, got A {tuple(A.shape)}", UnsupportedAdapterError)
        if not found.targeted[module]:  # PEFT would make no layer for it and drop these weights
            raise fail(config_path, f"module {module!r} has LoRA weights but target_modules does not select it")
        r = int(rank_pattern[found.rank_key[module]]) if found.rank_key[module] is not None else r_default
        if A.shape[0] != r or B.shape[1] != r:
            raise fail(
                weights_path,
                f"module {module!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} disagree with rank {r} in {CONFIG_NAME}",
            )
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise fail(weights_path, f"module {module!r} holds NaN or infinite values")
        alpha = alpha_pattern[found.alpha_key[module]] if found.alpha_key[module] is not None else alpha_default
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        root = math.sqrt(abs(scale))
        modules[module] = LowRankDelta(B.float() * math.copysign(root, scale), A.float() * root)

    return Adapter(
        name=name or directory.name,
        modules=modules,
        base_model=config.get("base_model_name_or_path"),
        task_type=config.get("task_type"),
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        source=str(directory),
    )


def _base_key(name: str | None) -> str | None:
    """Base-model names compare by their last path component: a hub id and a local copy agree."""
    return Path(name).name.lower() if name else None


def check_compatible(adapters: list[Adapter]) -> None:
    """Refuse sources made for different base models (by name, and by the shapes they target)."""
    names = {_base_key(a.base_model): a.base_model for a in adapters if a.base_model}
    if len(names) > 1:
        listing = ", ".join(f"{a.name}: {a.base_model}" for a in adapters)
        raise IncompatibleAdaptersError(f"adapters were trained on different base models ({listing})")
    seen: dict[str, tuple[str, tuple[int, int]]] = {}
    for adapter in adapters:
        for path, shape in adapter.shapes.items():
            first = seen.setdefault(path, (adapter.name, shape))
            if first[1] != shape:
                raise IncompatibleAdaptersError(
                    f"module {path!r} is {first[1][0]}x{first[1][1]} in {first[0]} but "
                    f"{shape[0]}x{shape[1]} in {adapter.name}: they were made for different base models"
                )
    if len({a.fan_in_fan_out for a in adapters}) > 1:
        raise IncompatibleAdaptersError("adapters disagree on fan_in_fan_out: they target different layer types")
