"""The `adapter-fusion` command: the library's commands (`library`) and the serving ones
(`serving`, their options made from the settings models by `options`)."""

from __future__ import annotations

import typer

from adapter_fusion.cli import library, serving
from adapter_fusion.cli.options import settings_command
from adapter_fusion.cluster.cluster_settings import ClusterSettings
from adapter_fusion.server.settings import ServeSettings

app = typer.Typer(help="Compose PEFT LoRA adapters exactly and fast.", no_args_is_help=True, add_completion=False)
app.command()(library.merge)
app.command()(library.inspect)
app.command(name="base-model")(library.base_model)
app.command()(library.bake)
app.command(name="eval")(library.evaluate_command)
app.command()(library.lorahub)
app.command()(settings_command(ServeSettings, serving.serve))
app.command()(settings_command(ClusterSettings, serving.cluster))


def main() -> None:
    app()
