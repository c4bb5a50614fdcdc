"""What a replica hands the ingress besides messages: a failure with its status code, and which
replica served (for trailing metadata). Plain picklable objects; no Ray, no model."""

from __future__ import annotations

from dataclasses import dataclass

from adapter_fusion.routing import LOADS_KEY, REPLICA_KEY


class RpcFailure(Exception):
    """A call's final status: `code` is a grpc.StatusCode name, `details` what the client reads.
    `replica_died`: the replica went away mid-call (the ingress may retry on another)."""

    def __init__(self, code: str, details: str, replica_died: bool = False) -> None:
        super().__init__(code, details, replica_died)  # args, so that pickling rebuilds it
        self.code, self.details, self.replica_died = code, details, replica_died

    def __str__(self) -> str:
        return f"{self.code}: {self.details}"


@dataclass(frozen=True)
class ReplicaTag:
    """Which replica served a call, and its adapter loads so far (the benchmark counts them)."""

    replica_id: str
    loads: int

    def metadata(self) -> list[tuple[str, str]]:
        return [(REPLICA_KEY, self.replica_id), (LOADS_KEY, str(self.loads))]
