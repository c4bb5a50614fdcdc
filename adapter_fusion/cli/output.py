"""What every command prints: results on stdout, errors unwrapped on stderr, progress bars."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console()
errors = Console(stderr=True, soft_wrap=True)  # error text unwrapped: paths stay copyable


def fail(error: Exception) -> NoReturn:
    """Print the error and exit with status 2 (a usage error: nothing was started)."""
    errors.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False)
    raise typer.Exit(code=2)


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[module]}"),
        console=console,
        transient=True,
    )
