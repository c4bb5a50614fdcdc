"""The `adapter-fusion` command: merge, inspect (and more as the product grows)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from adapter_fusion.errors import AdapterFusionError

app = typer.Typer(help="Compose PEFT LoRA adapters exactly and fast.", no_args_is_help=True, add_completion=False)
console = Console()
errors = Console(stderr=True, soft_wrap=True)  # error text unwrapped: paths stay copyable
DEFAULT_RECIPE = Path(__file__).parent / "default_recipe.yaml"


def _fail(error: Exception) -> None:
    errors.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False)
    raise typer.Exit(code=2)


def _progress() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[module]}"),
        console=console,
        transient=True,
    )


@app.command()
def merge(
    recipe: Annotated[Path | None, typer.Argument(help="YAML recipe; omitted: the built-in demo recipe")] = None,
    output: Annotated[Path | None, typer.Option(help="output dir (overrides the recipe's)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
) -> None:
    """Compose the recipe's adapters and write the result as a PEFT adapter."""
    from adapter_fusion.recipe import load_recipe, merge_to_disk

    try:
        parsed = load_recipe(recipe or DEFAULT_RECIPE)
        if recipe is None:
            overwrite = True  # the demo's output is ours to replace
            console.print(f"no recipe given: running the built-in demo recipe {DEFAULT_RECIPE}")
        with _progress() as progress:
            task = progress.add_task(f"{parsed.method}", total=None, module="")

            def tick(done: int, total: int, path: str) -> None:
                progress.update(task, completed=done, total=total, module=path)

            result, path = merge_to_disk(parsed, output, overwrite=overwrite, on_module=tick)
    except AdapterFusionError as error:
        _fail(error)
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


@app.command()
def inspect(adapter: Annotated[Path, typer.Argument(help="PEFT adapter dir")]) -> None:
    """Print an adapter's rank, alpha, targets, size and base model."""
    from adapter_fusion.adapters import load_adapter, read_config

    try:
        loaded = load_adapter(adapter)
        config = read_config(adapter)
    except AdapterFusionError as error:
        _fail(error)
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


@app.command()
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
    from adapter_fusion.recipe import load_recipe, run_recipe

    if (adapter is None) == (recipe is None):
        _fail(typer.BadParameter("give exactly one of --adapter or --recipe"))
    try:
        source = load_adapter(adapter) if adapter else run_recipe(load_recipe(recipe)).adapter
        with _progress() as progress:
            task = progress.add_task("bake", total=None, module="")

            def tick(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total, module=f"{done / 1e6:.0f}/{total / 1e6:.0f} MB")

            manifest = bake_model(base or default_base(), source, output, dtype, max_shard_size, overwrite, tick)
    except (AdapterFusionError, ValueError) as error:
        _fail(error)
    console.print(
        f"baked {manifest.merged_modules} modules into {output} "
        f"({len(manifest.shards)} shard(s), {manifest.total_bytes / 1e6:.1f} MB, manifest {output}/adapter_fusion_bake.json)"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
