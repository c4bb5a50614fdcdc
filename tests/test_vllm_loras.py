"""`LoraTable` (the vLLM engine's LoRA dirs and ids), without vLLM: a LoRA dir is removed only
when no request can still be handed it, and a slot's LoRA written again never reuses the name of
one being removed."""

from __future__ import annotations

from pathlib import Path

from adapter_fusion import load_adapter
from adapter_fusion.engines.vllm_loras import LoraTable
from adapter_fusion.entries import AdapterInfo, Entry
from adapter_fusion.models import DEMO_ADAPTERS


def entry_of(name: str) -> Entry:
    adapter = load_adapter(DEMO_ADAPTERS / name)
    return Entry(AdapterInfo.of(adapter, str(DEMO_ADAPTERS / name), False), [adapter])


def test_a_stale_freed_notice_leaves_a_lora_in_use_alone(tmp_path: Path) -> None:
    """The registry frees no slot a request holds: a freed notice for a slot whose LoRA is in use
    came before that entry took the slot again (read by the engine thread late)."""
    table = LoraTable(tmp_path, max_rank=16, max_mixes=4)
    entry = entry_of("uppercase")
    lora = table.single(3, entry)
    table.slot_freed(3)
    assert lora.path.is_dir() and table.take_removed() == []
    assert table.single(3, entry) is lora  # still the slot's LoRA
    table.release(lora)
    table.release(lora)
    table.slot_freed(3)
    assert not lora.path.exists() and table.take_removed() == [3]


def test_a_slot_written_again_gets_a_dir_of_its_own(tmp_path: Path) -> None:
    table = LoraTable(tmp_path, max_rank=16, max_mixes=4)
    entry = entry_of("uppercase")
    first = table.single(3, entry)
    table.release(first)
    table.slot_freed(3)  # removed from vLLM and from the disk
    again = table.single(3, entry)  # the same entry in the same slot again
    assert again.path != first.path and again.path.is_dir() and not first.path.exists()
    other = table.single(3, entry_of("kv_json"))  # the slot went to another entry
    assert other.path.is_dir() and not again.path.exists() and table.take_removed() == [3, 3]
