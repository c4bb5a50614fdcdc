"""Loading folds scales exactly as PEFT does; every refusal names the file and the reason;
saved adapters load in PEFT and give the same logits as ours."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import IA3Config, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save, save_file
from transformers import AutoModelForCausalLM

from adapter_fusion import adapter_save
from adapter_fusion import load_adapter, merge, save_adapter
from adapter_fusion.errors import (
    AdapterFormatError,
    IncompatibleAdaptersError,
    OutputExistsError,
    UnsupportedAdapterError,
)
from adapter_fusion.models import tiny_llama
from tests.conftest import write_peft_adapter
from tests.numerics import EPS32, logits_bound, merge_rounding, relative


def assert_matches_peft(adapter_dir: Path, base: Path) -> None:
    """Our ΔW of every module equals PEFT's get_delta_weight to fp32 rounding, element by element.

    PEFT rounds B@A (r products: γ_r·M, γ_r ≈ r·u) and then ·s (u·M); we fold √s into each factor
    at load (√s to fp32 and the product: 4u·M for the product of the two) before the same product.
    Together within (2r + 5)·u·M <= (r + 3)·eps32·M, where M = s·|B|@|A| and u = eps32/2.
    """
    ours = load_adapter(adapter_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir)
    modules = model.base_model.model.named_modules()
    layers = {path: m for path, m in modules if isinstance(m, LoraLayer) and "default" in m.lora_A}
    assert set(ours.modules) == set(layers)
    for path, layer in layers.items():
        A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        M = layer.scaling["default"] * (B.abs() @ A.abs())
        got = ours.modules[path].dense()
        if ours.fan_in_fan_out:  # PEFT's delta is laid out like the weight, (in, out)
            got, M = got.T, M.T
        assert ((got - layer.get_delta_weight("default").detach()).abs() <= (A.shape[0] + 3) * EPS32 * M).all(), path


def test_scale_folding_matches_peft(tiny_base: Path, tmp_path: Path) -> None:
    patterns = write_peft_adapter(
        tiny_base,
        tmp_path / "patterns",
        seed=5,
        r=4,
        alpha=8,
        rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
        alpha_pattern={"v_proj": 3, "down_proj": 12},
    )
    assert_matches_peft(patterns, tiny_base)
    ours = load_adapter(patterns)
    assert ours.ranks["model.layers.0.self_attn.q_proj"] == 2
    assert ours.ranks["model.layers.1.mlp.down_proj"] == 6
    assert_matches_peft(write_peft_adapter(tiny_base, tmp_path / "rs", seed=6, r=8, alpha=4, use_rslora=True), tiny_base)


def test_fan_in_fan_out_adapters_load(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(base)
    adapter = write_peft_adapter(base, tmp_path / "g", seed=1, targets=["c_attn"], fan_in_fan_out=True)
    assert load_adapter(adapter).fan_in_fan_out
    assert_matches_peft(adapter, base)  # PEFT's ΔW is stored (in, out): ours, transposed


def test_save_round_trips_through_peft_logits(tiny_base: Path, tiny_adapters: list[Path], tmp_path: Path) -> None:
    sources = [load_adapter(p) for p in tiny_adapters]
    merged = merge(sources, "svd", [0.5, 0.5, 0.5, 0.5], rank=5).adapter
    out = save_adapter(merged, tmp_path / "merged")
    assert_logits_equal(tiny_base, out, merged)
    reloaded = load_adapter(out)
    for path, delta in merged.modules.items():  # saved with alpha = rank: scale 1 folds in as ×1.0, exactly
        assert torch.equal(reloaded.modules[path].B, delta.B) and torch.equal(reloaded.modules[path].A, delta.A), path
    assert json.loads((out / "adapter_fusion.json").read_text())["recipe"]["method"] == "svd"


def assert_logits_equal(base: Path, adapter_dir: Path, adapter) -> None:
    """PEFT's logits with the saved dir equal the base logits plus our ΔW applied by hand, to what
    fp32 rounding of W + ΔW and of the two forward passes allows (tests/test_bake.py derives it)."""
    ids = torch.arange(1, 17).view(2, 8) % 200
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(model, adapter_dir).eval()(ids).logits
    ours_model = AutoModelForCausalLM.from_pretrained(base).eval()
    rho = 0.0
    with torch.no_grad():
        for path, delta in adapter.modules.items():
            weight = ours_model.get_submodule(path).weight
            bound = merge_rounding(weight, delta.B.abs() @ delta.A.abs(), delta.rank)
            weight += delta.dense()
            rho = max(rho, float(torch.linalg.norm(bound) / torch.linalg.norm(weight)))
        ours = ours_model(ids).logits
    assert relative(theirs, ours) < logits_bound(ours_model.config, rho)


def test_save_keeps_low_precision_when_asked(tiny_adapters: list[Path], tmp_path: Path) -> None:
    adapter = load_adapter(tiny_adapters[0])
    out = save_adapter(adapter, tmp_path / "bf16", dtype="bfloat16")
    assert {t.dtype for t in load_file(out / "adapter_model.safetensors").values()} == {torch.bfloat16}
    assert {t.dtype for t in load_file(save_adapter(adapter, tmp_path / "fp32") / "adapter_model.safetensors").values()} == {torch.float32}


def test_save_refuses_overwrite_unless_asked(tiny_adapters: list[Path], tmp_path: Path) -> None:
    adapter = load_adapter(tiny_adapters[0])
    out = save_adapter(adapter, tmp_path / "x")
    with pytest.raises(OutputExistsError, match="already exists"):
        save_adapter(adapter, out)
    save_adapter(adapter, out, overwrite=True)


def test_a_save_cut_off_half_way_leaves_no_trace(tiny_adapters: list[Path], tmp_path: Path, monkeypatch) -> None:
    """The disk fills half-way through the weights file, after the config is written: nothing
    appears under the new name, no temp dir is left, and an output being replaced stays whole."""
    old = save_adapter(load_adapter(tiny_adapters[1]), tmp_path / "old")
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    cut: list[tuple[Path, list[str]]] = []  # (the half-written file, what its directory held then)

    def full_disk(tensors: dict[str, torch.Tensor], filename: str | Path, metadata: dict | None = None) -> None:
        data = save(tensors, metadata=metadata)
        Path(filename).write_bytes(data[: len(data) // 2])
        cut.append((Path(filename), sorted(p.name for p in Path(filename).parent.iterdir())))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(adapter_save, "save_file", full_disk)  # fault injection at the write itself
    adapter = load_adapter(tiny_adapters[0])
    for target, overwrite in ((tmp_path / "new", False), (old, True)):
        with pytest.raises(OSError, match="No space left"):
            save_adapter(adapter, target, overwrite=overwrite)
    assert len(cut) == 2 and all("adapter_config.json" in held for _, held in cut)  # cut off mid-write
    assert not any(file.parent.exists() for file, _ in cut)  # their temp dirs are gone
    assert [p.name for p in tmp_path.iterdir()] == ["old"]  # no "new", no temp dir, no moved-aside copy
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    original = load_adapter(tiny_adapters[1]).modules
    for path, delta in load_adapter(old).modules.items():  # still loads, as what it was
        assert torch.equal(delta.B, original[path].B) and torch.equal(delta.A, original[path].A), path


# ---- refusals ---------------------------------------------------------------------------------


@pytest.fixture
def copy_of(tiny_adapters: list[Path], tmp_path: Path):
    def make(index: int = 0) -> Path:
        return Path(shutil.copytree(tiny_adapters[index], tmp_path / f"copy{index}"))

    return make


def edit_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_refuses_pickle_unless_allowed(copy_of) -> None:
    d = copy_of()
    tensors = load_file(d / "adapter_model.safetensors")
    (d / "adapter_model.safetensors").unlink()
    torch.save(tensors, d / "adapter_model.bin")
    with pytest.raises(AdapterFormatError, match=r"adapter_model.bin: pickle weights refused.*allow_pickle=True"):
        load_adapter(d)
    assert len(load_adapter(d, allow_pickle=True).modules) == len(load_adapter(copy_of(1)).modules)


def test_refuses_dora_and_other_unsupported_features(copy_of) -> None:
    d = copy_of()
    edit_config(d, use_dora=True, modules_to_save=["lm_head"])
    with pytest.raises(UnsupportedAdapterError, match=r"adapter_config.json: unsupported: DoRA .*; fully trained modules"):
        load_adapter(d)


def test_refuses_non_lora_peft_types(tiny_base: Path, tmp_path: Path) -> None:
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]))
    model.save_pretrained(tmp_path / "ia3")
    with pytest.raises(UnsupportedAdapterError, match="peft_type 'IA3' \\(only LORA adapters compose\\)"):
        load_adapter(tmp_path / "ia3")


def test_refuses_shapes_that_disagree_with_config(copy_of) -> None:
    d = copy_of()
    edit_config(d, r=8)
    with pytest.raises(AdapterFormatError, match="disagree with rank 8 in adapter_config.json"):
        load_adapter(d)


def test_refuses_non_finite_values(copy_of) -> None:
    d = copy_of()
    tensors = load_file(d / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, d / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError, match="holds NaN or infinite values"):
        load_adapter(d)


def test_refuses_missing_and_truncated_files(copy_of, tmp_path: Path) -> None:
    with pytest.raises(AdapterFormatError, match="not a directory"):
        load_adapter(tmp_path / "nowhere")
    d = copy_of()
    weights = d / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(AdapterFormatError, match="adapter_model.safetensors: unreadable or truncated"):
        load_adapter(d)
    weights.unlink()
    with pytest.raises(AdapterFormatError, match="no adapter_model.safetensors found"):
        load_adapter(d)
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFormatError, match="adapter_config.json: not valid JSON"):
        load_adapter(d)
    (d / "adapter_config.json").unlink()
    with pytest.raises(AdapterFormatError, match="adapter_config.json: missing"):
        load_adapter(d)


def test_refuses_a_missing_factor(copy_of) -> None:
    d = copy_of()
    tensors = load_file(d / "adapter_model.safetensors")
    del tensors[next(k for k in tensors if "lora_B" in k)]
    save_file(tensors, d / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError, match="has no lora_B weight"):
        load_adapter(d)


def test_refuses_sources_for_different_bases(tiny_adapters: list[Path], copy_of, tmp_path: Path) -> None:
    d = copy_of()
    edit_config(d, base_model_name_or_path="some/other-model")
    with pytest.raises(IncompatibleAdaptersError, match="different base models"):
        merge([load_adapter(tiny_adapters[1]), load_adapter(d)], "linear")
    wider = tiny_llama(tmp_path / "wider", hidden=96)
    other = write_peft_adapter(wider, tmp_path / "w", seed=1)
    edit_config(other, base_model_name_or_path=load_adapter(tiny_adapters[0]).base_model)
    with pytest.raises(IncompatibleAdaptersError, match=r"module 'model.layers.0.mlp.down_proj' is 64x128 in a but 96x192 in w"):
        merge([load_adapter(tiny_adapters[0]), load_adapter(other)], "linear")


def test_different_ranks_and_targets_compose(tiny_adapters: list[Path]) -> None:
    subset = load_adapter(tiny_adapters[3])  # q_proj and v_proj only
    full = load_adapter(tiny_adapters[2])  # rank 8, all targets
    result = merge([subset, full], "linear")
    assert set(result.adapter.modules) == set(full.modules)
    path = "model.layers.0.mlp.up_proj"  # absent from `subset`: its delta is zero there
    got, expected = result.adapter.modules[path], full.modules[path]
    # Re-factored exactly (float64) and rounded back to fp32 factors (u each), then each side's
    # product of r terms (γ_r ≈ r·u): within (r + 2)·u of |B|@|A| of either factorization.
    r = max(got.rank, expected.rank)
    bound = (r + 2) * EPS32 / 2 * (got.B.abs() @ got.A.abs() + expected.B.abs() @ expected.A.abs())
    assert ((got.dense() - expected.dense()).abs() <= bound).all()


def test_merged_adapter_round_trips_on_smollm2(smollm2: Path, tmp_path: Path) -> None:
    first = write_peft_adapter(smollm2, tmp_path / "s1", seed=11, r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    second = write_peft_adapter(smollm2, tmp_path / "s2", seed=12, r=8, alpha=8, targets=["q_proj", "o_proj"])
    merged = merge([load_adapter(first), load_adapter(second)], "ties", [0.7, 0.5], {"density": 0.3}, rank=8).adapter
    out = save_adapter(merged, tmp_path / "merged")
    assert_logits_equal(smollm2, out, merged)
