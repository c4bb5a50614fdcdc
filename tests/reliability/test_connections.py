"""Hostile connections on loopback: sockets that send only the start of the HTTP/2 preface are
closed within the configured handshake timeout, connections past the cap are closed at once, and
while sockets flood PING frames without reading, a normal client is served the same tokens."""

from __future__ import annotations

import shutil
import socket
import struct
import threading
import time
from pathlib import Path

from adapter_fusion.client import Client
from adapter_fusion.server.app import ServerConfig
from adapter_fusion.server.connections import ConnectionLimits

from .conftest import SERVING, bump, greedy, health_status, load, serving

PREFACE_START = b"PRI * HTTP/2.0\r\n"  # what the attack sent, and nothing more
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS, PING = 0x4, 0x6


def frame(kind: int, payload: bytes = b"", flags: int = 0, stream: int = 0) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def closed_after(sock: socket.socket, start: float, limit: float) -> float | None:
    """Seconds from `start` until the server closes `sock` (EOF or reset), reading whatever it
    sends first; None if still open at `start + limit`."""
    while (left := start + limit - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return time.monotonic() - start
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - start
        except TimeoutError:
            return None
    return None


def _config(tmp_path: Path, tok_base: Path, tok_adapters: list[Path], connections: ConnectionLimits) -> ServerConfig:
    shutil.copytree(tok_adapters[0], tmp_path / "adapters" / "alpha")
    return ServerConfig(base_dir=tok_base, store_dir=tmp_path / "store", adapter_roots=[tmp_path / "adapters"], port=0, connections=connections)


def test_silent_sockets_are_closed_within_the_handshake_timeout(tmp_path: Path, tok_base: Path, tok_adapters: list[Path]) -> None:
    timeout = 1.0
    with serving(_config(tmp_path, tok_base, tok_adapters, ConnectionLimits(handshake_timeout_s=timeout))) as server, Client(server.address) as client:
        load(client, "alpha", "alpha")
        before = greedy(client, "alpha", tokens=4)
        host, port = server.address.rsplit(":", 1)
        start = time.monotonic()
        silent = [socket.create_connection((host, int(port)), timeout=2.0) for _ in range(50)]
        try:
            for sock in silent:
                sock.sendall(PREFACE_START)
            assert health_status(server.address, timeout=2.0) == SERVING  # served while they hang
            assert greedy(client, "alpha", tokens=4, timeout=5.0) == before
            closed = [closed_after(sock, start, timeout + 2.0) for sock in silent]
        finally:
            for sock in silent:
                sock.close()
        still_open = sum(t is None for t in closed)
        assert still_open == 0, f"{still_open} of 50 silent sockets still open {timeout + 2.0} s after connecting"
        assert max(closed) < timeout + 2.0
        assert greedy(client, "alpha", tokens=4, timeout=5.0) == before
        bump("silent_sockets_closed", len(closed))
        print(f"50 silent sockets closed {min(closed):.2f}..{max(closed):.2f} s after connecting (handshake timeout {timeout} s)")


def test_connections_past_the_cap_are_closed_at_once(tmp_path: Path, tok_base: Path, tok_adapters: list[Path]) -> None:
    limits = ConnectionLimits(handshake_timeout_s=30.0, max_connections=8)
    with serving(_config(tmp_path, tok_base, tok_adapters, limits)) as server:
        host, port = server.address.rsplit(":", 1)
        held = [socket.create_connection((host, int(port)), timeout=2.0) for _ in range(8)]
        try:
            for sock in held:
                sock.sendall(PREFACE_START)
            extra = socket.create_connection((host, int(port)), timeout=2.0)
            with extra:
                took = closed_after(extra, time.monotonic(), 5.0)
            assert took is not None and took < 5.0, "a connection past max_connections was kept open"
            assert all(closed_after(sock, time.monotonic(), 0.2) is None for sock in held)  # the first 8 stay
        finally:
            for sock in held:
                sock.close()
        assert health_status(server.address, timeout=5.0) == SERVING  # their slots are free again
        bump("connections_refused_over_cap")


def _flood(sock: socket.socket, limit: float) -> tuple[float | None, int]:
    """Send PINGs without ever reading until the server closes `sock` (seconds, PINGs sent) or
    `limit` passes (None). A send the server stops reading blocks; it is retried until then."""
    burst, sent, start = frame(PING, b"\0" * 8) * 512, 0, time.monotonic()
    sock.sendall(PREFACE + frame(SETTINGS))
    sock.settimeout(0.2)
    while time.monotonic() - start < limit:
        try:
            sock.sendall(burst)
            sent += 512
        except TimeoutError:
            continue  # the server stopped reading: still open
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - start, sent
    return None, sent


def test_a_ping_flood_leaves_a_normal_stream_and_health_answering(tmp_path: Path, tok_base: Path, tok_adapters: list[Path]) -> None:
    """gRPC core's ping strikes close a flooder only once their GOAWAY is written, which a peer
    that never reads can prevent, and core has no other control (see `adapter_fusion.server.connections`). What
    this server guarantees meanwhile: a normal Generate gives the same tokens, health answers, and
    every flooder is either closed or no longer read within 10 s (its cost bounded)."""
    with serving(_config(tmp_path, tok_base, tok_adapters, ConnectionLimits())) as server, Client(server.address) as client:
        load(client, "alpha", "alpha")
        before = greedy(client, "alpha", tokens=8)
        host, port = server.address.rsplit(":", 1)
        floods = [socket.create_connection((host, int(port)), timeout=2.0) for _ in range(4)]
        for sock in floods:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the server's ACKs back up at once
        results: list[tuple[float | None, int]] = [(None, 0)] * 4
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, _flood(floods[i], 10.0))) for i in range(4)]
        for thread in threads:
            thread.start()
        during = greedy(client, "alpha", tokens=8, timeout=20.0)  # a normal stream while they flood
        for thread in threads:
            thread.join(timeout=15.0)
        for sock in floods:
            sock.close()
        assert during == before
        assert all(ended is not None or sent < 10**6 for ended, sent in results), results  # read ~225k PINGs at most
        assert health_status(server.address, timeout=5.0) == SERVING
        bump("ping_flood_pings_sent", sum(sent for _, sent in results))
        print(f"PING floods closed after {[e and round(e, 2) for e, _ in results]} s (None: open, no longer read), {[n for _, n in results]} PINGs each; a normal Generate gave the same tokens")
