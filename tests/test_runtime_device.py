"""Device and dtype: bfloat16 decoding keeps float32's greedy tokens wherever rounding cannot
flip them, the mixed-adapter kernel in bfloat16 stays within its rounding bound, bad placements
are refused. The same comparisons run on CUDA where there is a GPU.

The tolerances come from a rounding model, not from runs (see `bfloat16_logit_bound`)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from adapter_fusion import load_adapter, lora_layers
from adapter_fusion.cli import app
from adapter_fusion.errors import InvalidRequestError
from adapter_fusion.adapters import Adapter
from adapter_fusion.lora_layers import MultiLoraLinear, route
from adapter_fusion.slots import SlotBank, routes_of
from adapter_fusion.runtime import Runtime
from adapter_fusion.decoding import greedy
from tests.conftest import write_peft_adapter

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}
# Roundings of stored results on the path through one Llama-style block: two norms (to dtype,
# weight, product: 3 each), rotary (4), attention scores, probabilities and mix (3), activation
# and gate product (2), two residual adds, four projections' weights and outputs (8) and their
# LoRA branches (A, A·x, B, B·A·x, the sum: 20). GPT-2's block (no rotary, a longer GELU) is
# within two of it.
BLOCK_ROUNDINGS = 45
HEAD_ROUNDINGS = 6  # embedding, final norm (3), head weight and output


def bfloat16_logit_bound(h: Tensor, head: Tensor, config, seq: int, rank: int) -> Tensor:
    """A bound on |Δz| for every logit z = h·W_v between a bfloat16 and a float32 forward pass
    (h (positions, d), head W (vocab, d) -> (positions, vocab)).

    Rounding model (Higham & Mary, SIAM J. Sci. Comput. 2019): every rounding is an independent
    relative error of random sign within ±u (variance u²/3), so errors add like a random walk.
    The bfloat16 pass rounds each stored result once (BLOCK_ROUNDINGS per block, HEAD_ROUNDINGS);
    both passes accumulate each length-n dot product in float32 (CPU and cuBLAS do for bfloat16),
    n roundings of 2^-24 each; the float32 pass's stored results round 2^16 times finer, left
    out. A pre-norm block passes the residual
    stream's error on without amplifying it (true of near-linear blocks: small weights, adapters
    at peft's scale), so over L blocks the counts add and h carries a relative rms error √(k/3)·u.
    That error has no preferred direction: against a head row it gives ||Δh||·||W_v||/√d, and
    the largest of V such errors is √(2 ln V) times their rms."""
    d = config.hidden_size
    m = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d
    # dot-product lengths on a block's path: q/k/v, o, up/gate (d) and down (m), the same again
    # for the LoRA A factors, each LoRA B (rank), attention scores (head dim) and mix (seq)
    lengths = 2 * (3 * d + m) + 4 * rank + d // config.num_attention_heads + seq
    stored = config.num_hidden_layers * BLOCK_ROUNDINGS + HEAD_ROUNDINGS
    accumulated = 2 * config.num_hidden_layers * lengths  # in both passes
    variance = (stored * UNIT_ROUNDOFF[torch.bfloat16] ** 2 + accumulated * UNIT_ROUNDOFF[torch.float32] ** 2) / 3
    rms = math.sqrt(variance) * h.norm(dim=-1, keepdim=True) * head.norm(dim=-1) / math.sqrt(d)  # (positions, vocab)
    return math.sqrt(2 * math.log(head.shape[0])) * rms


@torch.no_grad()
def head_io(model: torch.nn.Module, ids: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """One float32 forward of `ids`: the output head's input h (seq, d), weight W (vocab, d) and
    logits (seq, vocab)."""
    head = model.get_output_embeddings()
    seen = {}
    handle = head.register_forward_hook(lambda module, args, out: seen.update(h=args[0], z=out))
    try:
        model(input_ids=torch.tensor([ids], device=head.weight.device))
    finally:
        handle.remove()
    return seen["h"][0].float().cpu(), head.weight.float().cpu(), seen["z"][0].float().cpu()


LogitBound = Callable[[Tensor, Tensor, Tensor, int], Tensor]  # (h, head W, logits z, seq) -> |Δz| bound like z


def decided_steps(model: torch.nn.Module, prompt: list[int], tokens: list[int], bound: LogitBound) -> int:
    """How many leading steps of `tokens` (greedy from `prompt` by float32 `model`) have a top-2
    logit gap wider than the two logits' error bounds: up to there, greedy tokens must agree."""
    h, head, z = head_io(model, prompt + tokens)
    steps = slice(len(prompt) - 1, len(prompt) - 1 + len(tokens))  # the positions predicting `tokens`
    top = z[steps].topk(2, dim=-1)
    error = bound(h[steps], head, z[steps], len(prompt) + len(tokens))  # (steps, vocab)
    closable = (top.values[:, 0] - top.values[:, 1] <= error.gather(1, top.indices).sum(-1)).tolist()
    decided = closable.index(True) if True in closable else len(tokens)
    assert top.indices[:decided, 0].tolist() == tokens[:decided], "the reference's greedy tokens are its own argmax"
    return decided


@pytest.fixture(scope="module")
def adapter_dirs(tiny_chat_base: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Adapters at peft's own random scale (b_scale 1, deltas a few times the tiny weights): they
    change the model's tokens yet keep its blocks near-linear, as `bfloat16_logit_bound` assumes.
    Scaled ×50 (deltas ~200× the weights) they sharpen attention until it amplifies rounding
    errors past that bound; the kernel test covers such deltas."""
    root = tmp_path_factory.mktemp("device-adapters")
    return [write_peft_adapter(tiny_chat_base, root / name, seed=seed, r=r, b_scale=1.0) for name, seed, r in (("a", 1, 4), ("b", 2, 8))]


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_decoder_keeps_float32_greedy_tokens_where_rounding_cannot_flip_them(
    device: str, tiny_chat_base: Path, adapter_dirs: list[Path]
) -> None:
    adapters = [load_adapter(d) for d in adapter_dirs]
    reference = Runtime(tiny_chat_base, device="cpu", dtype="float32")
    half = Runtime(tiny_chat_base, device=device, dtype="bfloat16")
    for runtime in (reference, half):
        runtime.set_slots([[a] for a in adapters])
    assert half.layers["model.layers.0.self_attn.q_proj"].A.dtype == torch.bfloat16
    assert half.layers["model.layers.0.self_attn.q_proj"].A.device.type == device
    prompts = [reference.chat_ids(m) for m in ("Name three rivers.", "Count to five.", "Spell 'cat' backwards.")]
    rows = [1, 0, 2]  # a mixed batch: adapter, base model, adapter
    expected, got = greedy(reference, prompts, rows, 12), greedy(half, prompts, rows, 12)
    rank = max(d.rank for a in adapters for d in a.modules.values())

    def bound(h: Tensor, head: Tensor, z: Tensor, seq: int) -> Tensor:
        return bfloat16_logit_bound(h, head, reference.model.config, seq, rank)

    checked = 0
    for prompt, row, want, have in zip(prompts, rows, expected, got):
        with reference.routed([row]):
            decided = decided_steps(reference.model, prompt, want, bound)
        assert have[:decided] == want[:decided], f"row {row}: bfloat16 {have} vs float32 {want}, equal required up to {decided}"
        checked += decided
    assert checked > 0, "no step has a margin rounding cannot close: the test would check nothing"
    nll = half.target_nll(prompts, [want or [0] for want in expected], rows)
    assert nll.dtype == torch.float32 and nll.device.type == "cpu"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("grouped_slots", "tokens"), [(4, 5), (4, 1), (0, 1)], ids=["prefill", "slot-by-slot", "dense"])
def test_bfloat16_kernel_stays_within_its_rounding_bound(
    device: str, grouped_slots: int, tokens: int, tiny_base: Path, tiny_adapters: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """|Δy| ≤ 3u(|W||x| + |b|) + 5u·|B||A||x| to first order in u = 2^-8: the base path rounds
    W, W·x and the final sum (3); the LoRA path A, A·x, B, B·A·x and the sum (5); the products
    accumulate in float32. x is bfloat16 already in both, so it is exact."""
    monkeypatch.setattr(lora_layers, "GROUPED_SLOTS", grouped_slots)
    path = "model.layers.1.mlp.down_proj"
    base = AutoModelForCausalLM.from_pretrained(tiny_base).get_submodule(path)
    base.bias = torch.nn.Parameter(torch.randn(base.out_features, generator=torch.Generator().manual_seed(0)) * 0.1)
    deltas = [load_adapter(d).modules[path] for d in tiny_adapters[1:3]]  # ranks 4 and 8
    full, half = MultiLoraLinear(base), MultiLoraLinear(copy.deepcopy(base).to(device, torch.bfloat16))
    banks = [SlotBank({path: layer}, torch.device(where), dtype) for layer, where, dtype in ((full, "cpu", torch.float32), (half, device, torch.bfloat16))]
    for bank in banks:
        for slot, delta in enumerate(deltas, start=1):
            bank.write(slot, [Adapter(f"a{slot}", {path: delta})])
    x = torch.randn(4, tokens, base.in_features, generator=torch.Generator().manual_seed(1)).bfloat16()  # (batch, seq, in)
    rows = torch.tensor([1, 0, 2, 1])
    with torch.no_grad(), route({"full": full}, banks[0].routing(routes_of(rows.tolist()))):
        want = full(x.float())
    with torch.no_grad(), route({"half": half}, banks[1].routing(routes_of(rows.tolist()))):
        got = half(x.to(device)).float().cpu()
    u = UNIT_ROUNDOFF[torch.bfloat16]
    ax = x.float().abs()
    lora = torch.stack([d.B.abs() @ d.A.abs() for d in deltas])[(rows - 1).clamp(min=0)] * (rows > 0).view(-1, 1, 1)  # (batch, out, in)
    bound = 3 * u * (ax @ base.weight.abs().T + base.bias.abs()) + 5 * u * torch.einsum("bsi,boi->bso", ax, lora)
    assert ((got - want).abs() <= bound).all()


def test_bad_placements_are_refused_up_front(tiny_chat_base: Path) -> None:
    with pytest.raises(InvalidRequestError, match="device must be cpu, cuda, cuda:N or mps, got 'tpu'"):
        Runtime(tiny_chat_base, device="tpu")
    with pytest.raises(InvalidRequestError, match="dtype must be one of float32, bfloat16, float16, got 'float64'"):
        Runtime(tiny_chat_base, dtype="float64")
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, or the first where there is none
    with pytest.raises(InvalidRequestError, match=f"device '{missing}' is not available"):
        Runtime(tiny_chat_base, device=missing)
    result = CliRunner().invoke(app, ["eval", "--task", "add", "--base", str(tiny_chat_base), "--device", missing])
    assert result.exit_code == 2 and "is not available" in result.output


def test_defaults_are_float32_on_cpu(tiny_chat_base: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("the default device here is cuda")
    runtime = Runtime(tiny_chat_base)
    assert (runtime.device.type, runtime.dtype) == ("cpu", torch.float32)
    assert next(runtime.model.parameters()).dtype == torch.float32
