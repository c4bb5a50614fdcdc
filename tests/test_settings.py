"""One settings model behind `serve`, `cluster` and KubeRay's `app_builder` args: every serving
option exists everywhere it applies and reaches the `ServerConfig`, the old flags and environment
variables still work, and a bad value is refused, naming the flag, before anything starts."""

from __future__ import annotations

import subprocess
import sys
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
import typer
from pydantic import ValidationError
from typer.testing import CliRunner

from adapter_fusion.cli import app
from adapter_fusion.cli.options import Settings, flag, settings_command
from adapter_fusion.cluster.cluster_settings import AppArgs, ClusterSettings
from adapter_fusion.models import DEMO_ADAPTERS
from adapter_fusion.server.settings import ServeSettings, ServingSettings

runner = CliRunner()
LISTENER = set(ServeSettings.model_fields) - set(ServingSettings.model_fields)  # the standalone server's own
# what users and scripts already type (README, tests, examples): kept as they were
SERVE_FLAGS = {
    "--base": "ADAPTER_FUSION_BASE", "--host": "ADAPTER_FUSION_HOST", "--port": "ADAPTER_FUSION_PORT", "--store": "ADAPTER_FUSION_STORE",
    "--token": "ADAPTER_FUSION_TOKEN", "--adapter-root": None, "--output-root": None, "--preload": None, "--memory-budget-mb": None,
    "--slot-columns": None, "--store-quota-mb": None, "--output-quota-mb": None, "--max-new-tokens": None, "--max-prompt-tokens": None,
    "--max-queue": None, "--max-batch": None, "--max-job-tokens": None, "--max-stop-strings": None, "--tenant-queue-share": None,
    "--tenant-batch-share": None, "--max-request-mb": None, "--max-fit-memory-mb": None, "--max-fit-work-tokens": None, "--tls-cert": None,
    "--tls-key": None, "--metrics-port": None, "--grace": None, "--insecure": None, "--handshake-timeout": None, "--max-connections": None,
    "--max-streams-per-connection": None, "--connection-idle": None, "--connection-age": None, "--engine": None, "--max-loras": None,
    "--max-lora-rank": None, "--max-cpu-loras": None, "--gpu-memory-utilization": None, "--max-model-len": None,
    "--tensor-parallel-size": None, "--device": None, "--dtype": None,
}
CLUSTER_ONLY = {"--replicas": None, "--address": None, "--http-port": None, "--adapters-per-replica": None, "--cpus-per-replica": None}


def command(name: str) -> Any:
    return typer.main.get_command(app).commands[name]


def options(name: str) -> dict[str, str | None]:
    """A command's option flags and the environment variable each reads."""
    return {opt: p.envvar for p in command(name).params if p.param_type_name == "option" for opt in p.opts if opt != "--help"}


def parsed(settings: type[Settings], args: list[str], env: dict[str, str] | None = None) -> Settings:
    """The settings a command made from `settings` validates `args` into (its run replaced: nothing starts)."""
    seen: list[Settings] = []
    probe = typer.Typer()
    probe.command()(settings_command(settings, seen.append))
    result = runner.invoke(probe, args, env=env)
    assert result.exit_code == 0 and len(seen) == 1, result.output
    return seen[0]


def test_the_old_flags_and_environment_variables_still_work() -> None:
    assert options("serve") == SERVE_FLAGS
    assert set(options("cluster")) == (set(SERVE_FLAGS) - {flag(ServeSettings, n) for n in LISTENER}) | {"--port"} | set(CLUSTER_ONLY)
    assert {k: v for k, v in options("cluster").items() if v} == {k: v for k, v in SERVE_FLAGS.items() if v and k != "--host"}
    settings = parsed(ServeSettings, ["--adapter-root", "a", "--adapter-root", "b", "--engine", "vllm"], env={"ADAPTER_FUSION_PORT": "6000"})
    assert settings.adapter_roots == [Path("a"), Path("b")] and settings.engine.value == "vllm" and settings.port == 6000
    assert parsed(ServeSettings, []) == ServeSettings()  # the defaults are the model's (absent lists: None, not [])


def test_every_serving_option_exists_on_the_cluster_and_in_app_builder_args() -> None:
    """Derived from the model: a new serving option shows up everywhere, or this fails."""
    serving = set(ServingSettings.model_fields)
    cluster = {p.name for p in command("cluster").params}
    assert serving <= cluster and serving <= set(AppArgs.model_fields)
    assert set(ServeSettings.model_fields) <= {p.name for p in command("serve").params}
    assert not (LISTENER - {"port"}) & (cluster | set(AppArgs.model_fields)) and "port" not in AppArgs.model_fields  # the proxy's
    assert {"host", "tls_cert", "tls_key", "metrics_port", "max_connections"} <= LISTENER


def other_value(name: str, default: Any, annotation: Any, tmp_path: Path) -> Any:
    """A value for a field other than its default, by the field's type."""
    if isinstance(default, Enum):
        return next(v for v in type(default) if v != default)
    if isinstance(default, bool):
        return not default
    if isinstance(default, int | float):
        return default + 1 if isinstance(default, int) else default / 2
    if isinstance(default, str):
        return f"{default}-other"
    given = next(a for a in typing.get_args(annotation) if a is not types.NoneType)  # a field defaulting to None
    return {Path: tmp_path / name, list[Path]: [tmp_path / name], int: 3, float: 1.5, str: f"{name}-value"}[given]


@pytest.mark.parametrize("name", sorted(ServingSettings.model_fields))
def test_every_serving_option_reaches_the_server_config(name: str, tmp_path: Path) -> None:
    field = ServingSettings.model_fields[name]
    changed = ServingSettings(**{name: other_value(name, field.default, field.annotation, tmp_path)})
    assert changed.core_config(local=False) != ServingSettings().core_config(local=False), f"{flag(ServingSettings, name)} changes nothing"


@pytest.mark.parametrize("name", sorted(LISTENER))
def test_every_listener_option_reaches_the_server_config(name: str, tmp_path: Path) -> None:
    field = ServeSettings.model_fields[name]
    given = {"base": tmp_path, "tls_cert": tmp_path / "cert.pem", "tls_key": tmp_path / "key.pem"}  # the TLS pair goes together
    changed = ServeSettings(**{**given, name: other_value(name, field.default, field.annotation, tmp_path)})
    assert changed.server_config() != ServeSettings(**given).server_config(), f"{flag(ServeSettings, name)} changes nothing"


def test_a_cluster_option_new_to_the_command_reaches_the_replicas_config(tmp_path: Path) -> None:
    """`cluster --max-queue` (only `serve` had it) is in what every replica serves; Ray is not started."""
    args = ["--max-queue", "7", "--max-prompt-tokens", "100", "--store-quota-mb", "5", "--base", str(tmp_path), "--token", "t"]
    config = parsed(ClusterSettings, args).cluster_config()
    assert (config.server.limits.max_queue, config.server.limits.max_prompt_tokens, config.server.store_quota_bytes) == (7, 100, 5 << 20)
    assert config.server.base_dir == tmp_path.resolve() and config.server.store_dir.is_absolute()  # replicas run elsewhere
    args = AppArgs.model_validate({"base": str(tmp_path), "store": str(tmp_path / "store"), "max_queue": 7, "engine": "vllm", "max_lora_rank": 64})
    server = args.model_copy(update={"token": "t"}).cluster_config().server
    assert (server.limits.max_queue, server.engine, server.vllm.max_lora_rank) == (7, "vllm", 64)


def test_app_builder_args_refuse_the_token_and_what_only_a_standalone_server_has(tmp_path: Path) -> None:
    paths = {"base": str(tmp_path), "store": str(tmp_path / "store")}
    with pytest.raises(ValidationError, match=r"set \$ADAPTER_FUSION_TOKEN \(from a Secret\), never the token in the config file"):
        AppArgs.model_validate({**paths, "token": "in-the-file"})
    for key in ("host", "tls_cert", "metrics_port", "port"):
        with pytest.raises(ValidationError, match=f"{key}\n  Extra inputs are not permitted"):
            AppArgs.model_validate({**paths, key: "1"})
    with pytest.raises(ValidationError, match="base\n  Field required"):
        AppArgs.model_validate({"store": paths["store"]})
    with pytest.raises(ValidationError, match="max_request_mb: Ray Serve's gRPC proxy reads its cap from RAY_SERVE_GRPC_MAX_MESSAGE_SIZE on every node"):
        AppArgs.model_validate({**paths, "max_request_mb": 8})  # it would be accepted and do nothing


def test_app_builder_opens_no_roots_it_is_not_given(tmp_path: Path) -> None:
    """A pod reads and writes only where the Serve config says; the commands default to the demo
    adapters and the cache's exports, an empty list given to them means none too."""
    args = AppArgs.model_validate({"base": str(tmp_path), "store": str(tmp_path / "store")})
    server = args.model_copy(update={"token": "t"}).cluster_config().server
    assert (server.adapter_roots, server.output_roots) == ([], [])
    local = ServeSettings(base=tmp_path, store=tmp_path / "store", adapter_roots=[], output_roots=[]).server_config()
    assert (local.adapter_roots, local.output_roots) == ([], [])
    assert ServeSettings(base=tmp_path, store=tmp_path / "store").server_config().adapter_roots == [DEMO_ADAPTERS]


def test_a_request_cap_the_joined_clusters_proxy_would_ignore_is_refused(tmp_path: Path) -> None:
    result = runner.invoke(app, ["cluster", "--address", "auto", "--max-request-mb", "8", "--token", "t", "--store", str(tmp_path / "store")])
    assert result.exit_code == 2 and "--max-request-mb" in result.output and "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE on every node" in " ".join(result.output.split())
    assert parsed(ClusterSettings, ["--address", "auto", "--token", "t"]).address == "auto"  # the default cap: nothing to refuse


@pytest.mark.parametrize(
    ("command_name", "args", "message"),
    [
        ("serve", ["--max-batch", "-3"], "error: --max-batch -3: input should be greater than or equal to 1"),
        ("serve", ["--tls-cert", "cert.pem"], "error: give both --tls-cert and --tls-key"),
        ("serve", ["--tenant-queue-share", "1.5"], "error: --tenant-queue-share 1.5: input should be less than or equal to 1"),
        ("serve", ["--port", "70000"], "error: --port 70000: input should be less than or equal to 65535"),
        ("cluster", ["--max-queue", "0"], "error: --max-queue 0: input should be greater than or equal to 1"),
        ("cluster", ["--gpu-memory-utilization", "0"], "error: --gpu-memory-utilization 0.0: input should be greater than 0"),
    ],
)
def test_a_bad_value_is_refused_naming_the_flag_before_anything_starts(command_name: str, args: list[str], message: str, tmp_path: Path) -> None:
    # were the value let through, the command would stop soon anyway, at a missing base (serve) or
    # the token check (cluster), with another message
    result = runner.invoke(app, [command_name, "--store", str(tmp_path / "store"), "--base", str(tmp_path / "no-model"), *args])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "store").exists()  # no store opened, no model loaded, no Ray started


@pytest.mark.parametrize("command_name", ["serve", "cluster"])
def test_a_device_vllm_cannot_run_on_is_refused_before_anything_starts(command_name: str, tmp_path: Path) -> None:
    args = ["--engine", "vllm", "--device", "cuda:0", "--tensor-parallel-size", "2", "--token", "t"]
    result = runner.invoke(app, [command_name, "--store", str(tmp_path / "store"), "--base", str(tmp_path / "no-model"), *args])
    assert result.exit_code == 2 and "--device cuda:0 names one GPU but --tensor-parallel-size is 2" in " ".join(result.output.split()), result.output
    assert not (tmp_path / "store").exists()


def test_the_command_shows_its_options_without_loading_torch() -> None:
    probe = "import sys, adapter_fusion.cli; print(sorted(m for m in ('torch', 'ray', 'grpc') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "[]"
