"""The in-place KV cache holds exactly what transformers' concatenating DynamicCache holds (copies
only, so bit for bit) through prefill, many steps, regrowth, rows leaving and rows joining; a
step writes into the same buffer instead of a new one; and a long generation through the
decoder (past a regrowth) gives the base model's own greedy tokens."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache

from adapter_fusion.kv_cache import MIN_CAPACITY, GrowingCache, left_pad
from adapter_fusion.runtime import Runtime
from adapter_fusion.decoding import greedy
from tests.test_architectures import normwise
from tests.test_runtime_device import decided_steps

LAYERS, BATCH, HEADS, DIM = 3, 4, 2, 8


def states(generator: torch.Generator, batch: int, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, HEADS, positions, DIM, generator=generator), torch.randn(batch, HEADS, positions, DIM, generator=generator)


def assert_same(ours: GrowingCache, theirs: DynamicCache) -> None:
    assert len(ours.layers) == len(theirs.layers)
    for a, b in zip(ours.layers, theirs.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert ours.get_seq_length() == theirs.get_seq_length()


def test_steps_regrowth_select_and_join_hold_what_dynamic_cache_holds() -> None:
    generator = torch.Generator().manual_seed(0)
    ours, theirs = GrowingCache(), DynamicCache()
    for width in [5, *[1] * (3 * MIN_CAPACITY), 7]:  # a prefill, steps past two regrowths, a wider chunk
        new = [states(generator, BATCH, width) for _ in range(LAYERS)]
        for layer, (k, v) in enumerate(new):
            ours.update(k, v, layer)
            theirs.update(k, v, layer)
        assert_same(ours, theirs)
    assert ours.layers[0]._keys.shape[-2] >= ours.get_seq_length() > 2 * MIN_CAPACITY

    rows = torch.tensor([3, 1])
    kept = ours.select(rows)
    for a, b in zip(kept.layers, theirs.layers):
        assert torch.equal(a.keys, b.keys[rows]) and torch.equal(a.values, b.values[rows])

    joining = GrowingCache()
    for layer in range(LAYERS):
        joining.update(*states(generator, 2, 9), layer)
    length = kept.get_seq_length()
    joined = kept.joined(joining, length)
    for a, b, c in zip(joined.layers, kept.layers, joining.layers):
        assert torch.equal(a.keys, torch.cat([b.keys, left_pad(c.keys, length, 2)]))
        assert torch.equal(a.values, torch.cat([b.values, left_pad(c.values, length, 2)]))


def test_inherited_batch_methods_then_steps_hold_what_dynamic_cache_holds() -> None:
    """transformers' own reorder / select / repeat replace a layer's tensors; the next step adopts them."""
    generator = torch.Generator().manual_seed(2)
    ours, theirs = GrowingCache(), DynamicCache()
    for change in (None, lambda c: c.reorder_cache(torch.tensor([2, 0, 3, 1])), lambda c: c.batch_select_indices(torch.tensor([1, 2])), lambda c: c.batch_repeat_interleave(2)):
        if change is not None:
            change(ours)
            change(theirs)
        batch = theirs.layers[0].keys.shape[0] if theirs.layers else BATCH
        for width in (4, 1, 1):
            new = [states(generator, batch, width) for _ in range(LAYERS)]
            for layer, (k, v) in enumerate(new):
                ours.update(k, v, layer)
                theirs.update(k, v, layer)
            assert_same(ours, theirs)


def test_a_step_writes_in_place() -> None:
    generator = torch.Generator().manual_seed(1)
    cache = GrowingCache()
    cache.update(*states(generator, BATCH, 3), 0)
    buffer = cache.layers[0]._keys.data_ptr()
    for _ in range(MIN_CAPACITY - 3):
        cache.update(*states(generator, BATCH, 1), 0)
        assert cache.layers[0]._keys.data_ptr() == buffer and cache.layers[0].keys.data_ptr() == buffer
    cache.update(*states(generator, BATCH, 1), 0)  # full: one regrowth
    assert cache.layers[0]._keys.data_ptr() != buffer


def test_a_long_generation_is_the_base_models_greedy(tiny_chat_base: Path) -> None:
    """Past a regrowth, each row's tokens are those of transformers' own greedy decoding
    with its concatenating cache, at every step whose top-2 margin float32 rounding cannot close
    (the bound of tests/test_architectures.py)."""
    runtime = Runtime(tiny_chat_base)
    prompts = [runtime.chat_ids(m) for m in ("Name three rivers.", "Hi")]
    tokens = 3 * MIN_CAPACITY
    ours = greedy(runtime, prompts, [0, 0], tokens)
    width = max(map(len, prompts))  # both rows, left-padded, prefilled together
    first_regrowth = max(2 * width, MIN_CAPACITY)  # the prefill's buffers are full at this length
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_base, dtype=torch.float32).eval()
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=tokens,
                do_sample=False, eos_token_id=sorted(runtime.stop_ids), pad_token_id=runtime.pad_id,
            )[0, len(prompt) :].tolist()
        want = out[: next((i for i, t in enumerate(out) if t in runtime.stop_ids), len(out))]
        decided = decided_steps(model, prompt, want, normwise(model.config))
        assert got[:decided] == want[:decided], f"equal required up to step {decided}"
        assert width + decided > first_regrowth, f"decided only up to step {decided}: the regrowth was not checked"
