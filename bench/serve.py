"""Serving throughput on SmolLM2 with 8 distinct rank-8 adapters, side by side in one run:

  (a) ours: the adapter-fusion gRPC server, N concurrent clients over loopback (mixed batches);
  (b) a naive gRPC server that serves requests one by one with peft `set_adapter` + `generate`;
  (c) peft's mixed-batch `generate(adapter_names=...)` on the same N requests (no server).

Greedy, fixed prompts, up to --tokens new tokens each. Prints tokens/s, p50/p99 time to first
token, and the ratios; then LoadAdapter latency and inline compose latency (linear, svd of 4).

    python bench/serve.py [--clients 16] [--tokens 32]
"""

from __future__ import annotations

import argparse
import queue
import statistics
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

from adapter_fusion.client import Client, make_recipe
from adapter_fusion.engine import Limits
from adapter_fusion.models import DEMO_ADAPTERS, default_base
from adapter_fusion.v1 import adapter_fusion_pb2 as pb
from adapter_fusion.v1 import adapter_fusion_pb2_grpc as pb_grpc
from server.app import BackgroundServer, ServerConfig


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def make_adapters(base: Path, root: Path, n: int) -> list[Path]:
    """The demo adapters, topped up with random rank-8 ones (q, v) written by peft to reach n."""
    from peft import LoraConfig, get_peft_model

    dirs = sorted(p for p in DEMO_ADAPTERS.glob("*") if (p / "adapter_config.json").is_file())[:n]
    for i in range(n - len(dirs)):
        torch.manual_seed(100 + i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        out = root / f"random{i}"
        model.save_pretrained(out)
        dirs.append(out)
    return dirs


TOPICS = "rivers stones clouds music paper lights tables windows gardens silver forests dreams water markets winter summer".split()


def workload(n: int, names: list[str]) -> list[tuple[str, str]]:
    """Prompts that ask for long answers, so every request generates its full token budget."""
    return [(f"Write a long story about {TOPICS[i % len(TOPICS)]}.", names[i % len(names)]) for i in range(n)]


# ---- (b) the naive server ---------------------------------------------------------------------


class _QueueStreamer(BaseStreamer):
    def __init__(self, out: queue.Queue, prompt_len: int) -> None:
        self.out, self.skip = out, True

    def put(self, value: torch.Tensor) -> None:
        if self.skip:  # the first call carries the prompt
            self.skip = False
            return
        self.out.put([int(t) for t in value.reshape(-1)])

    def end(self) -> None:
        self.out.put(None)


class NaiveServicer(pb_grpc.AdapterFusionServicer):
    """One request at a time: set_adapter, generate (batch 1), stream tokens as they come."""

    def __init__(self, model: PeftModel, tokenizer) -> None:
        self.model, self.tokenizer, self.lock = model, tokenizer, threading.Lock()

    def Generate(self, request: pb.GenerateRequest, context):
        ids = self.tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in request.messages.messages], add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        out: queue.Queue = queue.Queue()
        with self.lock:
            self.model.set_adapter(request.adapter)
            worker = threading.Thread(target=lambda: self.model.generate(ids, max_new_tokens=request.max_new_tokens, do_sample=False, streamer=_QueueStreamer(out, ids.shape[1])))
            worker.start()
            while (tokens := out.get()) is not None:
                yield pb.GenerateResponse(token_ids=tokens)
            worker.join()


def drive(address: str, jobs: list[tuple[str, str]], tokens: int) -> tuple[float, int, list[float]]:
    """Send all jobs at once from one thread each; (seconds, tokens generated, TTFTs)."""
    ttfts: list[float] = [0.0] * len(jobs)
    counts = [0] * len(jobs)
    with Client(address) as client:
        barrier = threading.Barrier(len(jobs) + 1)

        def run(i: int) -> None:
            message, adapter = jobs[i]
            barrier.wait()
            start = time.perf_counter()
            for response in client.generate(messages=[{"role": "user", "content": message}], adapter=adapter, max_new_tokens=tokens):
                if counts[i] == 0 and response.token_ids:
                    ttfts[i] = time.perf_counter() - start
                counts[i] += len(response.token_ids)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        return time.perf_counter() - start, sum(counts), ttfts


def peft_mixed_batch(model: PeftModel, tokenizer, jobs: list[tuple[str, str]], tokens: int) -> tuple[float, int]:
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True, tokenize=False) for m, _ in jobs]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=tokens, do_sample=False, adapter_names=[a for _, a in jobs], pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - start
    new = out[:, batch["input_ids"].shape[1] :]
    eos = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    generated = sum(next((i + 1 for i, t in enumerate(row.tolist()) if t in eos), len(row)) for row in new)
    return seconds, generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    args = parser.parse_args()
    base = default_base()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs = make_adapters(base, root, args.adapters)
        names = [d.name for d in dirs]
        jobs = workload(args.clients, names)
        print(f"SmolLM2-135M, {len(dirs)} rank-8 adapters, {args.clients} concurrent requests x <= {args.tokens} tokens, greedy, {torch.get_num_threads()} threads")

        # (a) ours
        config = ServerConfig(base_dir=base, store_dir=root / "store", adapter_roots=[DEMO_ADAPTERS, root], preload=dirs, port=0, limits=Limits(max_batch=64))
        ours = BackgroundServer(config)
        drive(ours.address, jobs[:2], 4)  # warm up
        seconds, count, ttft = drive(ours.address, jobs, args.tokens)
        ours_rate = count / seconds
        print(f"(a) ours        {ours_rate:7.1f} tok/s  TTFT p50 {percentile(ttft, .5):.2f} s p99 {percentile(ttft, .99):.2f} s  ({count} tokens in {seconds:.1f} s)", flush=True)

        # (b) naive server and (c) peft mixed batch share one PeftModel with all adapters
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), dirs[0], adapter_name=names[0]).eval()
        for d in dirs[1:]:
            model.load_adapter(d, adapter_name=d.name)
        naive = grpc.server(futures.ThreadPoolExecutor(max_workers=args.clients + 2))
        pb_grpc.add_AdapterFusionServicer_to_server(NaiveServicer(model, tokenizer), naive)
        port = naive.add_insecure_port("127.0.0.1:0")
        naive.start()
        seconds, count, ttft_naive = drive(f"127.0.0.1:{port}", jobs, args.tokens)
        naive_rate = count / seconds
        naive.stop(0)
        print(f"(b) naive       {naive_rate:7.1f} tok/s  TTFT p50 {percentile(ttft_naive, .5):.2f} s p99 {percentile(ttft_naive, .99):.2f} s  ({count} tokens in {seconds:.1f} s)", flush=True)
        seconds, count = peft_mixed_batch(model, tokenizer, jobs, args.tokens)
        peft_rate = count / seconds
        print(f"(c) peft mixed  {peft_rate:7.1f} tok/s  (one generate call, {count} tokens in {seconds:.1f} s)", flush=True)
        print(f"ours / naive = {ours_rate / naive_rate:.1f}x, ours / peft mixed batch = {ours_rate / peft_rate:.2f}x")

        with Client(ours.address) as client:
            loads = []
            for i in range(20):
                start = time.perf_counter()
                client.load_adapter(f"hot{i}", dirs[i % len(dirs)])
                loads.append(time.perf_counter() - start)
                client.unload_adapter(f"hot{i}")
            print(f"LoadAdapter        p50 {1000 * percentile(loads, .5):6.1f} ms  p99 {1000 * percentile(loads, .99):6.1f} ms")
            four = names[:4]
            probe = [("Say hi.", "hi")]
            scoring = []
            for _ in range(10):
                start = time.perf_counter()
                client.score(probe, adapter=four[0])
                scoring.append(time.perf_counter() - start)
            for method, rank in (("linear", None), ("svd", 8)):
                times = []
                for i in range(20):
                    recipe = make_recipe(method, {n: 0.25 + 0.01 * i for n in four}, rank=rank)  # new weights: a new composition
                    start = time.perf_counter()
                    client.score(probe, recipe=recipe)
                    times.append(time.perf_counter() - start - statistics.median(scoring))
                print(f"inline {method:6} of 4 p50 {1000 * percentile(times, .5):6.1f} ms  p99 {1000 * percentile(times, .99):6.1f} ms  (a Score with an inline recipe, minus a plain Score's median)")
        ours.stop()


if __name__ == "__main__":
    main()
