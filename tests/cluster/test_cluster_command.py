"""`adapter-fusion cluster` refuses what cannot work before Ray starts or a model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapter_fusion.cli import app
from adapter_fusion.cluster.launch import ClusterConfig, check
from adapter_fusion.errors import InvalidRequestError
from adapter_fusion.server.app import ServerConfig

pytestmark = pytest.mark.cluster
runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "refusing to serve 0.0.0.0 in plaintext without a token"),  # the proxy listens on every interface
        (["--token", "t", "--replicas", "0"], "replicas and ingress replicas must be at least 1"),
        (["--token", "t", "--adapters-per-replica", "0"], "adapters per replica must be at least 1"),
    ],
)
def test_the_command_refuses_settings_that_cannot_work(args: list[str], message: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["cluster", "--store", str(tmp_path / "store"), *args])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "store").exists()  # nothing was started or written


def test_tls_is_refused_with_what_to_do_instead(tmp_path: Path) -> None:
    server = ServerConfig(base_dir=tmp_path, store_dir=tmp_path / "store", token="t", tls_cert=tmp_path / "c.pem", tls_key=tmp_path / "k.pem")
    with pytest.raises(InvalidRequestError, match="plaintext only: terminate TLS in front of it"):
        check(ClusterConfig(server))


def test_a_serve_config_is_checked_like_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`app_builder` (KubeRay's serveConfigV2 imports it): unknown keys and a missing token are refused."""
    from pydantic import ValidationError
    from ray import serve

    from adapter_fusion.cluster.launch import app_builder
    from adapter_fusion.server.app import InsecureBindError

    paths = {"base": str(tmp_path / "base"), "store": str(tmp_path / "store")}
    with pytest.raises(ValidationError, match="colour"):
        app_builder({**paths, "colour": "red"})
    monkeypatch.delenv("ADAPTER_FUSION_TOKEN", raising=False)
    with pytest.raises(InsecureBindError, match="without a token"):
        app_builder(paths)
    monkeypatch.setenv("ADAPTER_FUSION_TOKEN", "from-a-secret")
    assert isinstance(app_builder({**paths, "replicas": 3}), serve.Application)


def test_the_kuberay_example_matches_the_code() -> None:
    """examples/kuberay/rayservice.yaml: its args parse, it registers our servicers, its Ray is ours."""
    import ray
    import yaml

    from adapter_fusion.cluster.launch import AppArgs
    from adapter_fusion.cluster.proxy_servicers import SERVICER_FUNCTIONS

    docs = list(yaml.safe_load_all((Path(__file__).parents[2] / "examples" / "kuberay" / "rayservice.yaml").read_text()))
    service = next(d for d in docs if d["kind"] == "RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_config["grpc_options"]["grpc_servicer_functions"] == SERVICER_FUNCTIONS
    application = serve_config["applications"][0]
    assert application["import_path"] == "adapter_fusion.cluster.launch:app_builder"
    AppArgs.model_validate(application["args"])
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__


def test_app_builder_takes_every_serving_option_but_the_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its args are `AppArgs` (tests/test_settings.py checks each reaches the replicas' config)."""
    from pydantic import ValidationError
    from ray import serve

    from adapter_fusion.cluster.launch import app_builder

    paths = {"base": str(tmp_path / "base"), "store": str(tmp_path / "store")}
    monkeypatch.setenv("ADAPTER_FUSION_TOKEN", "from-a-secret")
    with pytest.raises(ValidationError, match=r"token: set \$ADAPTER_FUSION_TOKEN"):
        app_builder({**paths, "token": "in-the-file"})
    with pytest.raises(ValidationError, match="tls_cert\n  Extra inputs are not permitted"):
        app_builder({**paths, "tls_cert": "cert.pem"})
    with pytest.raises(ValidationError, match="max_batch\n  Input should be greater than or equal to 1"):
        app_builder({**paths, "max_batch": -3})
    options = {"max_queue": 7, "max_prompt_tokens": 100, "engine": "vllm", "max_lora_rank": 64, "device": "cpu", "store_quota_mb": 5}
    assert isinstance(app_builder({**paths, **options}), serve.Application)
