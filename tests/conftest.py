"""Shared fixtures: tiny random Llama models, real adapters written by peft, the real SmolLM2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapter_fusion.models import LLAMA_TARGETS, default_base, tiny_llama


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_chat_base(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer: a servable model that loads in a blink."""
    return tiny_llama(tmp_path_factory.mktemp("tiny-chat") / "tiny-chat", tokenizer_from=smollm2)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct converted once per machine (cached), shared by the whole run."""
    return default_base()


def write_peft_adapter(
    base_dir: Path,
    out: Path,
    seed: int,
    r: int = 4,
    alpha: float = 8,
    targets: list[str] | None = None,
    b_scale: float = 50.0,
    task_type: str = "CAUSAL_LM",
    **config,
) -> Path:
    """Write a real PEFT adapter with random (non-zero) A and B for the model in `base_dir`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    torch.manual_seed(seed)
    model_class = AutoModelForSeq2SeqLM if task_type == "SEQ_2_SEQ_LM" else AutoModelForCausalLM
    model = model_class.from_pretrained(base_dir)
    lora = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets or LLAMA_TARGETS,
        init_lora_weights=False,  # random B too, so the delta is not zero
        task_type=task_type,
        **config,
    )
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():  # `b_scale` scales B so that each adapter moves the outputs clearly
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(b_scale)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_adapters(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four adapters on the tiny model: ranks 4, 4, 8 (rsLoRA) and 4 on a subset of targets."""
    root = tmp_path_factory.mktemp("adapters")
    return [
        write_peft_adapter(tiny_base, root / "a", seed=1, r=4, alpha=8),
        write_peft_adapter(tiny_base, root / "b", seed=2, r=4, alpha=16),
        write_peft_adapter(tiny_base, root / "c", seed=3, r=8, alpha=8, use_rslora=True),
        write_peft_adapter(tiny_base, root / "d", seed=4, r=4, alpha=4, targets=["q_proj", "v_proj"]),
    ]
