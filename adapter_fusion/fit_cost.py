"""What a data-aware fit (learned, regmean, fisher) will hold and do, from shapes alone, so a
fit over the bounds is refused before it loads a model or runs an example.

Memory is the peak of one micro-batch: the fit's float32 copy of the base model, the activations
its forward (and backward) keeps per token, the logits of the positions it scores, one layer's
attention scores, and what regmean and fisher keep per module and source. Work is the number of
example tokens run through the model: tokens × steps for learned (every step runs every example),
the tokens of every source's examples for regmean and fisher (each source runs its own).

The per-token coefficients below are counts of the tensors a transformer block keeps (norm
inputs, q/k/v/o, the MLP's gate, up and product), rounded up; on SmolLM2-135M (float32, CPU)
one example of 512, 1024 and 2048 tokens forward and backward peaked at 1.0, 1.5 and 3.2 GB over
the loaded model (a fifth of each example scored), which these estimate, less the model copy, at
1.2, 2.0 and 3.6 GB.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from adapter_fusion.errors import LimitExceededError, RecipeError

MB = 1 << 20
WORKSPACE = 512 * MB  # allocator slack, thread pools, tokenizer: measured ~0.3-0.5 GB beyond the tensors
KEPT_PER_HIDDEN, KEPT_PER_INTERMEDIATE = 8, 4  # values a block keeps per token for its backward
TRANSIENT_PER_HIDDEN, TRANSIENT_PER_INTERMEDIATE = 4, 3  # values one block holds at once in a forward
LOGIT_COPIES_BACKWARD, LOGIT_COPIES_FORWARD = 4, 2  # logits, log-softmax, their gradients / the forward's two


@dataclass(frozen=True)
class FitBounds:
    """How a fit is cut and what it may cost (None: no cap, the library's default for a local run)."""

    batch_tokens: int = 2048  # padded tokens per micro-batch of a learned fit (a longer example runs alone)
    max_memory_bytes: int | None = None  # the estimated peak must stay under this
    max_work_tokens: int | None = None  # example tokens run through the model, all steps or sources together

    def __post_init__(self) -> None:
        if self.batch_tokens < 1:
            raise RecipeError(f"batch_tokens must be >= 1, got {self.batch_tokens}")


@dataclass(frozen=True)
class ModelShape:
    """The base model's sizes that a fit's memory depends on, read from its config and checkpoint."""

    parameters: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int

    @classmethod
    def of(cls, base_dir: str | Path) -> ModelShape:
        """From config.json and the safetensors headers (no weights read)."""
        base_dir = Path(base_dir)
        try:
            config = json.loads((base_dir / "config.json").read_text())
        except (OSError, ValueError):
            raise RecipeError(f"{base_dir}: not a model directory (no config.json); set `base:` in the recipe or pass --base") from None

        def first(*keys: str, default: int = 0) -> int:
            return int(next((config[k] for k in keys if isinstance(config.get(k), int)), default))

        hidden = first("hidden_size", "d_model", "n_embd")
        layers = first("num_hidden_layers", "num_layers", "n_layer") + first("num_decoder_layers")
        return cls(
            parameters=checkpoint_parameters(base_dir),
            hidden=hidden,
            intermediate=first("intermediate_size", "d_ff", "n_inner", default=4 * hidden),
            layers=layers,
            heads=first("num_attention_heads", "num_heads", "n_head"),
            vocab=first("vocab_size"),
        )


def checkpoint_parameters(base_dir: Path) -> int:
    """Elements in the checkpoint's safetensors files, from their headers."""
    from safetensors import safe_open

    total = 0
    for path in sorted(base_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for key in f.keys():
                size = 1
                for n in f.get_slice(key).get_shape():
                    size *= n
                total += size
    if total == 0:
        raise RecipeError(f"{base_dir}: no safetensors weights to size a fit by")
    return total


@dataclass(frozen=True)
class FitCost:
    what: str  # "learned", "regmean", "fisher"
    parts: dict[str, int]  # bytes per part of the peak
    work_tokens: int
    work: str  # how the work was counted, for messages

    @property
    def memory_bytes(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        return ", ".join(f"{name} {size / MB:,.0f}" for name, size in self.parts.items() if size)

    def check(self, bounds: FitBounds) -> None:
        """LimitExceededError naming the estimate and the bound of each bound this fit is over."""
        over = []
        if bounds.max_memory_bytes is not None and self.memory_bytes > bounds.max_memory_bytes:
            over.append(
                f"would need about {self.memory_bytes / MB:,.0f} MB at its peak (MB: {self.describe()}); this server's fit budget "
                f"is {bounds.max_memory_bytes / MB:,.0f} MB"
            )
        if bounds.max_work_tokens is not None and self.work_tokens > bounds.max_work_tokens:
            over.append(
                f"would run {self.work_tokens:,} example tokens through the model ({self.work}); this server's cap is "
                f"{bounds.max_work_tokens:,}"
            )
        if over:
            raise LimitExceededError(f"{self.what} {'; and '.join(over)}: fewer or shorter examples, fewer steps or sources")


def batch_rows(widths: Sequence[int], batch_tokens: int, max_rows: int) -> list[int]:
    """How many of these examples (in order, by padded width) each micro-batch takes: rows are
    added while rows × widest stays within `batch_tokens` (one longer example runs alone)."""
    sizes, rows, widest = [], 0, 0
    for width in widths:
        if rows and (rows >= max_rows or (rows + 1) * max(widest, width) > batch_tokens):
            sizes.append(rows)
            rows, widest = 0, 0
        rows, widest = rows + 1, max(widest, width)
    return sizes + [rows] if rows else sizes


def learned_cost(shape: ModelShape, prompts: Sequence[int], targets: Sequence[int], steps: int, bounds: FitBounds, value_bytes: int = 4) -> FitCost:
    """A learned fit of these examples (prompt and target token counts): any order of them makes
    micro-batches of at most max(batch_tokens, longest) padded tokens, scoring at most every
    position after the shortest prompt."""
    lengths = [p + t for p, t in zip(prompts, targets)]
    longest = max(lengths)
    tokens = max(bounds.batch_tokens, longest)  # padded tokens of the largest micro-batch
    rows = max(1, tokens // min(lengths))
    scored = min(tokens, rows * (longest - min(prompts) + 1))  # logit positions: after the shortest prompt, per row
    per_token = shape.layers * (KEPT_PER_HIDDEN * shape.hidden + KEPT_PER_INTERMEDIATE * shape.intermediate) * value_bytes
    parts = {
        "model copy": shape.parameters * value_bytes,
        "activations": tokens * per_token,
        "logits": scored * shape.vocab * 4 * LOGIT_COPIES_BACKWARD,
        "attention": 2 * shape.heads * tokens * longest * value_bytes,  # one layer's scores and softmax
        "workspace": WORKSPACE,
    }
    total = sum(lengths)
    return FitCost("learned", parts, total * steps, f"{total:,} tokens × {steps:,} steps")


def statistics_cost(
    kind: str, shape: ModelShape, modules: dict[str, tuple[int, int]], lengths: Sequence[Sequence[int]], value_bytes: int = 4
) -> FitCost:
    """Regmean ("gram") or fisher ("fisher") over `modules` (path: (out, in)), `lengths[s]` the
    token counts of source s's examples, run one example at a time. Every source's statistics
    are kept until the merge, with one running sum (and for fisher one example's gradient)."""
    longest = max(n for rows in lengths for n in rows)
    n = len(lengths)
    grad = kind == "fisher"
    if grad:
        statistics = (n + 2) * sum(o * i for o, i in modules.values()) * 4
        per_token = shape.layers * (KEPT_PER_HIDDEN * shape.hidden + KEPT_PER_INTERMEDIATE * shape.intermediate) * value_bytes
        per_token += sum(o + i for o, i in modules.values()) * value_bytes  # each module's input and output gradient
    else:
        statistics = (n + 1) * sum(i * i for _, i in modules.values()) * 8  # float64 Gram matrices
        per_token = (TRANSIENT_PER_HIDDEN * shape.hidden + TRANSIENT_PER_INTERMEDIATE * shape.intermediate) * value_bytes
        per_token += max((i for _, i in modules.values()), default=0) * 8  # one module input as float64
    parts = {
        "model copy": shape.parameters * value_bytes,
        "statistics": statistics,
        "activations": longest * per_token,
        "logits": longest * shape.vocab * 4 * (LOGIT_COPIES_BACKWARD if grad else LOGIT_COPIES_FORWARD),
        "attention": 2 * shape.heads * longest * longest * value_bytes,
        "workspace": WORKSPACE,
    }
    total = sum(sum(rows) for rows in lengths)
    return FitCost(kind if kind == "fisher" else "regmean", parts, total, f"the tokens of {n} sources' examples")
