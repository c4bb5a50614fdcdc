"""Where a decode step's time goes, by kind of op: SmolLM2-135M, 16 rows, the base model and 8
rank-8 adapters mixed, float32 and bfloat16, one torch.profiler pass over decode steps only (the
prefill runs before the profiler starts). Prints ms per step and each kind's share, so a claim
about which op stands between us and a peer comes from a run, not from memory.

    python bench/decode_profile.py [--steps 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from adapter_fusion import load_adapter
from adapter_fusion.decoding import Decoder, Request
from adapter_fusion.models import default_base
from adapter_fusion.runtime import Runtime
from serve import TOPICS, make_adapters

KINDS = {  # aten / oneDNN op -> what it does in a decode step
    "mkldnn::_linear_pointwise": "base projections and head (oneDNN, packed)",
    "aten::mm": "adapter factors: x·Aᵀ",
    "aten::addmm_": "adapter factors: += h·B",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::bmm": "attention",
    "aten::_softmax": "attention",
    "aten::argmax": "choosing the token",
}
ELEMENTWISE = {"aten::mul", "aten::add", "aten::add_", "aten::copy_", "aten::silu", "aten::pow", "aten::mean", "aten::rsqrt", "aten::cat", "aten::neg", "aten::sum", "aten::index_copy_", "aten::masked_fill_", "aten::cos", "aten::sin", "aten::div", "aten::fill_", "aten::index"}


def profile(runtime: Runtime, prompts: list[list[int]], rows: list, steps: int) -> tuple[float, dict[str, float]]:
    """(ms per decode step, ms per step by kind)."""
    decoder = Decoder(runtime)
    decoder.admit([Request(prompt_ids=p, route=r, max_new_tokens=steps + 2) for p, r in zip(prompts, rows)])
    decoder.step()  # warm
    with torch.profiler.profile() as prof:
        for _ in range(steps):
            decoder.step()
    kinds: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        kind = KINDS.get(event.key) or ("elementwise (norms, rotary, residuals, activations, cache writes)" if event.key in ELEMENTWISE else "other")
        kinds[kind] += event.self_cpu_time_total / 1e3 / steps
    return sum(kinds.values()), dict(kinds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = default_base()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_adapters(base, Path(tmp), 8)
        for dtype in ("float32", "bfloat16"):
            runtime = Runtime(base, dtype=dtype)
            runtime.set_slots([[load_adapter(d)] for d in dirs])
            prompts = [runtime.chat_ids(f"Write a long story about {t}.") for t in TOPICS]
            for k in (0, 8):
                total, kinds = profile(runtime, prompts, [1 + i % k if k else 0 for i in range(len(prompts))], args.steps)
                print(f"{dtype}, {'8 adapters mixed' if k else 'base model'}: {total:.1f} ms per decode step (profiled, {args.threads} threads)")
                for kind, ms in sorted(kinds.items(), key=lambda item: -item[1]):
                    print(f"    {ms:6.1f} ms  {100 * ms / total:4.0f}%  {kind}")


if __name__ == "__main__":
    main()
