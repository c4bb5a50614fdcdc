"""Mixed-adapter batches on injected layers equal PEFT's per-adapter outputs; every projection
is wrapped, at no cost where no slot touches it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapter_fusion import load_adapter, lora_layers
from adapter_fusion.adapters import Adapter
from adapter_fusion.lora_layers import MultiLoraLinear, inject, route
from adapter_fusion.models import LLAMA_TARGETS
from adapter_fusion.slots import Route, SlotBank, routes_of

IDS = torch.arange(5, 29).view(3, 8)
# the dense kernel runs for one-token forwards (decode steps) over more than GROUPED_SLOTS slots
KERNELS = pytest.mark.parametrize(("grouped_slots", "tokens"), [(4, 8), (4, 1), (0, 1)], ids=["prefill", "slot-by-slot", "dense"])


def bank_of(layers: dict[str, MultiLoraLinear], slots: list[list[Adapter]], columns: int = 64) -> SlotBank:
    bank = SlotBank(layers, torch.device("cpu"), torch.float32, columns)
    for i, sources in enumerate(slots, start=1):
        bank.write(i, sources)
    return bank


def routed_by(layers: dict[str, MultiLoraLinear], bank: SlotBank, rows: list[Route], weights: torch.Tensor | None = None):
    return route(layers, bank.routing(routes_of(rows, weights)))


@KERNELS
def test_mixed_batch_equals_peft_per_adapter(
    tiny_base: Path, tiny_adapters: list[Path], grouped_slots: int, tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lora_layers, "GROUPED_SLOTS", grouped_slots)
    ids = IDS[:, :tokens]  # (batch, seq)
    adapters = [load_adapter(p) for p in tiny_adapters[2:]]  # rank 8 (all targets), rank 4 (q, v only)
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    layers = inject(model, LLAMA_TARGETS)
    bank = bank_of(layers, [[a] for a in adapters])
    with torch.no_grad(), routed_by(layers, bank, [1, 0, 2]):
        mixed = model(ids).logits
        base_out = AutoModelForCausalLM.from_pretrained(tiny_base)(ids).logits
    torch.testing.assert_close(mixed[1], base_out[1], rtol=1e-5, atol=1e-5)
    for row, adapter_dir in ((0, tiny_adapters[2]), (2, tiny_adapters[3])):
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), adapter_dir).eval()
        with torch.no_grad():
            torch.testing.assert_close(mixed[row], peft(ids[row : row + 1]).logits[0], rtol=1e-4, atol=1e-4)


@KERNELS
def test_per_row_source_weights_are_the_exact_weighted_sum(
    tiny_base: Path, tiny_adapters: list[Path], grouped_slots: int, tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lora_layers, "GROUPED_SLOTS", grouped_slots)
    ids = IDS[:, :tokens]  # (batch, seq)
    sources = [load_adapter(p) for p in tiny_adapters[:2]]
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    layers = inject(model, LLAMA_TARGETS)
    bank = bank_of(layers, [sources])
    weights = torch.tensor([[0.7, -0.3], [0.0, 1.0], [1.0, 1.0]])
    with torch.no_grad(), routed_by(layers, bank, [1, 1, 1], weights):
        routed = model(ids).logits
    for row in range(3):
        reference = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
        with torch.no_grad():
            for path in sources[0].modules:
                w = weights[row]
                reference.get_submodule(path).weight += w[0] * sources[0].modules[path].dense() + w[1] * sources[1].modules[path].dense()
            torch.testing.assert_close(routed[row], reference(ids[row : row + 1]).logits[0], rtol=1e-4, atol=1e-4)


def test_inject_wraps_every_projection_but_the_head_and_untouched_layers_stay_the_base(
    tiny_base: Path, tiny_adapters: list[Path]
) -> None:
    """Wrapping everything is free for a layer no slot touches: its forward is the base's own."""
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    head = model.get_output_embeddings()
    projections = {path for path, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    layers = inject(model, None)
    assert set(layers) == projections and model.get_output_embeddings() is head
    subset = load_adapter(tiny_adapters[3])  # q_proj and v_proj only
    bank = bank_of(layers, [[subset]])
    untouched = layers["model.layers.0.mlp.down_proj"]
    assert untouched.A is None and not untouched.holds and layers["model.layers.0.self_attn.q_proj"].holds == {1}
    x = torch.randn(2, 3, untouched.shape[1])
    with torch.no_grad(), routed_by(layers, bank, [1, 1]):
        assert torch.equal(untouched(x), untouched.base(x))


@pytest.mark.parametrize("tokens", [8, 1])
def test_a_slot_whose_modules_are_all_rank_zero_adds_nothing(tiny_base: Path, tiny_adapters: list[Path], tokens: int) -> None:
    """A merge that prunes everything (DARE-TIES at a tiny density) gives rank-0 modules: served, they are the base model."""
    from adapter_fusion.delta import LowRankDelta

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    layers = inject(model, LLAMA_TARGETS)
    real = load_adapter(tiny_adapters[0])
    empty = Adapter("empty", {path: LowRankDelta.zeros(delta.shape) for path, delta in real.modules.items()})
    bank = bank_of(layers, [[empty], [real]])
    ids = IDS[:, :tokens]
    with torch.no_grad():
        base_out = model(ids).logits
        with routed_by(layers, bank, [1, 1, 2]):  # its rows side by side: the kernel's view path
            mixed = model(ids).logits
        with routed_by(layers, bank, [1, 1, 1]):  # every row
            alone = model(ids).logits
    assert torch.equal(mixed[:2], base_out[:2]) and torch.equal(alone, base_out)
