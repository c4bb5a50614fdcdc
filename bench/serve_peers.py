"""The peers `bench/serve.py` measures ours against, and the client that drives a gRPC server:
transformers `generate` on the whole batch (the limit), a naive gRPC server that serves requests
one by one with peft `set_adapter` + `generate`, and peft's mixed-batch `generate(adapter_names=...)`."""

from __future__ import annotations

import queue
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from adapter_fusion.client import Client
from adapter_fusion.v1 import adapter_fusion_pb2 as pb
from adapter_fusion.v1 import adapter_fusion_pb2_grpc as pb_grpc


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


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


def left_padded(tokenizer, jobs: list[tuple[str, str | None]]) -> dict:
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True, tokenize=False) for m, _ in jobs]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def generated(out: torch.Tensor, prompt_width: int, tokenizer) -> int:
    """Tokens written per row up to and including its end-of-turn."""
    eos = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    return sum(next((i + 1 for i, t in enumerate(row.tolist()) if t in eos), len(row)) for row in out[:, prompt_width:])


def peft_mixed_batch(model: PeftModel, tokenizer, jobs: list[tuple[str, str]], tokens: int) -> tuple[float, int]:
    batch = left_padded(tokenizer, jobs)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=tokens, do_sample=False, adapter_names=[a for _, a in jobs], pad_token_id=tokenizer.pad_token_id)
    return time.perf_counter() - start, generated(out, batch["input_ids"].shape[1], tokenizer)


def base_generate(model, tokenizer, jobs: list[tuple[str, str]], tokens: int) -> tuple[float, int]:
    """(d) the limit: the plain base model, the whole batch in one transformers `generate`."""
    batch = left_padded(tokenizer, jobs)
    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(**batch, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return time.perf_counter() - start, generated(out, batch["input_ids"].shape[1], tokenizer)


def naive_and_peft(base: Path, dirs: list[Path], tokenizer, jobs: list[tuple[str, str]], tokens: int) -> tuple[float, float]:
    """(b) the naive server and (c) peft's mixed batch, sharing one PeftModel with all adapters;
    prints their lines and returns their tok/s."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), dirs[0], adapter_name=dirs[0].name).eval()
    for d in dirs[1:]:
        model.load_adapter(d, adapter_name=d.name)
    naive = grpc.server(futures.ThreadPoolExecutor(max_workers=len(jobs) + 2))
    pb_grpc.add_AdapterFusionServicer_to_server(NaiveServicer(model, tokenizer), naive)
    port = naive.add_insecure_port("127.0.0.1:0")
    naive.start()
    seconds, count, ttft = drive(f"127.0.0.1:{port}", jobs, tokens)
    naive_rate = count / seconds
    naive.stop(0)
    print(f"(b) naive       {naive_rate:7.1f} tok/s  TTFT p50 {percentile(ttft, .5):.2f} s p99 {percentile(ttft, .99):.2f} s  ({count} tokens in {seconds:.1f} s)", flush=True)
    seconds, count = peft_mixed_batch(model, tokenizer, jobs, tokens)
    print(f"(c) peft mixed  {count / seconds:7.1f} tok/s  (one generate call, {count} tokens in {seconds:.1f} s)", flush=True)
    return naive_rate, count / seconds
