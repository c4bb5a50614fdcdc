"""The projections of a base model that adapters may target, and their shapes, from the model's
config alone (a meta-device model: no weights read): what any engine accepts, checked before an
adapter is registered."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig

from adapter_fusion.adapters import Adapter
from adapter_fusion.base_model import model_class
from adapter_fusion.errors import IncompatibleAdaptersError
from adapter_fusion.lora_layers import inject

Shapes = dict[str, tuple[int, int]]  # module path -> (out, in)


def projection_shapes(base_dir: str | Path) -> Shapes:
    """Every projection the builtin engine wraps (`lora_layers.inject`: all but the output head)."""
    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        model = model_class(bool(config.is_encoder_decoder)).from_config(config)
    return {path: layer.shape for path, layer in inject(model).items()}


def check_targets(adapter: Adapter, shapes: Shapes) -> None:
    """Refuse an adapter whose modules the model lacks or whose shapes differ."""
    for path, delta in adapter.modules.items():
        if path not in shapes:
            raise IncompatibleAdaptersError(f"adapter {adapter.name!r} targets {path!r}, which is not a LoRA target of this base model")
        if shapes[path] != delta.shape:
            raise IncompatibleAdaptersError(
                f"adapter {adapter.name!r} module {path!r} is {delta.shape[0]}x{delta.shape[1]}, the base model's is "
                f"{shapes[path][0]}x{shapes[path][1]}: it was made for another base model"
            )
