"""What a request's text costs and means: every byte and token limit checked (bytes before
tokenising, tokens after, examples), prompts and examples turned into token ids by the served
model's one `Encoder`."""

from __future__ import annotations

from adapter_fusion.errors import InvalidRequestError, LimitExceededError
from adapter_fusion.v1 import adapter_fusion_pb2 as pb

ROLES = ("system", "user", "assistant")


class Inputs:
    def __init__(self, model, limits) -> None:
        self.model = model  # adapter_fusion.server.served.ServedModel: its encoder and request limits
        self.limits = limits  # adapter_fusion.server.served.ServiceLimits

    def text(self, text: str, what: str) -> str:
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > self.limits.max_text_bytes:
            raise LimitExceededError(f"{what} is {size} bytes; the limit is {self.limits.max_text_bytes} (before tokenising)")
        return text

    @staticmethod
    def capped(ids: list[int], what: str, limit: int) -> list[int]:
        if not ids:
            raise InvalidRequestError(f"{what} is empty after tokenising")
        if len(ids) > limit:
            raise LimitExceededError(f"{what} has {len(ids)} tokens; the limit is {limit}")
        return ids

    def prompt_ids(self, request: pb.GenerateRequest) -> list[int]:
        encoder, limit = self.model.encoder, self.model.limits.max_prompt_tokens
        which = request.WhichOneof("input")
        if which == "prompt" and request.prompt.strip():
            return self.capped(encoder.text_ids(self.text(request.prompt, "the prompt")), "the prompt", limit)
        if which == "messages" and request.messages.messages:
            messages = [{"role": m.role or "user", "content": self.text(m.content, "a message")} for m in request.messages.messages]
            if any(m["role"] not in ROLES for m in messages):
                raise InvalidRequestError("message roles must be system, user or assistant")
            self.text("".join(m["content"] for m in messages), "the messages together")
            return self.capped(encoder.chat_ids(messages), "the prompt", limit)
        raise InvalidRequestError("the prompt is empty: set `prompt` or `messages`")

    def example_ids(self, examples, raw: bool, where: str = "", fit: bool = False) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids of each example's input and target, every limit checked; `where` names the
        set in errors (a recipe has several). For a `fit`, examples are as fits learn them
        (`Encoder.example_ids`); Score reads targets as given."""
        at = f"{where}: " if where else ""
        if not examples:
            raise InvalidRequestError(f"{at}at least one example is needed")
        if len(examples) > self.limits.max_examples:
            raise LimitExceededError(f"{at}{len(examples)} examples; the limit is {self.limits.max_examples}")
        encoder, limits = self.model.encoder, self.model.limits
        prompts, targets = [], []
        for i, ex in enumerate(examples):
            if not ex.input.strip() or not ex.target:
                raise InvalidRequestError(f"{at}example {i} needs a non-empty input and target")
            text, target = self.text(ex.input, f"{at}example {i}'s input"), self.text(ex.target, f"{at}example {i}'s target")
            if fit:  # the same tokens a fit of the library learns (`Encoder.example_ids`)
                prompt_ids, target_ids = encoder.example_ids(text, target, not raw)
            else:
                prompt_ids, target_ids = encoder.text_ids(text) if raw else encoder.chat_ids(text), encoder.text_ids(target)
            prompts.append(self.capped(prompt_ids, f"{at}example {i}'s input", limits.max_prompt_tokens))
            targets.append(self.capped(target_ids, f"{at}example {i}'s target", limits.max_target_tokens))
        return prompts, targets
