"""Any decoder-only architecture: tiny random Qwen2, Mistral, Phi-3 (fused qkv_proj and
gate_up_proj) and GPT-2 (Conv1D, fan_in_fan_out) bases with peft-written adapters on each one's
own module names. Through `Runtime`, a mixed batch of two adapters and the base model equals
peft per adapter, and greedy decoding equals peft's generate."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, GPT2Config, MistralConfig, Phi3Config, Qwen2Config

from adapter_fusion import load_adapter, lora_layers
from adapter_fusion.errors import IncompatibleAdaptersError
from adapter_fusion.models import LLAMA_TARGETS, tiny_causal_lm
from adapter_fusion.runtime import Runtime
from adapter_fusion.decoding import greedy
from tests.conftest import write_peft_adapter
from tests.test_runtime_device import LogitBound, decided_steps, head_io

SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
# name: (config, the adapters' target module names, extra LoraConfig fields)
ARCHITECTURES = {
    "qwen2": (lambda: Qwen2Config(**SHAPE), LLAMA_TARGETS, {}),
    "mistral": (lambda: MistralConfig(**SHAPE), LLAMA_TARGETS, {}),
    "phi3": (lambda: Phi3Config(**SHAPE), ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], {}),
    "gpt2": (
        lambda: GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128),
        ["c_attn", "c_proj", "c_fc"],
        {"fan_in_fan_out": True},  # Conv1D stores its weight (in, out)
    ),
}
RANKS = (4, 8)
ROWS = [1, 0, 2]  # adapter 1, the base model, adapter 2: one mixed batch
EPS32 = torch.finfo(torch.float32).eps  # 2^-23, twice the unit roundoff of float32


def relative_bound(config) -> float:
    """Relative bound (per position, over the vocabulary) on the logits of ours vs peft's, both
    float32. Their weights differ only by our folding √s into each LoRA factor at load (a
    rounding per factor: ρ = 2·eps32 on B@A). An elementwise perturbation ρ·|W| moves a length-d
    dot product by up to ρ·|W|@|x|, about √d times |W@x| when signs are not aligned; the two
    passes' own roundings (other batch shapes, other kernels) add about √d·eps32 (errors of
    random sign: Higham & Mary, SIAM J. Sci. Comput. 2019). A pre-norm block passes the residual
    stream's error on without amplifying it, so over L blocks: L·√d·(ρ + eps32), d the longest
    dot product (the MLP's inner size)."""
    d = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * config.hidden_size
    rho = 2 * EPS32
    return config.num_hidden_layers * d**0.5 * (rho + EPS32)


def normwise(config) -> LogitBound:
    """`relative_bound` as a per-logit bound for `decided_steps`: no logit moves more than the
    whole vector's error."""
    return lambda h, head, z, seq: relative_bound(config) * z.norm(dim=-1, keepdim=True).expand_as(z)


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def architecture(request: pytest.FixtureRequest, smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A tiny base of this architecture with SmolLM2's tokenizer, and two peft adapters on it at
    peft's own random scale (B random like A): deltas already a few times the weights. Scaled ×50
    (conftest's default) they are ~200× the weights, a model its adapters dominate, whose
    sharpened attention amplifies rounding past any depth-derived bound."""
    config, targets, extra = ARCHITECTURES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    base = tiny_causal_lm(root / "base", config(), tokenizer_from=smollm2)
    adapters = [write_peft_adapter(base, root / f"r{r}", seed=r, r=r, targets=targets, b_scale=1.0, **extra) for r in RANKS]
    return base, adapters


def reference(base: Path, adapter_dir: Path | None) -> torch.nn.Module:
    """What `Runtime` must reproduce for a row: peft with that adapter, or the plain base model."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return (PeftModel.from_pretrained(model, adapter_dir) if adapter_dir else model).eval()


@pytest.mark.parametrize(("grouped_slots", "tokens"), [(4, 8), (0, 1)], ids=["prefill", "dense-decode"])
def test_mixed_batch_equals_peft_per_adapter(
    architecture: tuple[Path, list[Path]], grouped_slots: int, tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lora_layers, "GROUPED_SLOTS", grouped_slots)
    base, adapter_dirs = architecture
    runtime = Runtime(base)
    runtime.set_slots([[load_adapter(d)] for d in adapter_dirs])
    touched = {path for path, layer in runtime.layers.items() if layer.holds}
    assert touched == {path for d in adapter_dirs for path in load_adapter(d).modules}
    ids = (torch.arange(100, 124).view(len(ROWS), 8) * 97 % len(runtime.tokenizer))[:, :tokens]  # (batch, seq): spread over the vocabulary
    with torch.no_grad(), runtime.routed(ROWS):
        ours = runtime.model(input_ids=ids).logits  # (batch, seq, vocab)
    for b, slot in enumerate(ROWS):
        model = reference(base, adapter_dirs[slot - 1] if slot else None)
        theirs = head_io(model, ids[b].tolist())[2]  # (seq, vocab)
        error = (ours[b] - theirs).norm(dim=-1) / theirs.norm(dim=-1)  # (seq,)
        assert (error <= relative_bound(model.config)).all(), f"row {b} (slot {slot}): relative errors {error.tolist()}"


def test_greedy_equals_peft_generate(architecture: tuple[Path, list[Path]]) -> None:
    base, adapter_dirs = architecture
    runtime = Runtime(base)
    runtime.set_slots([[load_adapter(d)] for d in adapter_dirs])
    prompts = [runtime.chat_ids(m) for m in ("Name three rivers.", "Hi", "Spell 'cat' backwards, please.")]  # unequal: left padding
    ours = greedy(runtime, prompts, ROWS, 8)
    checked = 0
    for prompt, slot, got in zip(prompts, ROWS, ours):
        model = reference(base, adapter_dirs[slot - 1] if slot else None)
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=8,
                do_sample=False, eos_token_id=sorted(runtime.stop_ids), pad_token_id=runtime.pad_id,
            )[0, len(prompt) :].tolist()
        want = out[: next((i for i, t in enumerate(out) if t in runtime.stop_ids), len(out))]
        decided = decided_steps(model, prompt, want, normwise(model.config))
        assert got[:decided] == want[:decided], f"slot {slot}: ours {got} vs peft {want}, equal required up to {decided}"
        checked += decided
    assert checked > 0, "no step has a margin rounding cannot close: the test would check nothing"


def test_check_refuses_absent_modules_and_other_shapes(architecture: tuple[Path, list[Path]]) -> None:
    base, adapter_dirs = architecture
    runtime = Runtime(base)
    adapter = load_adapter(adapter_dirs[0])
    runtime.check(adapter)  # its own modules, (out, in) even where the weight is stored (in, out)
    by_shape = sorted(adapter.modules, key=lambda path: adapter.modules[path].shape)
    small, large = by_shape[0], by_shape[-1]  # of different shapes in every architecture here
    (o, i), (bo, bi) = adapter.modules[large].shape, runtime.shapes[small]
    with pytest.raises(IncompatibleAdaptersError, match=f"module '{small}' is {o}x{i}, the base model's is {bo}x{bi}"):
        runtime.check(replace(adapter, modules={small: adapter.modules[large]}))
    for absent in ("lm_head", "model.layers.7.mlp.down_proj"):  # the head is not wrapped
        with pytest.raises(IncompatibleAdaptersError, match=f"targets '{absent}', which is not a LoRA target of this base model"):
            runtime.check(replace(adapter, modules={absent: adapter.modules[small]}))
