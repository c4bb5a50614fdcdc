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
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from adapter_fusion.atomic import atomic_directory
from adapter_fusion.delta import LowRankDelta
from adapter_fusion.errors import AdapterFormatError, IncompatibleAdaptersError, UnsupportedAdapterError
from adapter_fusion.jsonfile import read_json
from adapter_fusion.patterns import PatternError, Resolved, resolve

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
MAX_CONFIG_BYTES = 4 << 20  # a config with a rank_pattern for every module of a 70B model is ~100 KB
_PREFIX = "base_model.model."
# PEFT names factors "<module>.lora_A.weight"; older files keep the adapter name before ".weight".
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Config fields whose non-default values change what the adapter computes beyond B @ A.
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "LoRA bias terms",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "LoRA on nn.Parameter (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
}


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


def _fail(path: Path, reason: str, kind: type[AdapterFormatError] = AdapterFormatError) -> AdapterFormatError:
    return kind(f"{path}: {reason}")


def read_config(directory: str | Path, max_bytes: int = MAX_CONFIG_BYTES) -> dict:
    """The adapter's config, bounded (see `jsonfile`): a hostile one is refused, never a crash."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFormatError(f"{directory}: not a directory (expected a PEFT adapter dir with {CONFIG_NAME})")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise _fail(path, "missing; a PEFT adapter dir holds adapter_config.json and adapter_model.safetensors")
    try:
        config = read_json(path, max_bytes)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, over the size or depth bound
        raise _fail(path, f"not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise _fail(path, "must hold a JSON object")
    return config


def _check_supported(path: Path, config: dict) -> None:
    problems = []
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r} (only LORA adapters compose)")
    problems += [what for key, what in _UNSUPPORTED_FIELDS.items() if config.get(key)]
    if problems:
        raise _fail(path, "unsupported: " + "; ".join(problems), UnsupportedAdapterError)


def _patterns(path: Path, config: dict, modules: list[str], rank_pattern: dict, alpha_pattern: dict) -> Resolved:
    """PEFT's pattern and target rules applied to `modules` with bounded matching (`patterns`)."""
    targets = config.get("target_modules")
    if not (targets is None or isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise _fail(path, "target_modules must be a regex string or a list of module names")
    try:
        return resolve(modules, list(rank_pattern), list(alpha_pattern), targets)
    except PatternError as error:
        raise _fail(path, str(error)) from None


def _number(path: Path, key: str, value: object, integer: bool = False) -> float:
    """A config number that scaling can use: finite, positive, an int where PEFT needs one."""
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or not math.isfinite(value) or value <= 0 or value > 1e6:
        kind = "a positive integer" if integer else "a positive finite number"
        raise _fail(path, f"{key} must be {kind}, got {value!r}")
    return value


def _scale_fields(path: Path, config: dict) -> tuple[int, float, dict, dict]:
    """r, lora_alpha and the rank/alpha patterns, each checked (a NaN alpha would load and
    silently generate nothing). The pattern keys are checked where they are matched (`_patterns`)."""
    r = int(_number(path, "r", config.get("r", 8), integer=True))
    alpha = _number(path, "lora_alpha", config.get("lora_alpha", r))
    patterns = []
    for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise _fail(path, f"{key} must be a mapping of module patterns to numbers")
        for regex, value in pattern.items():
            _number(path, f"{key}[{regex[:80]!r}]", value, integer)
        patterns.append(pattern)
    return r, alpha, patterns[0], patterns[1]


def _read_tensors(directory: Path, allow_pickle: bool) -> tuple[Path, dict[str, torch.Tensor]]:
    weights = directory / WEIGHTS_NAME
    if weights.is_file():
        try:
            return weights, load_file(weights)
        except (SafetensorError, OSError, ValueError) as error:
            raise _fail(weights, f"unreadable or truncated safetensors file ({error})") from None
    pickled = directory / PICKLE_WEIGHTS_NAME
    if pickled.is_file():
        if not allow_pickle:
            raise _fail(
                pickled,
                "pickle weights refused: loading them can run arbitrary code. Convert the adapter to "
                "safetensors, or pass allow_pickle=True if you trust its origin",
            )
        try:
            return pickled, torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many kinds for a broken pickle
            raise _fail(pickled, f"unreadable pickle weights ({type(error).__name__}: {error})") from None
    raise _fail(directory, f"no {WEIGHTS_NAME} found")


def load_adapter(directory: str | Path, name: str | None = None, allow_pickle: bool = False) -> Adapter:
    """Load and validate a PEFT LoRA directory."""
    directory = Path(directory)
    config = read_config(directory)
    config_path = directory / CONFIG_NAME
    _check_supported(config_path, config)
    weights_path, tensors = _read_tensors(directory, allow_pickle)

    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key.removeprefix(_PREFIX))
        if match is None:
            what = "embedding LoRA" if "lora_embedding" in key else "DoRA magnitude" if "magnitude" in key else "unexpected tensor"
            raise _fail(weights_path, f"unsupported: {what} {key!r}", UnsupportedAdapterError)
        factors.setdefault(match["module"], {})[match["factor"]] = tensor
    if not factors:
        raise _fail(weights_path, "holds no LoRA weights")

    r_default, alpha_default, rank_pattern, alpha_pattern = _scale_fields(config_path, config)
    found = _patterns(config_path, config, sorted(factors), rank_pattern, alpha_pattern)
    modules: dict[str, LowRankDelta] = {}
    for module, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "B" not in pair else "lora_A"
            raise _fail(weights_path, f"module {module!r} has no {missing} weight")
        A, B = pair["A"], pair["B"]
        if A.ndim != 2 or B.ndim != 2:
            raise _fail(weights_path, f"module {module!r}: only 2-D (linear) LoRA weights compose, got A {tuple(A.shape)}", UnsupportedAdapterError)
        if not found.targeted[module]:  # PEFT would make no layer for it and drop these weights
            raise _fail(config_path, f"module {module!r} has LoRA weights but target_modules does not select it")
        r = int(rank_pattern[found.rank_key[module]]) if found.rank_key[module] is not None else r_default
        if A.shape[0] != r or B.shape[1] != r:
            raise _fail(
                weights_path,
                f"module {module!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} disagree with rank {r} in {CONFIG_NAME}",
            )
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise _fail(weights_path, f"module {module!r} holds NaN or infinite values")
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
        tensors[f"{_PREFIX}{path}.lora_A.weight"] = delta.A.to(torch_dtype).contiguous()
        tensors[f"{_PREFIX}{path}.lora_B.weight"] = delta.B.to(torch_dtype).contiguous()
    config.save_pretrained(directory)
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    if adapter.extra:
        (directory / "adapter_fusion.json").write_text(json.dumps(adapter.extra, indent=2, default=str))
