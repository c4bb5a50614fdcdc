"""Bake: ours vs PEFT (load + merge_and_unload + save_pretrained), wall time and peak RSS.

    python bench/bake_speed.py [--size-gb 2.5] [--skip-synthetic] [--skip-smollm2]

Each path runs in its own subprocess, on the same base and adapter, same shard cap, and reports its
own peak RSS: VmHWM from /proc/self/status, the high-water mark of the address space that exec
gave it. Not ru_maxrss: Linux carries that across fork+exec, so a child of this parent (which may
have just built a 2.75 GB synthetic model) would report the parent's peak instead of its own.
The synthetic base is a random Llama-shaped model written once as several shards under
bench/work/ (it is not committed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

WORK = Path(__file__).parent / "work"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def synthetic_base(size_gb: float) -> Path:
    """A random LlamaForCausalLM of about `size_gb` GB (float32) in 500 MB shards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, vocab = 2048, 5504, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter
    layers = max(1, round((size_gb * 1e9 / 4 - vocab * hidden) / per_layer))
    path = WORK / f"llama-{layers}x{hidden}"
    if (path / "model.safetensors.index.json").is_file():
        return path
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(path, max_shard_size="500MB")
    return path


def random_adapter(base: Path, out: Path, rank: int = 16) -> Path:
    """Rank-16 LoRA on every target of every layer, written in PEFT format."""
    from adapter_fusion import Adapter, LowRankDelta, save_adapter

    if (out / "adapter_config.json").is_file():
        return out
    config = json.loads((base / "config.json").read_text())
    h, i, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * config.get("head_dim", h // config["num_attention_heads"])
    shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h), "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    g = torch.Generator().manual_seed(0)
    modules = {}
    for layer in range(n):
        for name, (o, d) in shapes.items():
            part = "self_attn" if name in TARGETS[:4] else "mlp"
            modules[f"model.layers.{layer}.{part}.{name}"] = LowRankDelta(torch.randn(o, rank, generator=g) * 0.01, torch.randn(rank, d, generator=g) * 0.01)
    save_adapter(Adapter(name="random", modules=modules, base_model=str(base)), out, overwrite=True)
    return out


def run_ours(base: str, adapter: str, out: str, shard: str) -> None:
    from adapter_fusion import load_adapter
    from adapter_fusion.bake import bake

    bake(base, load_adapter(adapter), out, max_shard_size=shard, overwrite=True)


def run_peft(base: str, adapter: str, out: str, shard: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    model.merge_and_unload().save_pretrained(out, max_shard_size=shard)


def peak_rss_mb() -> float:
    """This process's own peak resident memory (VmHWM, reset by exec, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory is measured on Linux only")


def measure(path: str, base: Path, adapter: Path, shard: str) -> dict:
    out = WORK / f"out-{path}"
    cmd = [sys.executable, __file__, "--child", path, str(base), str(adapter), str(out), shard]
    result = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare(label: str, base: Path, adapter: Path, shard: str) -> None:
    peft, ours = measure("peft", base, adapter, shard), measure("ours", base, adapter, shard)
    size = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
    print(
        f"{label:28} {size:6.2f} GB | peft {peft['seconds']:6.1f} s {peft['peak_rss_mb']:7.0f} MB | "
        f"ours {ours['seconds']:6.1f} s {ours['peak_rss_mb']:7.0f} MB | "
        f"time x{peft['seconds'] / ours['seconds']:.2f} faster, RSS {100 * ours['peak_rss_mb'] / peft['peak_rss_mb']:.0f}% of peft's",
        flush=True,
    )


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        path, base, adapter, out, shard = sys.argv[2:7]
        start = time.perf_counter()
        (run_ours if path == "ours" else run_peft)(base, adapter, out, shard)
        seconds = time.perf_counter() - start
        print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb()}))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.5)
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--skip-smollm2", action="store_true")
    args = parser.parse_args()
    WORK.mkdir(exist_ok=True)
    if not args.skip_smollm2:
        from adapter_fusion.models import default_base

        base = default_base()
        compare("SmolLM2-135M (rank 16, all)", base, random_adapter(base, WORK / "adapter-smollm2"), "200MB")
    if not args.skip_synthetic:
        base = synthetic_base(args.size_gb)
        compare(f"synthetic {base.name}", base, random_adapter(base, WORK / f"adapter-{base.name}"), "500MB")


if __name__ == "__main__":
    main()
