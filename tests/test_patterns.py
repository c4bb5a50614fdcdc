"""PEFT's module patterns matched as data: the literal forms agree with Python's `re` exactly
(property test), every form gives PEFT's own answer (`get_pattern_key`,
`check_target_module_exists`), and the bounds refuse before or during the work, naming the key."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

from adapter_fusion import load_adapter
from adapter_fusion.errors import AdapterFormatError
from adapter_fusion.patterns import PatternBounds, PatternError, literal, resolve
from tests.test_adapters import copy_of, edit_config  # noqa: F401 (copy_of: a fixture)

# keys drawn from pieces that stay literal (`\.` and `.` included) plus the anchors PEFT users write
PIECES = st.sampled_from(["a", "b", "_", "1", ".", "\\.", "\\-", "-", "proj"])
KEYS = st.builds(lambda hat, body, dollar: hat + "".join(body) + dollar, st.sampled_from(["", "^"]), st.lists(PIECES, max_size=6), st.sampled_from(["", "$"]))
NAMES = st.text(alphabet="ab_1.-\n", max_size=10)

MODULES = [f"model.layers.{i}.{part}" for i in range(12) for part in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
SUFFIX_KEYS = [
    "q_proj",  # a plain name
    "layers.1.mlp.down_proj",  # a dotted suffix (its dots match any character, as in PEFT)
    re.escape("model.layers.10.self_attn.v_proj"),  # what save_adapter writes
    "^model.layers.2.self_attn.q_proj",  # PEFT's docs example form
    "model.layers.3.mlp.down_proj$",
    r"layers\.(4|5)\..*_proj",  # a genuine regex: runs in the bounded child
    ".*\\.1[01]\\.self_attn\\..*",
]
TARGETS: list[str | list[str]] = [
    ".*self_attn.*(q|v)_proj",  # regex string (PEFT's docs form)
    r"model\.layers\.3\.mlp\.down_proj",  # an escaped literal string
    ["q_proj", "mlp.down_proj"],  # list: exact or dotted suffix
    "all-linear",
]


@settings(max_examples=400, deadline=None)
@given(key=KEYS, name=NAMES)
def test_literal_forms_agree_with_re(key: str, name: str) -> None:
    form = literal(key)
    assert form is not None, key
    assert form.suffix(name) == bool(re.match(rf"(.*\.)?({key})$", name)), (key, name)
    assert form.full(name) == bool(re.fullmatch(key, name)), (key, name)


def test_regex_operators_are_not_taken_as_literals() -> None:
    for key in ("(.+)+!", "q|v", "a*", r"\d", "x{2}", "[ab]", "a\\", "a\\\\$"):
        assert literal(key) is None, key


def test_every_form_gives_peft_s_answer() -> None:
    found = resolve(MODULES, SUFFIX_KEYS, SUFFIX_KEYS[::-1], None)
    for module in MODULES:
        for keys, ours in ((SUFFIX_KEYS, found.rank_key), (SUFFIX_KEYS[::-1], found.alpha_key)):
            theirs = get_pattern_key(keys, module)
            assert ours[module] == (theirs if theirs in keys else None), module
    for targets in TARGETS:
        found = resolve(MODULES, [], [], targets)
        if targets == "all-linear":  # PEFT expands it to every linear layer before matching
            assert all(found.targeted.values())
            continue
        config = LoraConfig(target_modules=targets)
        assert found.targeted == {m: bool(check_target_module_exists(config, m)) for m in MODULES}, targets


def test_a_key_equal_to_a_module_path_applies_even_when_it_does_not_match_itself() -> None:
    """PEFT falls back to the path itself as a key: "a+b" is a regex that misses "a+b"."""
    assert resolve(["x.a+b"], ["a+b", "x.a+b"], [], None).rank_key == {"x.a+b": "x.a+b"}
    assert get_pattern_key(["a+b", "x.a+b"], "x.a+b") == "x.a+b"


def test_a_backtracking_regex_is_refused_within_the_bound_naming_it() -> None:
    start = time.monotonic()
    with pytest.raises(PatternError, match=r"alpha_pattern key '\(\.\+\)\+!': .* took longer than 0.5 s"):
        resolve(MODULES, ["q_proj"], ["(.+)+!"], None, PatternBounds(regex_time_s=0.5))
    assert time.monotonic() - start < 1.5


def test_sizes_are_refused_before_any_matching() -> None:
    with pytest.raises(PatternError, match="rank_pattern key 'xxx.*is 300 characters; the limit is 256"):
        resolve(MODULES, ["x" * 300], [], None)
    with pytest.raises(PatternError, match="hold 5 keys; the limit is 4"):
        resolve(MODULES, ["a", "b"], ["c"], ["d", "e"], PatternBounds(max_keys=4))
    with pytest.raises(PatternError, match=r"target_modules key '\(' is not a valid regular expression"):
        resolve(MODULES, [], [], "(")


def test_load_refuses_weights_that_target_modules_does_not_select(copy_of) -> None:
    adapter = copy_of()
    edit_config(adapter, target_modules=["q_proj"])  # PEFT would make no layer for v_proj and drop it
    with pytest.raises(AdapterFormatError, match=r"adapter_config.json: module '.*' has LoRA weights but target_modules does not select it"):
        load_adapter(adapter)
    edit_config(adapter, target_modules=".*")
    assert load_adapter(adapter).modules
    edit_config(adapter, target_modules=42)
    with pytest.raises(AdapterFormatError, match="target_modules must be a regex string or a list of module names"):
        load_adapter(adapter)


def test_load_names_the_backtracking_key(copy_of) -> None:
    adapter: Path = copy_of()
    edit_config(adapter, rank_pattern={"(.+)+!": 2})
    with pytest.raises(AdapterFormatError, match=r"adapter_config.json: rank_pattern key '\(\.\+\)\+!': matching it"):
        load_adapter(adapter)
