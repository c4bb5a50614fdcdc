"""The PEFT LoRA directory format as this library reads and writes it: the file names, the
dtypes factors are saved in, and adapter_config.json read under a size bound with every field
that changes what the adapter computes checked (unsupported PEFT features, ranks, alphas,
patterns). Every refusal names the file and says why."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from adapter_fusion.errors import AdapterFormatError, UnsupportedAdapterError
from adapter_fusion.jsonfile import read_json
from adapter_fusion.patterns import PatternError, Resolved, resolve

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
MAX_CONFIG_BYTES = 4 << 20  # a config with a rank_pattern for every module of a 70B model is ~100 KB
KEY_PREFIX = "base_model.model."
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


def fail(path: Path, reason: str, kind: type[AdapterFormatError] = AdapterFormatError) -> AdapterFormatError:
    return kind(f"{path}: {reason}")


def read_config(directory: str | Path, max_bytes: int = MAX_CONFIG_BYTES) -> dict:
    """The adapter's config, bounded (see `jsonfile`): a hostile one is refused, never a crash."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFormatError(f"{directory}: not a directory (expected a PEFT adapter dir with {CONFIG_NAME})")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise fail(path, "missing; a PEFT adapter dir holds adapter_config.json and adapter_model.safetensors")
    try:
        config = read_json(path, max_bytes)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, over the size or depth bound
        raise fail(path, f"not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise fail(path, "must hold a JSON object")
    return config


def check_supported(path: Path, config: dict) -> None:
    """Refuse a non-LoRA adapter or one using a feature beyond B @ A, listing every such feature at once."""
    problems = []
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r} (only LORA adapters compose)")
    problems += [what for key, what in _UNSUPPORTED_FIELDS.items() if config.get(key)]
    if problems:
        raise fail(path, "unsupported: " + "; ".join(problems), UnsupportedAdapterError)


def target_patterns(path: Path, config: dict, modules: list[str], rank_pattern: dict, alpha_pattern: dict) -> Resolved:
    """PEFT's pattern and target rules applied to `modules` with bounded matching (`patterns`)."""
    targets = config.get("target_modules")
    if not (targets is None or isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise fail(path, "target_modules must be a regex string or a list of module names")
    try:
        return resolve(modules, list(rank_pattern), list(alpha_pattern), targets)
    except PatternError as error:
        raise fail(path, str(error)) from None


def _number(path: Path, key: str, value: object, integer: bool = False) -> float:
    """A config number that scaling can use: finite, positive, an int where PEFT needs one."""
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or not math.isfinite(value) or value <= 0 or value > 1e6:
        kind = "a positive integer" if integer else "a positive finite number"
        raise fail(path, f"{key} must be {kind}, got {value!r}")
    return value


def scale_fields(path: Path, config: dict) -> tuple[int, float, dict, dict]:
    """r, lora_alpha and the rank/alpha patterns, each checked (a NaN alpha would load and
    silently generate nothing). The pattern keys are checked where they are matched (`target_patterns`)."""
    r = int(_number(path, "r", config.get("r", 8), integer=True))
    alpha = _number(path, "lora_alpha", config.get("lora_alpha", r))
    patterns = []
    for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise fail(path, f"{key} must be a mapping of module patterns to numbers")
        for regex, value in pattern.items():
            _number(path, f"{key}[{regex[:80]!r}]", value, integer)
        patterns.append(pattern)
    return r, alpha, patterns[0], patterns[1]
