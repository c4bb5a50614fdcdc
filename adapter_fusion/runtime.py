"""One base model with resident adapter slots, used synchronously by evaluation, LoraHub and
the serving engine's thread: scoring here, step-wise decoding in `adapter_fusion.decoding`."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from jinja2 import TemplateError
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from adapter_fusion.adapters import Adapter
from adapter_fusion.attention import use_decode_attention
from adapter_fusion.errors import IncompatibleAdaptersError
from adapter_fusion.lora_layers import inject, route, scale_columns
from adapter_fusion.models import resolve_device, resolve_dtype
from adapter_fusion.packed_linear import pack_head
from adapter_fusion.slots import Route, SlotBank, routes_of


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
        # never trained: gradients (learned coefficients) reach only the column scales
        self.model = model_class.from_pretrained(self.base_dir, dtype=self.dtype).to(self.device).eval().requires_grad_(False)
        self.layers = inject(self.model, None if targets is None else list(targets))
        for layer in self.layers.values():
            layer.pack()
        pack_head(self.model)
        use_decode_attention(self.model)
        self.slots = SlotBank(self.layers, self.device, self.dtype, slot_columns)
        self.shapes = {path: layer.shape for path, layer in self.layers.items()}
        eos = {self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids("<|im_end|>")}
        self.stop_ids = {i for i in eos if isinstance(i, int) and i >= 0}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # a fast tokenizer's encode may reset its padding/truncation state: one encoding thread at a time
        self._encoding = threading.Lock()
        self.end_of_turn = self._end_of_turn()

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

    def answer_ids(self, text: str, chat: bool) -> list[int]:
        """A target as a fit learns it: in a chat, followed by the token that ends the assistant's
        turn, so the fit learns where an answer stops as well as how it starts (a seq2seq target
        carries its end-of-sequence mark already)."""
        ids = self.text_ids(text)
        return ids + [self.end_of_turn] if chat and self.end_of_turn is not None else ids

    def _end_of_turn(self) -> int | None:
        """The stop token the chat template closes an assistant's message with (None: seq2seq, no
        chat template, or no stop token after the message)."""
        if self.is_seq2seq or not self.tokenizer.chat_template:
            return None
        marker = "ANSWER"
        turn = [{"role": "user", "content": "question"}, {"role": "assistant", "content": marker}]
        try:
            text = self.tokenizer.apply_chat_template(turn, tokenize=False)
        except (TemplateError, ValueError):  # a template that refuses this turn: fits learn the answer alone
            return None
        after = self.tokenizer(text[text.rindex(marker) + len(marker) :], add_special_tokens=False)["input_ids"]
        return next((i for i in after if i in self.stop_ids), None)

    def scaled(self, scales: dict[str, Tensor]) -> AbstractContextManager[None]:
        """Within the block, each listed layer scales its routed columns (`lora_layers.scale_columns`)."""
        return scale_columns(self.layers, scales)

    def routed(self, rows: Sequence[Route], source_weights: Tensor | None = None) -> AbstractContextManager[None]:
        """Within the block, row b uses rows[b]: a slot, or a mix of slots; `source_weights`
        (batch, n_sources) weighs each row's slot's sources."""
        return route(self.layers, self.slots.routing(routes_of(rows, source_weights)))

    def target_nll(
        self,
        prompts: Sequence[list[int]],
        targets: Sequence[list[int]],
        rows: Sequence[Route],
        source_weights: Tensor | None = None,
        differentiable: bool = False,
    ) -> Tensor:
        """Per example, the summed negative log-likelihood of `targets` after `prompts`: (batch,),
        float32 on the CPU whatever the model's device and dtype.

        For a seq2seq model the prompt is the encoder input and the target the decoder's labels.
        `differentiable`: computed outside inference mode, so gradients reach the column scales
        (`lora_layers.scale_columns`)."""
        with torch.inference_mode(not differentiable):
            return self._target_nll(prompts, targets, rows, source_weights)

    def _target_nll(self, prompts, targets, rows, source_weights) -> Tensor:
        if self.is_seq2seq:
            return self._seq2seq_nll(prompts, targets, rows, source_weights)
        seqs = [p + t for p, t in zip(prompts, targets)]
        width = max(map(len, seqs))
        ids, mask = padded(seqs, width, self.pad_id)
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
        ids, mask = padded(prompts, max(map(len, prompts)), self.pad_id)
        labels = padded(targets, max(map(len, targets)), -100)[0].to(self.device)
        decoder_ids = self.model.prepare_decoder_input_ids_from_labels(labels=labels)  # no labels in: no unused loss
        with self.routed(rows, source_weights):
            out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), decoder_input_ids=decoder_ids, use_cache=False)
        return _summed_nll(out.logits, labels)

    @torch.no_grad()
    def greedy(self, prompts: Sequence[list[int]], rows: Sequence[Route], max_new_tokens: int) -> list[list[int]]:
        """Batched greedy completion (stops at end-of-turn); a convenience over `Decoder`."""
        from adapter_fusion.decoding import Decoder, Request  # decoding builds on this module

        decoder = Decoder(self)
        requests = [Request(prompt_ids=list(p), route=s, max_new_tokens=max_new_tokens) for p, s in zip(prompts, rows)]
        decoder.admit(requests)
        while decoder.active:
            decoder.step()
        return [r.output_ids for r in requests]


def _summed_nll(logits: Tensor, labels: Tensor) -> Tensor:  # logits (batch, P, vocab), labels (batch, P) -> (batch,)
    """Summed cross-entropy of each row's labels, positions labelled -100 skipped; float32, CPU."""
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="none")
    return nll.view(labels.shape).sum(dim=1).cpu()


def padded(seqs: Sequence[list[int]], width: int, pad: int, left: bool = False) -> tuple[Tensor, Tensor]:
    """Rows padded to `width` (on the left: every row ends at the last column): ids and 0/1 mask,
    (batch, width) on the CPU, moved to the device whole rather than row by row."""
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, seq in enumerate(seqs):
        at = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[b, at], mask[b, at] = torch.tensor(seq, dtype=torch.long), 1
    return ids, mask
