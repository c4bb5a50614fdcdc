"""The data-aware merges (regmean, fisher): each source's examples run through the base model
with that source's adapter applied, and what the method needs per module is collected on the way.

Plain transformers with forward hooks on the target modules, not the serving runtime: a hook adds
the source's ΔW x = B (A x) to the module's output (the adapter applied, exactly as LoRA does with
dropout off) and records the module's input. One example at a time: no padding to mask, and
Fisher needs per-example gradients anyway. Statistics are float64 (Gram) / float32 (Fisher) on
the CPU; the model runs in float32 on `device`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from adapter_fusion.adapters import Adapter
from adapter_fusion.errors import IncompatibleAdaptersError, RecipeError, quoted
from adapter_fusion.merge import MergeResult, get_method, merge
from adapter_fusion.merge.driver import ProgressCallback
from adapter_fusion.merge.registry import data_methods

Example = tuple[str, str]  # (input, target)
MAX_EXAMPLES = 10_000  # per source: statistics converge long before; a typo'd file fails fast


def load_examples(path: str | Path) -> list[Example]:
    """A JSONL file of {"input": ..., "target": ...} (or "output"), one object per line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: examples file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"{path}: cannot read the examples ({error})") from None
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise RecipeError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        target = row.get("target", row.get("output")) if isinstance(row, dict) else None
        if not isinstance(target, str) or not isinstance(row.get("input"), str):
            raise RecipeError(f"{path}:{number}: every line needs string 'input' and 'target' (or 'output') keys")
        examples.append((row["input"], target))
    if not examples:
        raise RecipeError(f'{path}: no examples; write one JSON object per line, {{"input": ..., "target": ...}}')
    if len(examples) > MAX_EXAMPLES:
        raise RecipeError(f"{path}: {len(examples)} examples, more than {MAX_EXAMPLES}; a few dozen suffice")
    return examples


def load_base(base_dir: str | Path, device: str | None = None):
    """(model, tokenizer) in float32, eval mode, parameters frozen (gradients go to probes only)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from adapter_fusion.models import resolve_device

    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise RecipeError(f"{base_dir}: not a model directory (no config.json); set `base:` in the recipe or pass --base")
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
    except (OSError, ValueError, TypeError):
        raise RecipeError(f"{base_dir}: no tokenizer; the examples are tokenized with the base model's tokenizer") from None
    seq2seq = bool(AutoConfig.from_pretrained(base_dir).is_encoder_decoder)
    model_class = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = model_class.from_pretrained(base_dir, dtype=torch.float32).to(resolve_device(device)).eval()
    return model.requires_grad_(False), tokenizer


def encode(model, tokenizer, example: Example, chat: bool) -> dict[str, Tensor]:
    """Model inputs of one example (batch 1) with `labels` -100 except on the target tokens.
    Causal: the input as a chat user message (the tokenizer's template; raw text if `chat` is off
    or there is none), then the target. Seq2seq: input to the encoder, target as the labels."""
    prompt, target = example
    if model.config.is_encoder_decoder:
        labels = torch.tensor([tokenizer(target)["input_ids"]])
        return {
            "input_ids": torch.tensor([tokenizer(prompt)["input_ids"]]),
            "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=labels),
            "labels": labels,
        }
    if chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    else:
        text = prompt
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and len(ids) + len(target_ids) > limit:
        raise RecipeError(f"example {quoted(prompt)} is {len(ids) + len(target_ids)} tokens, more than the base model's {limit}")
    return {"input_ids": torch.tensor([ids + target_ids]), "labels": torch.tensor([[-100] * len(ids) + target_ids])}


def target_nll(model, batch: dict[str, Tensor]) -> Tensor:
    """Summed −log p(target | input) of one example (a 0-d tensor)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits  # (1, T, vocab)
    if not model.config.is_encoder_decoder:
        logits, labels = logits[:, :-1], labels[:, 1:]  # position t predicts token t+1
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")


class _Hooks:
    """Forward hooks on the target modules: add the adapter's B (A x), remember each call's input
    x and (for gradients) a zero probe added to the output, whose gradient is ∂loss/∂output."""

    def __init__(self, model, shapes: dict[str, tuple[int, int]], adapter: Adapter, probes: bool) -> None:
        self.calls: dict[str, list[tuple[Tensor, Tensor | None]]] = {path: [] for path in shapes}
        weight = next(model.parameters())
        self.handles = []
        for path in shapes:
            delta = adapter.modules.get(path)
            factors = None if delta is None else (delta.A.to(weight), delta.B.to(weight))  # the model's device and dtype
            self.handles.append(model.get_submodule(path).register_forward_hook(self._hook(path, factors, probes)))

    def _hook(self, path: str, factors: tuple[Tensor, Tensor] | None, probes: bool):
        def hook(module, args, output: Tensor) -> Tensor:
            x = args[0]  # (1, T, in)
            if factors is not None:
                output = output + (x @ factors[0].T) @ factors[1].T  # (1, T, out)
            probe = torch.zeros_like(output, requires_grad=True) if probes else None
            self.calls[path].append((x.detach(), probe))
            return output + probe if probes else output

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def module_shapes(model, sources: Sequence[Adapter]) -> dict[str, tuple[int, int]]:
    """(out, in) of every module some source targets, checked against the base model."""
    shapes = {}
    for adapter in sources:
        for path, delta in adapter.modules.items():
            try:
                weight = model.get_submodule(path).weight
            except AttributeError:
                raise IncompatibleAdaptersError(f"adapter {adapter.name!r} targets {path!r}, which the base model lacks") from None
            shape = tuple(weight.shape[::-1]) if adapter.fan_in_fan_out else tuple(weight.shape)
            if shape != delta.shape:
                raise IncompatibleAdaptersError(
                    f"adapter {adapter.name!r} module {path!r} is {delta.shape[0]}x{delta.shape[1]}, the base model's is "
                    f"{shape[0]}x{shape[1]}: it was made for another base model"
                )
            shapes[path] = shape
    return shapes


def collect_statistics(
    kind: str, model, tokenizer, sources: Sequence[Adapter], examples: Sequence[Sequence[Example]], chat: bool = True,
    on_example: ProgressCallback | None = None,
) -> dict[str, list[Tensor]]:
    """Per module, one statistic per source (see `MergeMethod.data`): "gram" = mean x xᵀ over
    the source's tokens, (in, in) float64; "fisher" = mean over its examples of the squared
    gradient of log p(target | input) w.r.t. ΔW, (out, in) float32."""
    shapes = module_shapes(model, sources)
    out: dict[str, list[Tensor]] = {path: [] for path in shapes}
    total, done = sum(map(len, examples)), 0
    for adapter, rows in zip(sources, examples):
        sums = {path: torch.zeros(shape[1], shape[1], dtype=torch.float64) if kind == "gram" else torch.zeros(shape) for path, shape in shapes.items()}
        tokens = dict.fromkeys(shapes, 0)
        hooks = _Hooks(model, shapes, adapter, probes=kind == "fisher")
        try:
            for example in rows:
                batch = {k: v.to(model.device) for k, v in encode(model, tokenizer, example, chat).items()}
                with torch.enable_grad() if kind == "fisher" else torch.no_grad():
                    loss = target_nll(model, batch)
                calls = [(path, x, probe) for path, seen in hooks.calls.items() for x, probe in seen]
                if kind == "fisher":
                    grads = torch.autograd.grad(loss, [probe for _, _, probe in calls], allow_unused=True)
                    per_module = {path: torch.zeros(shapes[path]) for path in shapes}
                    for (path, x, _), g in zip(calls, grads):
                        if g is not None:  # ∂loss/∂ΔW = Σ_tokens g xᵀ, (out, in)
                            per_module[path] += (g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1])).float().cpu()
                    for path, g in per_module.items():
                        sums[path] += g.square()
                else:
                    for path, x, _ in calls:
                        flat = x.reshape(-1, x.shape[-1]).double().cpu()  # (tokens, in)
                        sums[path] += flat.T @ flat
                        tokens[path] += flat.shape[0]
                for seen in hooks.calls.values():
                    seen.clear()
                done += 1
                if on_example is not None:
                    on_example(done, total, adapter.name)
        finally:
            hooks.remove()
        for path in shapes:
            count = tokens[path] if kind == "gram" else len(rows)
            out[path].append(sums[path] / max(count, 1))
    return out


def merge_with_data(
    sources: Sequence[Adapter],
    method: str,
    examples: Sequence[Sequence[Example]],
    base: str | Path | None = None,
    weights: Sequence[float] | None = None,
    parameters: dict | None = None,
    rank: int | None = None,
    seed: int = 0,
    name: str = "merged",
    chat: bool = True,
    device: str | None = None,
    on_module: ProgressCallback | None = None,
    on_example: ProgressCallback | None = None,
) -> MergeResult:
    """Compose `sources` with a data-aware method; `examples[i]` are source i's (input, target)
    pairs, run through `base` (default: the default base model) with source i applied."""
    from adapter_fusion.models import default_base

    spec = get_method(method)
    if spec.data is None:
        raise RecipeError(f"method {method!r} uses no examples; examples go only with {', '.join(data_methods())}")
    if spec.data == "coefficients":
        raise RecipeError(f"method {method!r} fits coefficients on one shared set of examples: use adapter_fusion.learned.merge_learned")
    if len(examples) != len(sources):
        raise RecipeError(f"got examples for {len(examples)} sources, but {len(sources)} sources: every source needs its own")
    if any(len(rows) == 0 for rows in examples):
        raise RecipeError("every source needs at least one example")
    model, tokenizer = load_base(base or default_base(), device)
    statistics = collect_statistics(spec.data, model, tokenizer, sources, examples, chat, on_example)
    return merge(sources, method, weights, parameters, rank, seed, name, on_module, statistics=statistics)
