"""A command's options made from a settings model (`adapter_fusion.server.settings`), so each
option is declared once: its flag, default, help, environment variable, repeatability (a list)
and choices (an enum) all come from the model's field."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError

from adapter_fusion.cli.output import fail

Settings = TypeVar("Settings", bound=BaseModel)


def flag(settings: type[BaseModel], name: str) -> str:
    """The command-line spelling of field `name`."""
    extra = settings.model_fields[name].json_schema_extra or {}
    return extra.get("flag") or "--" + name.replace("_", "-")


def option(settings: type[BaseModel], name: str) -> inspect.Parameter:
    """One field as a typer option (a keyword parameter, its default the field's)."""
    field = settings.model_fields[name]
    extra = field.json_schema_extra or {}
    declared = [extra["flag"]] if "flag" in extra else []
    typed = Annotated[field.annotation, typer.Option(*declared, help=field.description, envvar=extra.get("envvar"))]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=field.get_default(call_default_factory=True), annotation=typed)


def readable(error: ValidationError, settings: type[BaseModel]) -> str:
    """Pydantic's errors in the command's terms: the flag, the value given, what is wrong."""
    lines = []
    for e in error.errors():
        message = e["msg"].removeprefix("Value error, ")
        if e["loc"] and e["loc"][0] in settings.model_fields:
            message = f"{flag(settings, str(e['loc'][0]))} {e['input']!r}: {message[:1].lower()}{message[1:]}"
        lines.append(message)
    return "; ".join(lines)


def settings_command(settings: type[Settings], run: Callable[[Settings], None]) -> Callable[..., None]:
    """A typer command taking `settings`' fields as options; it validates them into `settings`
    (a bad value: an error naming the flag, exit status 2, before anything starts) and calls `run`."""
    parameters = [option(settings, name) for name in settings.model_fields]

    def command(**values: Any) -> None:
        try:
            chosen = settings.model_validate(values)
        except ValidationError as error:
            fail(ValueError(readable(error, settings)))
        run(chosen)

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    command.__doc__ = run.__doc__
    command.__name__ = run.__name__
    return command
