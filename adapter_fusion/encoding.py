"""The base model's tokenizer as every engine and fit uses it: chat prompts by the model's
template, raw text, and targets as fits learn them (with the token that ends the assistant's
turn). Engines differ in how they run the model, never in what tokens a request means."""

from __future__ import annotations

import threading
from pathlib import Path

from jinja2 import TemplateError
from transformers import AutoConfig, AutoTokenizer


class Encoder:
    def __init__(self, base_dir: str | Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        config = AutoConfig.from_pretrained(base_dir)
        self.is_seq2seq = bool(config.is_encoder_decoder)
        self.max_positions: int | None = getattr(config, "max_position_embeddings", None)
        eos = {self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids("<|im_end|>")}
        self.stop_ids = {i for i in eos if isinstance(i, int) and i >= 0}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # a fast tokenizer's encode may reset its padding/truncation state: one encoding thread at a time
        self._encoding = threading.Lock()
        self.end_of_turn = self._end_of_turn()

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

    def uses_chat(self, chat: bool) -> bool:
        """Whether an example's input is a chat user message: asked for, a causal model, and a
        template to write it with (otherwise the input is raw text)."""
        return chat and not self.is_seq2seq and bool(self.tokenizer.chat_template)

    def example_ids(self, prompt: str, target: str, chat: bool) -> tuple[list[int], list[int]]:
        """An (input, target) example as every fit (learned, LoraHub, regmean, fisher) learns it:
        the input as a chat user message (`uses_chat`) or raw text, the target by `answer_ids`."""
        use_chat = self.uses_chat(chat)
        return (self.chat_ids(prompt) if use_chat else self.text_ids(prompt)), self.answer_ids(target, use_chat)

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
