"""One base model with resident adapter slots: scoring and step-wise mixed-adapter decoding.

Used synchronously by evaluation and LoraHub, and by the serving engine's thread. `Decoder` is
continuous batching on a plain transformers model: requests join at step boundaries (their
prompts are prefilled, their KV caches left-padded and concatenated to the running batch) and
leave when they finish (their rows are dropped from the cache), each row routed to its own slot.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
from transformers.cache_utils import DynamicCache

from adapter_fusion.adapters import Adapter
from adapter_fusion.errors import IncompatibleAdaptersError
from adapter_fusion.lora_layers import inject, route
from adapter_fusion.slots import Route, SlotBank, routes_of
from adapter_fusion.models import resolve_device, resolve_dtype


class Runtime:
    """A causal LM (or a seq2seq model, for scoring) loaded once on one device, every projection
    wrapped for per-row adapter slots (see `lora_layers.inject`).

    device: cpu, cuda, cuda:N or mps (None: cuda if available); dtype: float32, bfloat16 or
    float16 (None: bfloat16 on cuda, else float32). Adapters stay float32 on the CPU (merges
    compute there); slot factors are cast to the model's device and dtype when written.
    slot_columns: the slot buffers' initial rank columns per layer (they double when full)."""

    def __init__(
        self,
        base_dir: str | Path,
        targets: Sequence[str] | None = None,
        device: str | None = None,
        dtype: str | None = None,
        slot_columns: int = 64,
    ) -> None:
        self.base_dir = Path(base_dir)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_dir)
        self.is_seq2seq = bool(AutoConfig.from_pretrained(self.base_dir).is_encoder_decoder)
        model_class = AutoModelForSeq2SeqLM if self.is_seq2seq else AutoModelForCausalLM
        self.model = model_class.from_pretrained(self.base_dir, dtype=self.dtype).to(self.device).eval()
        self.layers = inject(self.model, None if targets is None else list(targets))
        self.slots = SlotBank(self.layers, self.device, self.dtype, slot_columns)
        self.shapes = {path: layer.shape for path, layer in self.layers.items()}
        eos = {self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids("<|im_end|>")}
        self.stop_ids = {i for i in eos if isinstance(i, int) and i >= 0}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # a fast tokenizer's encode may reset its padding/truncation state: one encoding thread at a time
        self._encoding = threading.Lock()

    def check(self, adapter: Adapter) -> None:
        """Refuse an adapter whose modules this model lacks or whose shapes differ."""
        for path, delta in adapter.modules.items():
            if path not in self.shapes:
                raise IncompatibleAdaptersError(f"adapter {adapter.name!r} targets {path!r}, which is not a LoRA target of this base model")
            if self.shapes[path] != delta.shape:
                raise IncompatibleAdaptersError(
                    f"adapter {adapter.name!r} module {path!r} is {delta.shape[0]}x{delta.shape[1]}, the base model's is "
                    f"{self.shapes[path][0]}x{self.shapes[path][1]}: it was made for another base model"
                )

    def write_slot(self, slot: int, sources: Sequence[Adapter]) -> None:
        """Make `slot` (>= 1) hold these sources side by side; the other slots are not touched."""
        for adapter in sources:
            self.check(adapter)
        self.slots.write(slot, sources)

    def free_slot(self, slot: int) -> None:
        self.slots.free(slot)

    def set_slots(self, slots: Sequence[Sequence[Adapter]]) -> None:
        """Only these: slot i+1 = slots[i], every other slot freed (evaluation, LoraHub, tests)."""
        self.slots.clear()
        for i, sources in enumerate(slots, start=1):
            self.write_slot(i, sources)

    def slot_bytes(self, slots: Sequence[Sequence[Adapter]]) -> int:
        """Bytes of the slot buffers with these slots resident (`slots.SlotBank.bytes_for`)."""
        return self.slots.bytes_for(slots)

    def chat_ids(self, message: str | list[dict]) -> list[int]:
        messages = [{"role": "user", "content": message}] if isinstance(message, str) else message
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        with self._encoding:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text_ids(self, text: str) -> list[int]:
        """Token ids of raw text (with the end-of-sequence marks a seq2seq model expects)."""
        with self._encoding:
            return self.tokenizer(text, add_special_tokens=self.is_seq2seq)["input_ids"]

    def routed(self, rows: Sequence[Route], source_weights: Tensor | None = None) -> AbstractContextManager[None]:
        """Within the block, row b uses rows[b]: a slot, or a mix of slots; `source_weights`
        (batch, n_sources) weighs each row's slot's sources."""
        return route(self.layers, self.slots.routing(routes_of(rows, source_weights)))

    @torch.inference_mode()
    def target_nll(
        self, prompts: Sequence[list[int]], targets: Sequence[list[int]], rows: Sequence[Route], source_weights: Tensor | None = None
    ) -> Tensor:
        """Per example, the summed negative log-likelihood of `targets` after `prompts`: (batch,),
        float32 on the CPU whatever the model's device and dtype.

        For a seq2seq model the prompt is the encoder input and the target the decoder's labels."""
        if self.is_seq2seq:
            return self._seq2seq_nll(prompts, targets, rows, source_weights)
        seqs = [p + t for p, t in zip(prompts, targets)]
        width = max(map(len, seqs))
        ids, mask = _padded(seqs, width, self.pad_id)
        labels = torch.full((len(seqs), width), -100)
        for b, (p, t) in enumerate(zip(prompts, targets)):
            labels[b, len(p) : len(p) + len(t)] = torch.tensor(t)
        # logits only where some row predicts a target token: the vocabulary projection of every
        # prompt position would cost more than the whole forward
        predicting = torch.arange(min(map(len, prompts)) - 1, width - 1)  # (P,)
        labels = labels[:, predicting + 1]  # (batch, P)
        with self.routed(rows, source_weights):
            out = self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                logits_to_keep=predicting.to(self.device),
                use_cache=False,
            )
        return _summed_nll(out.logits, labels.to(self.device))

    def _seq2seq_nll(self, prompts, targets, rows, source_weights) -> Tensor:
        ids, mask = _padded(prompts, max(map(len, prompts)), self.pad_id)
        labels = _padded(targets, max(map(len, targets)), -100)[0].to(self.device)
        decoder_ids = self.model.prepare_decoder_input_ids_from_labels(labels=labels)  # no labels in: no unused loss
        with self.routed(rows, source_weights):
            out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), decoder_input_ids=decoder_ids, use_cache=False)
        return _summed_nll(out.logits, labels)

    @torch.no_grad()
    def greedy(self, prompts: Sequence[list[int]], rows: Sequence[Route], max_new_tokens: int) -> list[list[int]]:
        """Batched greedy completion (stops at end-of-turn); a convenience over `Decoder`."""
        decoder = Decoder(self)
        requests = [Request(prompt_ids=list(p), route=s, max_new_tokens=max_new_tokens) for p, s in zip(prompts, rows)]
        decoder.admit(requests)
        while decoder.active:
            decoder.step()
        return [r.output_ids for r in requests]


@dataclass
class Request:
    """One generation: its prompt, slot, sampling settings, and what it has produced."""

    prompt_ids: list[int]
    route: Route = 0  # its slot (0: the base model), or a mix of slots
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far (stop strings trimmed)
    finish_reason: str | None = None  # "stop", "length", "cancelled"
    cancelled: bool = False
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.temperature > 0:
            self.generator = torch.Generator().manual_seed(self.seed)


def _sample(logits: Tensor, request: Request) -> int:  # logits (vocab,)
    """One token drawn at the request's temperature, top-k and top-p; on the CPU, where the
    request's generator is."""
    logits = logits.float().nan_to_num(nan=float("-inf"), posinf=float("-inf"))
    top = logits.max()
    if not torch.isfinite(top):  # nothing finite to sample from: the best the model has
        return int(logits.argmax())
    logits = (logits - top) / request.temperature  # the best token at 0: no overflow at any temperature
    if request.top_k > 0:
        kth = torch.topk(logits, min(request.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if request.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > request.top_p  # keep the smallest set reaching top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=request.generator))


def _summed_nll(logits: Tensor, labels: Tensor) -> Tensor:  # logits (batch, P, vocab), labels (batch, P) -> (batch,)
    """Summed cross-entropy of each row's labels, positions labelled -100 skipped; float32, CPU."""
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="none")
    return nll.view(labels.shape).sum(dim=1).cpu()


def _padded(seqs: Sequence[list[int]], width: int, pad: int, left: bool = False) -> tuple[Tensor, Tensor]:
    """Rows padded to `width` (on the left: every row ends at the last column): ids and 0/1 mask,
    (batch, width) on the CPU, moved to the device whole rather than row by row."""
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, seq in enumerate(seqs):
        at = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[b, at], mask[b, at] = torch.tensor(seq, dtype=torch.long), 1
    return ids, mask


def _left_pad(t: Tensor, length: int, dim: int) -> Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class Decoder:
    """A running batch: admit requests at step boundaries, `step()` emits one token per row."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.active: list[Request] = []
        self._reset()

    def _reset(self) -> None:
        device = self.runtime.device
        self.cache: list[tuple[Tensor, Tensor]] = []  # per layer (keys, values): (batch, heads, L, dim)
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)  # (batch, L), 0 on left padding
        self.logits = torch.zeros(0, 0, device=device)  # (batch, vocab): next-token logits per row

    def _forward(self, ids: Tensor, mask: Tensor, positions: Tensor, routes: list[Route], cache: list) -> tuple[Tensor, list]:
        past = DynamicCache(ddp_cache_data=cache) if cache else DynamicCache()
        with self.runtime.routed(routes):
            out = self.runtime.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past, use_cache=True, logits_to_keep=1
            )  # only the last position's logits: the vocabulary projection is ~20% of a prefill
        kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return out.logits[:, -1], kv

    @torch.no_grad()
    def admit(self, requests: Sequence[Request]) -> None:
        """Prefill new requests together and join them to the running batch."""
        if not requests:
            return
        width = max(len(r.prompt_ids) for r in requests)
        ids, mask = _padded([r.prompt_ids for r in requests], width, self.runtime.pad_id, left=True)
        ids, mask = ids.to(self.runtime.device), mask.to(self.runtime.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, kv = self._forward(ids, mask, positions, [r.route for r in requests], [])
        if self.active:
            length = max(width, self.mask.shape[1])
            kv = [
                (torch.cat([_left_pad(k0, length, 2), _left_pad(k1, length, 2)]), torch.cat([_left_pad(v0, length, 2), _left_pad(v1, length, 2)]))
                for (k0, v0), (k1, v1) in zip(self.cache, kv)
            ]
            mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(mask, length, 1)])
            logits = torch.cat([self.logits, logits])
        self.active = self.active + list(requests)
        self.cache, self.mask, self.logits = kv, mask, logits

    @torch.no_grad()
    def step(self) -> list[tuple[Request, int]]:
        """Choose one token per active row, retire finished rows, run the next forward.

        Returns (request, token) for every row this step, finished ones included."""
        emitted: list[tuple[Request, int]] = []
        keep: list[int] = []
        tokenizer = self.runtime.tokenizer
        # greedy rows' tokens: one device sync per step, not one per row
        best = self.logits.argmax(-1).tolist() if self.active else []
        for b, request in enumerate(self.active):
            if request.cancelled:
                request.finish_reason = "cancelled"
                continue
            token = best[b] if request.temperature <= 0 else _sample(self.logits[b].float().cpu(), request)
            emitted.append((request, token))
            if token in self.runtime.stop_ids:
                request.finish_reason = "stop"
                continue
            request.output_ids.append(token)
            request.text = tokenizer.decode(request.output_ids, skip_special_tokens=True)
            hit = next((s for s in request.stop if s and s in request.text), None)
            if hit is not None:
                request.text = request.text[: request.text.index(hit)]
                request.finish_reason = "stop"
            elif len(request.output_ids) >= request.max_new_tokens:
                request.finish_reason = "length"
            else:
                keep.append(b)
        if len(keep) < len(self.active):
            index = torch.tensor(keep, dtype=torch.long, device=self.runtime.device)
            self.cache = [(k[index], v[index]) for k, v in self.cache]
            self.mask = self.mask[index]
            self.active = [self.active[b] for b in keep]
        if self.active:
            ids = torch.tensor([[r.output_ids[-1]] for r in self.active], device=self.runtime.device)
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.active), 1)], dim=1)
            positions = self.mask.sum(-1, keepdim=True) - 1
            self.logits, self.cache = self._forward(ids, self.mask, positions, [r.route for r in self.active], self.cache)
        else:
            self._reset()
        return emitted
