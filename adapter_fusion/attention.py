"""Attention for decode steps (one query position per row), registered with transformers as
the model's attention implementation; every other call is transformers' own SDPA, unchanged.

transformers' SDPA path, given a padding mask (a continuous batch always has one), first repeats
every cached key and value per query head (`repeat_kv`: a copy of the whole cache per layer and
step, O(L)), and on the CPU its bfloat16 kernel is slow at one query position. Measured here (16
rows, 9 query heads on 3 key/value heads, one thread): float32 L = 512 5.9 ms -> 1.5 ms per layer,
bfloat16 L = 64 1.6 ms -> 0.2 ms, L = 512 14 ms -> 0.9 ms.

A decode step instead views each row's query heads as (kv_heads, group, dim): the `group` query
heads that share a key/value head become that head's `group` query rows, so attention reads the
cache in place, no copy. float32 runs SDPA on that view (the same kernel transformers calls, so the
same numbers to rounding); other dtypes run two matmuls with the softmax in float32 (scores,
probabilities and their mix each rounded once to the dtype).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

NAME = "adapter_fusion_decode"


def decode_attention(
    module: nn.Module,
    query: Tensor,  # (batch, heads, q, dim)
    key: Tensor,  # (batch, kv_heads, L, dim)
    value: Tensor,  # (batch, kv_heads, L, dim)
    attention_mask: Tensor | None,  # (batch, 1, q, L) bool or additive, or None
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:  # (batch, q, heads, dim)
    batch, heads, q_length, dim = query.shape
    kv_heads = key.shape[1]
    plain = kwargs.get("softcap") is None and kwargs.get("s_aux") is None and kwargs.get("position_bias") is None
    if q_length != 1 or dropout or not plain or heads % kv_heads or value.shape[-1] != dim or kwargs.get("output_attentions"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scale = dim**-0.5 if scaling is None else scaling
    q = query.reshape(batch, kv_heads, heads // kv_heads, dim)  # (batch, kv_heads, group, dim): head h = kv·group + g
    if query.dtype == torch.float32:
        out = nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, scale=scale)
    else:
        # keys times queries, not queries times transposed keys: the cache view is then read row by
        # row (a transposed operand made bfloat16's matmul copy it first: 8x slower at L = 512)
        scores = torch.matmul(key, q.transpose(-1, -2)).float().mul_(scale)  # (batch, kv_heads, L, group)
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            scores.masked_fill_(~attention_mask.transpose(-1, -2), float("-inf"))
        elif attention_mask is not None:
            scores += attention_mask.transpose(-1, -2)
        probs = scores.softmax(-2).to(value.dtype).transpose(-1, -2)  # (batch, kv_heads, group, L)
        out = torch.matmul(probs, value)  # (batch, kv_heads, group, dim)
    return out.reshape(batch, 1, heads, dim), None


ALL_ATTENTION_FUNCTIONS.register(NAME, decode_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # prefill and scoring get SDPA's masks, as before


def use_decode_attention(model: nn.Module) -> bool:
    """Switch a model that runs transformers' SDPA to `decode_attention`; False (left as it is)
    for one on another implementation (eager, T5's own attention, ...)."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa" or not model._can_set_attn_implementation():
        return False
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME
