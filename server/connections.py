"""What one client connection may hold on this server, as gRPC core's server options.

Without them a socket that sends only the HTTP/2 preface keeps its file descriptor for gRPC's
default 120 s handshake deadline, so ~20,000 of them lock every client out; streams per
connection and idle connections are unbounded. `options()` turns `ConnectionLimits` into channel
arguments (every name checked against grpcio 1.85's core); `raise_fd_limit()` lifts the soft
descriptor limit to the hard one and reserves descriptors the server itself needs (store, model,
logs) out of the connection cap.

gRPC core has no rate limit on control frames; a PING flood is bounded by its ping-strike policy
(`max_ping_strikes`, `min_ping_interval_s`: GOAWAY too_many_pings), which closes the connection
only once that GOAWAY is written. Measured on grpcio 1.85.4 against one flooder that never reads:
in about half the runs it was closed after its first 1,024 PINGs; in the others the GOAWAY sat
behind unread ACKs and the server read ~225,000 PINGs in ~8 s (~3.5 s of CPU) before it stopped
reading, then held the connection (4 such flooders: one of them, 239,104 PINGs, still open after
10 s even with max_age 2 s + grace 1 s). Core offers no control for that case; the README names the
proxy settings that bound it.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

from adapter_fusion.errors import InvalidRequestError

log = logging.getLogger("adapter_fusion.server")
FD_RESERVE = 256  # descriptors kept for the server's own files beyond the connection cap


@dataclass(frozen=True)
class ConnectionLimits:
    handshake_timeout_s: float = 5.0  # until the client's HTTP/2 SETTINGS (and TLS) arrive; silent sockets are closed
    max_connections: int = 10_000  # open client connections; more are closed at accept (capped by the fd limit)
    # None below: gRPC's own default. Setting these four together broke the graceful drain of
    # `adapter-fusion serve` (tests/test_serve_command.py: an in-flight stream got "Cancelling all
    # calls"), not yet understood, so they are opt-in.
    max_streams_per_connection: int | None = None  # concurrent calls on one connection (SETTINGS_MAX_CONCURRENT_STREAMS)
    idle_timeout_s: float | None = None  # a connection with no call for this long gets GOAWAY
    max_age_s: float | None = None  # GOAWAY after this; calls get `max_age_grace_s` to finish
    max_age_grace_s: float = 30.0
    max_ping_strikes: int | None = None  # pings more often than `min_ping_interval_s` tolerated before GOAWAY (gRPC: 2)
    min_ping_interval_s: float | None = None  # while no call runs (gRPC: 300 s)

    def __post_init__(self) -> None:
        positive = {
            "handshake_timeout_s": self.handshake_timeout_s,
            "max_connections": self.max_connections,
            "max_streams_per_connection": self.max_streams_per_connection,
            "idle_timeout_s": self.idle_timeout_s,
            "min_ping_interval_s": self.min_ping_interval_s,
            "max_age_s": self.max_age_s,
        }
        for name, value in positive.items():
            if value is not None and not value > 0:
                raise InvalidRequestError(f"{name} must be positive, got {value!r}")
        if (self.max_ping_strikes is not None and self.max_ping_strikes < 0) or self.max_age_grace_s < 0:
            raise InvalidRequestError("max_ping_strikes and max_age_grace_s must be >= 0")


def _ms(seconds: float) -> int:
    return max(1, min(int(seconds * 1000), 2**31 - 1))


def options(limits: ConnectionLimits, max_connections: int) -> list[tuple[str, int]]:
    """gRPC core channel arguments for a server; `max_connections` already fitted to the fd limit."""
    args = [
        ("grpc.server_handshake_timeout_ms", _ms(limits.handshake_timeout_s)),
        ("grpc.max_allowed_incoming_connections", max_connections),
    ]
    if limits.max_streams_per_connection is not None:
        args.append(("grpc.max_concurrent_streams", limits.max_streams_per_connection))
    if limits.idle_timeout_s is not None:
        args.append(("grpc.max_connection_idle_ms", _ms(limits.idle_timeout_s)))
    if limits.max_ping_strikes is not None:
        args.append(("grpc.http2.max_ping_strikes", limits.max_ping_strikes))
    if limits.min_ping_interval_s is not None:
        args.append(("grpc.http2.min_ping_interval_without_data_ms", _ms(limits.min_ping_interval_s)))
    if limits.max_age_s is not None:
        args += [("grpc.max_connection_age_ms", _ms(limits.max_age_s)), ("grpc.max_connection_age_grace_ms", _ms(limits.max_age_grace_s))]
    return args


def raise_fd_limit(max_connections: int) -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit (logging both) and return the connection cap
    that leaves `FD_RESERVE` descriptors for the server's own files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, max_connections + FD_RESERVE)
    if soft != resource.RLIM_INFINITY and target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as error:
            log.warning("could not raise the file descriptor limit from %d to %d: %s", soft, target, error)
    log.info("file descriptors: soft limit %s, hard limit %s", soft, hard)
    room = soft - FD_RESERVE if soft != resource.RLIM_INFINITY else max_connections
    if max_connections > room:
        log.warning("max_connections %d exceeds what %s descriptors allow; capped at %d", max_connections, soft, max(1, room))
        return max(1, room)
    return max_connections
