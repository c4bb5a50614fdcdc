"""Incremental detokenization gives the text a full decode gives: at every step a prefix of it
(never a broken UTF-8 sequence), and all of it when the output ends."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from adapter_fusion.decoding import Request, detokenize
from adapter_fusion.stop_strings import StopMatcher


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


def reference_stop(text: str, stops: list[str]) -> int | None:
    """Where the first stop to complete starts (the earliest end; the longest one ending there)."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if s and text[max(0, end - len(s)) : end] == s and end >= len(s)]
        if starts:
            return min(starts)
    return None


@settings(max_examples=400, deadline=None)
@given(
    stops=st.lists(st.text("abc", min_size=0, max_size=4), min_size=1, max_size=5),
    pieces=st.lists(st.text("abc", max_size=3), max_size=8),
)
def test_stops_matched_incrementally_as_a_full_scan_finds_them(stops: list[str], pieces: list[str]) -> None:
    """Fed piece by piece, the matcher finds the stop a scan of the whole text finds, and holds back
    exactly the longest suffix that may still become one."""
    matcher, text, hit = StopMatcher(stops), "", None
    for piece in pieces:
        text += piece
        hit = matcher.feed(piece)
        if hit is not None:
            break
    assert hit == reference_stop(text, stops)
    if hit is None:
        assert matcher.pending == max((k for s in stops for k in range(len(s)) if k <= len(text) and text.endswith(s[:k])), default=0)


def test_a_step_costs_the_same_however_many_stops() -> None:
    """Feeding text walks the automaton about once per character, however many stops it holds
    (the old scan read the whole text once per stop, every step: 5,000 stops cost 5,000x)."""
    text = "the river runs past the stones " * 40

    def seconds(n: int) -> float:
        matcher = StopMatcher([f"\u2603{i:05d}" for i in range(n)] + ["stones!"])
        start = time.perf_counter()
        for i in range(0, len(text), 4):  # four characters a step, as tokens arrive
            assert matcher.feed(text[i : i + 4]) is None
        return time.perf_counter() - start

    one, many = min(seconds(1) for _ in range(5)), min(seconds(5000) for _ in range(5))
    assert many < 3 * one, f"5,000 stops made feeding {many / one:.1f}x slower than one"
