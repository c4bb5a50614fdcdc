"""Incremental detokenization gives the text a full decode gives: at every step a prefix of it
(never a broken UTF-8 sequence), and all of it when the output ends."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from adapter_fusion.decoding import Request, detokenize


@pytest.fixture(scope="module")
def tokenizer(smollm2: Path):
    return AutoTokenizer.from_pretrained(smollm2)


def emoji_and_accents(tokenizer) -> list[int]:
    """Ids whose text splits multi-byte characters across tokens (byte-level BPE)."""
    return tokenizer("naïve café 🎸🌊 日本語 — ok", add_special_tokens=False)["input_ids"]


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_incremental_text_is_the_full_decode(tokenizer, data) -> None:
    pool = emoji_and_accents(tokenizer) + list(range(0, 300)) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    ids = data.draw(st.lists(st.sampled_from(pool) | st.integers(0, len(tokenizer) - 1), min_size=1, max_size=24))
    request = Request(prompt_ids=[1])
    for i, token in enumerate(ids):
        request.output_ids.append(token)
        detokenize(tokenizer, request, final=i == len(ids) - 1)
        full = tokenizer.decode(request.output_ids, skip_special_tokens=True)
        assert full.startswith(request.text)
        assert i == len(ids) - 1 or not request.text.endswith("\ufffd")  # never streams half a character
    assert request.text == tokenizer.decode(ids, skip_special_tokens=True)
