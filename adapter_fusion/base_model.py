"""The one loader of a base model's weights and tokenizer: the serving runtime and the data-aware
merges load the same classes the same way, so a model that serves is one that fits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel

from adapter_fusion.encoding import Encoder
from adapter_fusion.errors import RecipeError
from adapter_fusion.models import resolve_device, resolve_dtype


@dataclass(frozen=True)
class LoadedBase:
    model: PreTrainedModel  # eval mode, every parameter frozen
    encoder: Encoder
    device: torch.device
    dtype: torch.dtype


def model_class(is_seq2seq: bool) -> type:
    """The transformers auto class of a causal or a seq2seq base model."""
    return AutoModelForSeq2SeqLM if is_seq2seq else AutoModelForCausalLM


def open_encoder(base_dir: str | Path) -> Encoder:
    """The base model's tokenizer; a directory without one is refused with what it is needed for."""
    try:
        return Encoder(base_dir)
    except (OSError, ValueError, TypeError):
        raise RecipeError(f"{base_dir}: no tokenizer; the examples are tokenized with the base model's tokenizer") from None


def load_base(base_dir: str | Path, device: str | None = None, dtype: str | None = None) -> LoadedBase:
    """The model in `base_dir` on `device` in `dtype` (None: `models.resolve_device` and
    `resolve_dtype`'s defaults), in eval mode and never trained: gradients reach only what a
    caller adds (column scales, probes)."""
    resolved = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved)
    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise RecipeError(f"{base_dir}: not a model directory (no config.json); give a transformers model directory")
    encoder = open_encoder(base_dir)
    model = model_class(encoder.is_seq2seq).from_pretrained(base_dir, dtype=resolved_dtype)
    return LoadedBase(model.to(resolved).eval().requires_grad_(False), encoder, resolved, resolved_dtype)
