"""One base model with resident adapter slots, used synchronously by evaluation, LoraHub and
the serving engine's thread: scoring here, step-wise decoding in `adapter_fusion.decoding`."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch import Tensor

from adapter_fusion.adapters import Adapter
from adapter_fusion.attention import use_decode_attention
from adapter_fusion.base_model import load_base
from adapter_fusion.lora_layers import inject, route, scale_columns, share_inputs
from adapter_fusion.nll import IGNORED, summed_nll
from adapter_fusion.packed_linear import pack_head
from adapter_fusion.slots import Route, SlotBank, routes_of
from adapter_fusion.targets import check_targets


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
        loaded = load_base(self.base_dir, device, dtype)  # never trained: gradients (learned coefficients) reach only the column scales
        self.model, self.encoder, self.device, self.dtype = loaded.model, loaded.encoder, loaded.device, loaded.dtype
        self.tokenizer, self.is_seq2seq = self.encoder.tokenizer, self.encoder.is_seq2seq
        self.chat_ids, self.text_ids, self.answer_ids = self.encoder.chat_ids, self.encoder.text_ids, self.encoder.answer_ids
        self.layers = inject(self.model, None if targets is None else list(targets))
        share_inputs(self.layers)  # q/k/v and gate/up packed together; every other projection alone
        for layer in self.layers.values():
            if layer.packed is None:
                layer.pack()
        pack_head(self.model)
        use_decode_attention(self.model)
        self.slots = SlotBank(self.layers, self.device, self.dtype, slot_columns)
        self.shapes = {path: layer.shape for path, layer in self.layers.items()}
        self.stop_ids, self.pad_id, self.end_of_turn = self.encoder.stop_ids, self.encoder.pad_id, self.encoder.end_of_turn

    def check(self, adapter: Adapter) -> None:
        """Refuse an adapter whose modules this model lacks or whose shapes differ."""
        check_targets(adapter, self.shapes)

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
        labels = torch.full((len(seqs), width), IGNORED)
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
        return summed_nll(out.logits, labels.to(self.device)).cpu()

    def _seq2seq_nll(self, prompts, targets, rows, source_weights) -> Tensor:
        ids, mask = padded(prompts, max(map(len, prompts)), self.pad_id)
        labels = padded(targets, max(map(len, targets)), IGNORED)[0].to(self.device)
        decoder_ids = self.model.prepare_decoder_input_ids_from_labels(labels=labels)  # no labels in: no unused loss
        with self.routed(rows, source_weights):
            out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), decoder_input_ids=decoder_ids, use_cache=False)
        return summed_nll(out.logits, labels).cpu()


def padded(seqs: Sequence[list[int]], width: int, pad: int, left: bool = False) -> tuple[Tensor, Tensor]:
    """Rows padded to `width` (on the left: every row ends at the last column): ids and 0/1 mask,
    (batch, width) on the CPU, moved to the device whole rather than row by row."""
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, seq in enumerate(seqs):
        at = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[b, at], mask[b, at] = torch.tensor(seq, dtype=torch.long), 1
    return ids, mask
