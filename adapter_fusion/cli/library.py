"""The library's commands: merge, inspect, base-model, bake, eval, lorahub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from adapter_fusion.cli.output import console, fail, progress_bar
from adapter_fusion.errors import AdapterFusionError, OutputExistsError, RecipeError

DEFAULT_RECIPE = Path(__file__).parent.parent / "default_recipe.yaml"
# where the base model runs (checked by `models.resolve_device` / `resolve_dtype` before loading)
DeviceOption = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or mps; default: cuda if available, else cpu")]
DtypeOption = Annotated[str | None, typer.Option(help="float32, bfloat16 or float16; default: bfloat16 on cuda, else float32")]


def merge(
    recipe: Annotated[Path | None, typer.Argument(help="YAML recipe or mergekit config; omitted: the built-in demo recipe")] = None,
    output: Annotated[Path | None, typer.Option(help="output dir (overrides the recipe's)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
    base: Annotated[Path | None, typer.Option(help="base model dir the examples run through (regmean, fisher); overrides the recipe's")] = None,
    device: DeviceOption = None,
) -> None:
    """Compose the recipe's adapters and write the result as a PEFT adapter."""
    from adapter_fusion.recipe import parse_recipe
    from adapter_fusion.recipe_run import load_recipe, merge_to_disk

    try:
        parsed = load_recipe(recipe or DEFAULT_RECIPE)
        if base is not None:  # validated again: a base is refused for methods that run no model
            parsed = parse_recipe({**parsed.model_dump(), "base": str(base)})
        if recipe is None:
            overwrite = True  # the demo's output is ours to replace
            console.print(f"no recipe given: running the built-in demo recipe {DEFAULT_RECIPE}")
        with progress_bar() as progress:
            task = progress.add_task(f"{parsed.method}", total=None, module="")

            def tick(done: int, total: int, path: str) -> None:
                progress.update(task, completed=done, total=total, module=path)

            def example(done: int, total: int, source: str) -> None:
                progress.update(task, description=f"{parsed.method}: examples", completed=done, total=total, module=source)

            result, path = merge_to_disk(parsed, output, overwrite=overwrite, on_module=tick, device=device, on_example=example)
    except AdapterFusionError as error:
        fail(error)
    table = Table(title=f"{parsed.method} of {len(parsed.sources)} adapters -> {path}")
    for column in ("modules", "max rank", "min energy kept", "mean energy kept", "max rel. error"):
        table.add_column(column, justify="right")
    s = result.summary()
    table.add_row(
        str(s["modules"]),
        str(s["max_rank"]),
        f"{s['min_energy_kept']:.4f}",
        f"{s['mean_energy_kept']:.4f}",
        f"{s['max_relative_error']:.2e}",
    )
    console.print(table)


def inspect(adapter: Annotated[Path, typer.Argument(help="PEFT adapter dir")]) -> None:
    """Print an adapter's rank, alpha, targets, size and base model."""
    from adapter_fusion.adapters import load_adapter, read_config

    try:
        loaded = load_adapter(adapter)
        config = read_config(adapter)
    except AdapterFusionError as error:
        fail(error)
    ranks = sorted(set(loaded.ranks.values()))
    table = Table(show_header=False, title=str(adapter))
    rows = {
        "base model": str(loaded.base_model),
        "rank": ", ".join(map(str, ranks)),
        "lora_alpha": str(config.get("lora_alpha")) + (" (rsLoRA)" if config.get("use_rslora") else ""),
        "targets": ", ".join(loaded.target_names),
        "modules": str(len(loaded.modules)),
        "size": f"{(adapter / 'adapter_model.safetensors').stat().st_size / 1e6:.2f} MB on disk",
        "task type": str(loaded.task_type),
    }
    for key, value in rows.items():
        table.add_row(key, value)
    console.print(table)


def base_model() -> None:
    """Print the default base model's directory (SmolLM2, converted on first use), for other servers:
    vllm serve "$(adapter-fusion base-model)" --enable-lora ..."""
    from adapter_fusion.models import default_base

    print(default_base())


def bake(
    output: Annotated[Path, typer.Option(help="model dir to write")],
    adapter: Annotated[Path | None, typer.Option(help="PEFT adapter dir to bake in")] = None,
    recipe: Annotated[Path | None, typer.Option(help="compose this recipe, then bake the result")] = None,
    base: Annotated[Path | None, typer.Option(help="base model dir; default: SmolLM2-135M-Instruct")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16; default: as stored")] = None,
    max_shard_size: Annotated[str, typer.Option(help="shard size cap, e.g. 500MB, 5GB")] = "50GB",
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
) -> None:
    """Write base + adapter as a full model directory (streamed, bounded memory)."""
    from adapter_fusion.adapters import load_adapter
    from adapter_fusion.bake import bake as bake_model
    from adapter_fusion.models import default_base
    from adapter_fusion.recipe_run import load_recipe, run_recipe

    if (adapter is None) == (recipe is None):
        fail(typer.BadParameter("give exactly one of --adapter or --recipe"))
    try:
        source = load_adapter(adapter) if adapter else run_recipe(load_recipe(recipe)).adapter
        with progress_bar() as progress:
            task = progress.add_task("bake", total=None, module="")

            def tick(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total, module=f"{done / 1e6:.0f}/{total / 1e6:.0f} MB")

            manifest = bake_model(base or default_base(), source, output, dtype, max_shard_size, overwrite, tick)
    except (AdapterFusionError, ValueError) as error:
        fail(error)
    console.print(
        f"baked {manifest.merged_modules} modules into {output} "
        f"({len(manifest.shards)} shard(s), {manifest.total_bytes / 1e6:.1f} MB, manifest {output}/adapter_fusion_bake.json)"
    )


def evaluate_command(
    task: Annotated[list[str], typer.Option(help="task name (repeat); see adapter_fusion.tasks.TASKS")],
    adapter: Annotated[list[Path] | None, typer.Option(help="PEFT adapter dir (repeat); none = the base model")] = None,
    base: Annotated[Path | None, typer.Option(help="base model dir; default: SmolLM2-135M-Instruct")] = None,
    split: Annotated[str, typer.Option(help="train, validation or test")] = "test",
    limit: Annotated[int, typer.Option(help="examples per task")] = 50,
    output_json: Annotated[Path | None, typer.Option("--json", help="also write the scores here as JSON")] = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
) -> None:
    """Exact-match accuracy and target loss of adapters (or the base model) on tasks."""
    import json
    from dataclasses import asdict

    from adapter_fusion.adapters import load_adapter
    from adapter_fusion.evaluate import evaluate
    from adapter_fusion.models import default_base
    from adapter_fusion.runtime import Runtime
    from adapter_fusion.tasks import TASKS

    unknown = [t for t in task if t not in TASKS]
    if unknown:
        fail(typer.BadParameter(f"unknown task(s) {', '.join(unknown)}; tasks: {', '.join(TASKS)}"))
    try:
        adapters = {str(p): load_adapter(p) for p in adapter} if adapter else {"base": None}
        runtime = Runtime(base or default_base(), device=device, dtype=dtype)
        with progress_bar() as progress:
            bar = progress.add_task("eval", total=None, module="")
            scores = evaluate(runtime, adapters, task, split, limit, on_batch=lambda d, t: progress.update(bar, completed=d, total=t, module="rows"))
    except (AdapterFusionError, KeyError) as error:
        fail(error)
    table = Table(title=f"{split} split, {limit} examples per task")
    for column in ("adapter", "task", "accuracy", "loss/token"):
        table.add_column(column)
    for s in scores:
        table.add_row(s.adapter, s.task, f"{s.accuracy:.3f}", f"{s.mean_loss:.3f}")
    console.print(table)
    if output_json:
        output_json.write_text(json.dumps([{k: v for k, v in asdict(s).items() if k != "outputs"} for s in scores], indent=2))


def lorahub(
    adapters: Annotated[list[Path], typer.Option("--adapters", help="PEFT adapter dir (repeat)")],
    examples: Annotated[Path, typer.Option(help="JSONL file of {input, target} (or {input, output}) examples")],
    output: Annotated[Path, typer.Option(help="where to write the composed adapter")],
    base: Annotated[Path | None, typer.Option(help="base model dir; default: SmolLM2-135M-Instruct")] = None,
    budget: Annotated[int, typer.Option(help="evaluations")] = 40,
    optimizer: Annotated[str, typer.Option(help="any nevergrad optimizer")] = "NGOpt",
    seed: Annotated[int, typer.Option()] = 0,
    l1: Annotated[float, typer.Option(help="weight of the mean |w| penalty")] = 0.05,
    rule: Annotated[str, typer.Option(help="linear (exact delta sum) or factor_linear (the original's)")] = "linear",
    parallel: Annotated[int, typer.Option(help="candidates scored in one batched forward pass")] = 1,
    raw: Annotated[bool, typer.Option(help="inputs are raw text, not chat messages")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
) -> None:
    """LoraHub: search composition weights on a few examples, save the composed adapter."""
    import json

    from adapter_fusion.adapter_save import save_adapter
    from adapter_fusion.adapters import load_adapter
    from adapter_fusion.lorahub import lorahub_search
    from adapter_fusion.models import default_base
    from adapter_fusion.runtime import Runtime

    try:
        if output.exists() and not overwrite:
            raise OutputExistsError(f"{output} already exists; choose another output or pass --overwrite")
        rows = [json.loads(line) for line in examples.read_text().splitlines() if line.strip()]
        pairs = [(r["input"], r.get("target", r.get("output"))) for r in rows]
        if any(t is None for _, t in pairs):
            raise RecipeError(f"{examples}: every line needs 'input' and 'target' (or 'output')")
        sources = [load_adapter(p) for p in adapters]
        runtime = Runtime(base or default_base(), device=device, dtype=dtype)
        with progress_bar() as progress:
            bar = progress.add_task("lorahub", total=budget, module="")
            result = lorahub_search(
                runtime, sources, pairs, budget, optimizer, seed, l1, rule=rule, parallel=parallel, chat=not raw, name=output.name,
                on_progress=lambda p: progress.update(bar, completed=p.evaluations, module=f"best loss {p.best_loss:.4f}"),
            )
        save_adapter(result.adapter, output, overwrite=overwrite)
    except (AdapterFusionError, OSError, json.JSONDecodeError) as error:
        fail(error)
    weights = ", ".join(f"{p.name}={w:+.3f}" for p, w in zip(adapters, result.weights))
    console.print(f"best loss {result.best_loss:.4f} after {len(result.losses)} evaluations ({result.seconds:.1f} s): {weights} -> {output}")
