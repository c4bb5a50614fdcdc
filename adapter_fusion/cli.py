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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
