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
from adapter_fusion.base_model import load_base, open_encoder
from adapter_fusion.encoding import Encoder
from adapter_fusion.errors import IncompatibleAdaptersError, RecipeError, quoted
from adapter_fusion.fit_cost import FitBounds, FitCost, ModelShape, statistics_cost
from adapter_fusion.fit_guard import Tick, releasing, stop_points
from adapter_fusion.merge import MergeResult, get_method, merge
from adapter_fusion.merge.driver import ProgressCallback
from adapter_fusion.merge.methods import data_methods
from adapter_fusion.nll import IGNORED, causal_nll, summed_nll

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


def token_ids(encoder: Encoder, example: Example, chat: bool) -> tuple[list[int], list[int]]:
    """An example's input and target ids as learned and LoraHub fit them (`Encoder.example_ids`:
    in a chat, the target ends with the end of the assistant's turn), within the model's length."""
    prompt, target = example
    ids, target_ids = encoder.example_ids(prompt, target, chat)
    limit = encoder.max_positions
    if limit and len(ids) + len(target_ids) > limit:
        raise RecipeError(f"example {quoted(prompt)} is {len(ids) + len(target_ids)} tokens, more than the base model's {limit}")
    return ids, target_ids


def encode(model, encoder: Encoder, example: Example, chat: bool) -> dict[str, Tensor]:
    """Model inputs of one example (batch 1) with `labels` `IGNORED` except on the target tokens.
    Causal: the input (a chat user message, or raw text: `Encoder.uses_chat`), then the target.
    Seq2seq: input to the encoder, target as the labels."""
    ids, target_ids = token_ids(encoder, example, chat)
    if model.config.is_encoder_decoder:
        labels = torch.tensor([target_ids])
        return {
            "input_ids": torch.tensor([ids]),
            "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=labels),
            "labels": labels,
        }
    return {"input_ids": torch.tensor([ids + target_ids]), "labels": torch.tensor([[IGNORED] * len(ids) + target_ids])}


def examples_cost(kind: str, base_dir: str | Path, sources: Sequence[Adapter], examples: Sequence[Sequence[Example]], chat: bool) -> FitCost:
    """What collecting `kind` statistics would hold and run, from the tokenizer, the config and the
    sources' module shapes alone: before the model is loaded."""
    shape = ModelShape.of(base_dir)  # first: a path that is no model says so
    encoder = open_encoder(base_dir)
    lengths = [[sum(map(len, token_ids(encoder, example, chat))) for example in rows] for rows in examples]
    modules = {path: delta.shape for adapter in sources for path, delta in adapter.modules.items()}
    return statistics_cost(kind, shape, modules, lengths)


def target_nll(model, batch: dict[str, Tensor]) -> Tensor:
    """Summed −log p(target | input) of one example (a 0-d tensor): `nll.summed_nll`."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits  # (1, T, vocab)
    nll = summed_nll if model.config.is_encoder_decoder else causal_nll
    return nll(logits, batch["labels"])[0]


class _Hooks:
    """Forward hooks on the target modules: add the adapter's B (A x) and fold what the method
    needs into `sums` as each module runs, so no module's input outlives its use. "gram": x xᵀ
    of the call's tokens, at once. "fisher": a zero probe added to the output, whose gradient is
    ∂loss/∂output; a hook on it adds g xᵀ (∂loss/∂ΔW) to the example's gradient. `tick` runs
    after each module's share."""

    def __init__(self, model, shapes: dict[str, tuple[int, int]], adapter: Adapter, kind: str, tick: Tick | None) -> None:
        self.kind, self.tick = kind, tick
        self.tokens = dict.fromkeys(shapes, 0)
        self.sums = {p: torch.zeros(s[1], s[1], dtype=torch.float64) if kind == "gram" else torch.zeros(s) for p, s in shapes.items()}
        self.gradient = {p: torch.zeros(s) for p, s in shapes.items()} if kind == "fisher" else {}  # one example's
        weight = next(model.parameters())
        self.handles = []
        for path in shapes:
            delta = adapter.modules.get(path)
            factors = None if delta is None else (delta.A.to(weight), delta.B.to(weight))  # the model's device and dtype
            self.handles.append(model.get_submodule(path).register_forward_hook(self._hook(path, factors)))

    def _hook(self, path: str, factors: tuple[Tensor, Tensor] | None):
        def hook(module, args, output: Tensor) -> Tensor:
            x = args[0]  # (1, T, in)
            if factors is not None:
                output = output + (x @ factors[0].T) @ factors[1].T  # (1, T, out)
            flat = x.detach().reshape(-1, x.shape[-1])  # (tokens, in)
            if self.kind == "gram":
                flat = flat.double().cpu()
                self.sums[path] += flat.T @ flat
                self.tokens[path] += flat.shape[0]
                self._tick()
                return output
            probe = torch.zeros_like(output, requires_grad=True)
            probe.register_hook(lambda g: self._add_gradient(path, g, flat))
            return output + probe

        return hook

    def _add_gradient(self, path: str, g: Tensor, x: Tensor) -> None:
        self.gradient[path] += (g.reshape(-1, g.shape[-1]).T @ x).float().cpu()  # ∂loss/∂ΔW = Σ_tokens g xᵀ, (out, in)
        self._tick()

    def _tick(self) -> None:
        if self.tick is not None:
            self.tick()

    def end_example(self) -> None:
        """Fisher: the example's squared gradient joins the sum; the gradient restarts at 0."""
        for path, g in self.gradient.items():
            self.sums[path] += g.square()
            g.zero_()

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
    kind: str, model, encoder: Encoder, sources: Sequence[Adapter], examples: Sequence[Sequence[Example]], chat: bool = True,
    on_example: ProgressCallback | None = None, tick: Tick | None = None,
) -> dict[str, list[Tensor]]:
    """Per module, one statistic per source (see `MergeMethod.data`): "gram" = mean x xᵀ over
    the source's tokens, (in, in) float64; "fisher" = mean over its examples of the squared
    gradient of log p(target | input) w.r.t. ΔW, (out, in) float32. One example at a time (the
    micro-batch: Fisher needs per-example gradients); `tick` runs between modules and blocks."""
    shapes = module_shapes(model, sources)
    out: dict[str, list[Tensor]] = {path: [] for path in shapes}
    total, done = sum(map(len, examples)), 0
    for adapter, rows in zip(sources, examples):
        hooks = _Hooks(model, shapes, adapter, kind, tick)
        try:
            with stop_points(model, tick):
                for example in rows:
                    batch = {k: v.to(model.device) for k, v in encode(model, encoder, example, chat).items()}
                    if kind == "fisher":
                        with torch.enable_grad():
                            target_nll(model, batch).backward()  # the probes' hooks collect the gradients
                        hooks.end_example()
                    else:
                        with torch.no_grad():
                            model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
                    done += 1
                    if on_example is not None:
                        on_example(done, total, adapter.name)
        finally:
            hooks.remove()
        for path in shapes:
            count = hooks.tokens[path] if kind == "gram" else len(rows)
            out[path].append(hooks.sums[path] / max(count, 1))
    return out


def merge_with_data(
    sources: Sequence[Adapter],
    method: str,
    examples: Sequence[Sequence[Example]],
    base: str | Path | None = None,
    weights: Sequence[float] | None = None,
    parameters: dict | None = None,
    *,
    rank: int | None = None,
    seed: int = 0,
    name: str = "merged",
    chat: bool = True,
    device: str | None = None,
    on_module: ProgressCallback | None = None,
    on_example: ProgressCallback | None = None,
    bounds: FitBounds = FitBounds(),
    tick: Tick | None = None,
) -> MergeResult:
    """Compose `sources` with a data-aware method; `examples[i]` are source i's (input, target)
    pairs, run through `base` (default: the default base model) with source i applied. Over
    `bounds`, refused before the model is loaded; the model copy is released after."""
    from adapter_fusion.models import default_base

    spec = get_method(method)
    if spec.data is None:
        raise RecipeError(f"method {method!r} uses no examples; examples go only with {', '.join(data_methods())}")
    if spec.data == "coefficients":
        raise RecipeError(f"method {method!r} fits coefficients on one shared set of examples: use adapter_fusion.coefficient_fit.merge_learned")
    if len(examples) != len(sources):
        raise RecipeError(f"got examples for {len(examples)} sources, but {len(sources)} sources: every source needs its own")
    if any(len(rows) == 0 for rows in examples):
        raise RecipeError("every source needs at least one example")
    base = base or default_base()
    examples_cost(spec.data, base, sources, examples, chat).check(bounds)
    with releasing():  # the model copy is this merge's alone
        loaded = load_base(base, device, "float32")
        statistics = collect_statistics(spec.data, loaded.model, loaded.encoder, sources, examples, chat, on_example=on_example, tick=tick)
    return merge(sources, method, weights, parameters, rank=rank, seed=seed, name=name, on_module=on_module, statistics=statistics)
