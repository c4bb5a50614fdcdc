"""Bake: the written model loads in plain transformers and equals PEFT's merge_and_unload."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from adapter_fusion import load_adapter, merge
from adapter_fusion.bake import INDEX_NAME, MANIFEST_NAME, BakeError, bake
from adapter_fusion.errors import IncompatibleAdaptersError, OutputExistsError
from adapter_fusion.models import tiny_llama
from tests.conftest import write_peft_adapter
from tests.numerics import logits_bound, merge_rounding, relative

IDS = torch.arange(3, 27).view(2, 12)
def safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS % model.config.vocab_size).logits


def assert_equals_peft(base: Path, adapter_dir: Path, baked: Path) -> None:
    """The baked model equals PEFT's merge_and_unload(): every tensor to fp32 rounding (untouched
    ones bit for bit), and the logits to what that rounding can move them by."""
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter_dir)
    merged = peft.merge_and_unload()
    theirs = merged.state_dict()
    ours, originals = safetensors_dir(baked), safetensors_dir(base)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    factors = load_file(adapter_dir / "adapter_model.safetensors")
    rho = 0.0
    for name, tensor in ours.items():
        key = f"base_model.model.{name.removesuffix('.weight')}.lora_A.weight"
        if key not in factors:
            assert torch.equal(tensor, theirs[name]), name
            continue
        A, B = factors[key], factors[key.replace(".lora_A.", ".lora_B.")]
        r = A.shape[0]
        M = config["lora_alpha"] / (r**0.5 if config.get("use_rslora") else r) * (B.abs() @ A.abs())
        bound = merge_rounding(originals[name], M.T if config.get("fan_in_fan_out") else M, r)
        assert ((tensor - theirs[name]).abs() <= bound).all(), name
        rho = max(rho, float(torch.linalg.norm(bound) / torch.linalg.norm(theirs[name])))
    assert rho > 0  # the adapter's modules were found among the baked tensors
    baked_model = AutoModelForCausalLM.from_pretrained(baked, dtype=torch.float32)
    assert relative(logits(baked_model), logits(merged)) < logits_bound(merged.config, rho)


@pytest.fixture(scope="module")
def sharded_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("sharded") / "base", layers=3, max_shard_size="40KB")


def test_bake_equals_peft_merge_and_unload_on_sharded_model(sharded_base: Path, tmp_path: Path) -> None:
    assert (sharded_base / INDEX_NAME).is_file()
    adapter_dir = write_peft_adapter(sharded_base, tmp_path / "a", seed=3, r=4, alpha=8)
    progress: list[tuple[int, int]] = []
    manifest = bake(sharded_base, load_adapter(adapter_dir), tmp_path / "baked", max_shard_size="30KB", on_progress=lambda d, t: progress.append((d, t)))
    out = tmp_path / "baked"
    assert_equals_peft(sharded_base, adapter_dir, out)
    index = json.loads((out / INDEX_NAME).read_text())
    assert len(manifest.shards) > 3 and set(index["weight_map"].values()) == set(manifest.shards)
    for file, info in manifest.shards.items():
        assert hashlib.sha256((out / file).read_bytes()).hexdigest() == info["sha256"]
        if info["tensors"] > 1:  # a tensor larger than the cap (the embeddings) gets a shard of its own
            assert info["bytes"] <= 30_000 + 2_000  # the cap, plus the header
    assert progress[-1][0] == progress[-1][1] == manifest.total_bytes
    assert manifest.merged_modules == 3 * 7
    assert json.loads((out / MANIFEST_NAME).read_text())["merged_modules"] == 21
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()


def test_bake_of_a_composed_adapter_in_bf16(tiny_base: Path, tiny_adapters: list[Path], tmp_path: Path) -> None:
    merged = merge([load_adapter(p) for p in tiny_adapters[:2]], "svd", [0.5, 0.5], rank=4, name="ab")
    manifest = bake(tiny_base, merged.adapter, tmp_path / "bf16", dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert model.dtype == torch.bfloat16
    assert manifest.recipe["method"] == "svd" and list(manifest.shards) == ["model.safetensors"]
    full = bake(tiny_base, merged.adapter, tmp_path / "fp32")
    assert full.dtype == "as stored"
    low, high = load_file(tmp_path / "bf16" / "model.safetensors"), load_file(tmp_path / "fp32" / "model.safetensors")
    assert low.keys() == high.keys()
    for name, tensor in high.items():  # ΔW added in float32, then cast: exactly the fp32 result rounded
        assert tensor.dtype == torch.float32 and torch.equal(low[name], tensor.to(torch.bfloat16)), name


def test_bake_on_smollm2_equals_peft(smollm2: Path, tmp_path: Path) -> None:
    # peft's own random B (b_scale=1): |ΔW| is 10-60% of |W| (the tiny models' deltas dwarf theirs)
    adapter_dir = write_peft_adapter(smollm2, tmp_path / "s", seed=21, r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], b_scale=1.0)
    bake(smollm2, load_adapter(adapter_dir), tmp_path / "baked", max_shard_size="200MB")
    assert len(list((tmp_path / "baked").glob("model-*.safetensors"))) == 3
    assert_equals_peft(smollm2, adapter_dir, tmp_path / "baked")


def test_fan_in_fan_out_layers_are_transposed(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(base)
    adapter_dir = write_peft_adapter(base, tmp_path / "g", seed=1, targets=["c_attn", "c_proj"], fan_in_fan_out=True)
    bake(base, load_adapter(adapter_dir), tmp_path / "baked")
    assert_equals_peft(base, adapter_dir, tmp_path / "baked")


def test_interrupted_bake_leaves_nothing(tiny_base: Path, tiny_adapters: list[Path], tmp_path: Path) -> None:
    def fail_half_way(done: int, total: int) -> None:
        if done > total // 2:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        bake(tiny_base, load_adapter(tiny_adapters[0]), tmp_path / "out", on_progress=fail_half_way)
    assert list(tmp_path.iterdir()) == []  # no output, no temp dir


def test_overwrite_is_refused_unless_asked(tiny_base: Path, tiny_adapters: list[Path], tmp_path: Path) -> None:
    adapter = load_adapter(tiny_adapters[0])
    bake(tiny_base, adapter, tmp_path / "out")
    with pytest.raises(OutputExistsError, match="already exists"):
        bake(tiny_base, adapter, tmp_path / "out")
    bake(tiny_base, adapter, tmp_path / "out", overwrite=True)


def test_bad_inputs(tiny_base: Path, tiny_adapters: list[Path], tmp_path: Path) -> None:
    wider = tiny_llama(tmp_path / "wider", hidden=96)
    adapter = load_adapter(tiny_adapters[0])
    with pytest.raises(IncompatibleAdaptersError, match="is 64x128 but the base weight model.layers.0.mlp.down_proj.weight is 96x192"):
        bake(wider, adapter, tmp_path / "x")
    adapter.modules["model.layers.7.self_attn.q_proj"] = adapter.modules["model.layers.0.self_attn.q_proj"]
    with pytest.raises(IncompatibleAdaptersError, match="targets 'model.layers.7.self_attn.q_proj', which the base model does not have"):
        bake(tiny_base, adapter, tmp_path / "x")
    with pytest.raises(BakeError, match="no config.json"):
        bake(tmp_path, adapter, tmp_path / "x")
    (tmp_path / "nosafetensors").mkdir()
    (tmp_path / "nosafetensors" / "config.json").write_text("{}")
    with pytest.raises(BakeError, match="bake reads safetensors weights only"):
        bake(tmp_path / "nosafetensors", adapter, tmp_path / "x")
    with pytest.raises(ValueError, match="dtype must be one of"):
        bake(tiny_base, load_adapter(tiny_adapters[0]), tmp_path / "x", dtype="int8")
    with pytest.raises(ValueError, match="cannot read a size"):
        bake(tiny_base, load_adapter(tiny_adapters[0]), tmp_path / "x", max_shard_size="lots")
    assert not (tmp_path / "x").exists()


def test_bake_command(tiny_base: Path, tiny_adapters: list[Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from adapter_fusion.cli import app

    runner = CliRunner()
    out = tmp_path / "baked"
    result = runner.invoke(app, ["bake", "--base", str(tiny_base), "--adapter", str(tiny_adapters[0]), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "baked 14 modules" in result.output and (out / "model.safetensors").is_file()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: svd\nsources:\n  - {{adapter: {tiny_adapters[0]}}}\n  - {{adapter: {tiny_adapters[1]}}}\nrank: 4\n")
    result = runner.invoke(app, ["bake", "--base", str(tiny_base), "--recipe", str(recipe), "--output", str(tmp_path / "r"), "--dtype", "float16"])
    assert result.exit_code == 0, result.output
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "r").dtype == torch.float16
    both = runner.invoke(app, ["bake", "--adapter", "x", "--recipe", "y", "--output", str(tmp_path / "z")])
    assert both.exit_code == 2 and "exactly one of --adapter or --recipe" in both.output
    again = runner.invoke(app, ["bake", "--base", str(tiny_base), "--adapter", str(tiny_adapters[0]), "--output", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output


def test_tied_lm_head_target_is_written_untied(tiny_base: Path, tmp_path: Path) -> None:
    from adapter_fusion import Adapter, LowRankDelta

    g = torch.Generator().manual_seed(0)
    delta = LowRankDelta(torch.randn(256, 2, generator=g), torch.randn(2, 64, generator=g))  # lm_head is (vocab, hidden)
    bake(tiny_base, Adapter(name="head", modules={"lm_head": delta}), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    baked = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    torch.testing.assert_close(baked.get_input_embeddings().weight, base.get_input_embeddings().weight)  # embeddings untouched
    torch.testing.assert_close(baked.lm_head.weight, base.lm_head.weight + delta.dense())
