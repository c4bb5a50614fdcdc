"""`adapter-fusion serve` as a user runs it: a real process, the example client against it,
Prometheus metrics, TLS, and a graceful drain on SIGTERM."""

from __future__ import annotations

import datetime
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapter_fusion.client import Client
from adapter_fusion.v1 import adapter_fusion_pb2 as pb

ROOT = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(address: str, credentials: grpc.ChannelCredentials | None = None) -> int | None:
    """The server's health status, or None when nothing answers."""
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    try:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status
    except grpc.RpcError:
        return None
    finally:
        channel.close()


def wait_serving(address: str, credentials: grpc.ChannelCredentials | None = None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if health(address, credentials) == health_pb2.HealthCheckResponse.SERVING:
            return
        time.sleep(0.5)
    raise TimeoutError(f"server on {address} did not become healthy")


def first_error(call: Callable[[], object], timeout: float = 10) -> grpc.RpcError | None:
    """Repeat `call` until it fails or `timeout` passes: a server reacts to a signal soon, not at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            call()
        except grpc.RpcError as error:
            return error
        time.sleep(0.02)
    return None


@pytest.fixture
def serve_process(smollm2: Path, tmp_path: Path):
    started = []

    def start(*extra: str) -> tuple[subprocess.Popen, str]:
        port = free_port()
        cmd = [sys.executable, "-m", "adapter_fusion.cli", "serve", "--port", str(port), "--store", str(tmp_path / "store"), *extra]
        process = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started.append(process)
        return process, f"127.0.0.1:{port}"

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_defaults_example_client_metrics_and_graceful_drain(serve_process) -> None:
    metrics_port = free_port()
    process, address = serve_process("--metrics-port", str(metrics_port), "--grace", "30")
    wait_serving(address)
    example = subprocess.run([sys.executable, str(ROOT / "examples" / "grpc_client.py"), "--address", address], capture_output=True, text=True, timeout=300)
    assert example.returncode == 0, example.stdout + example.stderr
    assert "registered json-or-upper" in example.stdout and "composed (no merge) 4/4" in example.stdout  # each single: its half
    scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    for metric in ("adapter_fusion_rpcs_total", "adapter_fusion_generated_tokens_total", "adapter_fusion_queue_depth", "adapter_fusion_time_to_first_token_seconds"):
        assert metric in scraped

    with Client(address) as client:  # a stream in flight when SIGTERM arrives is finished, not cut
        stream = client.generate(messages=[{"role": "user", "content": "Write a long story about rivers."}], max_new_tokens=48)
        first = next(stream)
        process.send_signal(signal.SIGTERM)
        refused = first_error(client.list_adapters)  # no new work while draining
        assert refused is not None and refused.code() == grpc.StatusCode.UNAVAILABLE
        # refused by a server that is still up and draining (a stopped one is UNAVAILABLE too)
        assert health(address) == health_pb2.HealthCheckResponse.NOT_SERVING
        rest = list(stream)
        assert rest[-1].finish_reason in ("length", "stop")
        assert sum(len(m.token_ids) for m in [first, *rest]) == rest[-1].usage.completion_tokens
    assert process.wait(timeout=60) == 0
    log = process.stdout.read()
    assert "serving SmolLM2-135M-Instruct on 127.0.0.1" in log and "draining" in log


def test_tls(serve_process, tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    process, address = serve_process("--tls-cert", "cert.pem", "--tls-key", "key.pem", "--preload", str(ROOT / "examples" / "adapters" / "uppercase"))
    address = address.replace("127.0.0.1", "localhost")
    credentials = grpc.ssl_channel_credentials((tmp_path / "cert.pem").read_bytes())
    wait_serving(address, credentials)
    with Client(address, root_certificate=tmp_path / "cert.pem") as client:
        assert [a.name for a in client.list_adapters()] == ["uppercase"]
    with Client(address) as plaintext:  # a plaintext client cannot talk to a TLS server
        with pytest.raises(grpc.RpcError) as info:
            plaintext.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
