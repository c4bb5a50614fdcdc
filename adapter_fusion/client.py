"""A small typed client over the generated stub (synchronous; one channel per client).

The same client talks to one server and to a cluster (`adapter-fusion cluster`): Generate and
Score carry the routing key Ray Serve multiplexes on (`adapter_fusion.routing`); a single
server ignores it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc

from adapter_fusion.routing import APPLICATION_KEY, MULTIPLEXED_KEY, routing_key
from adapter_fusion.v1 import adapter_fusion_pb2 as pb
from adapter_fusion.v1 import adapter_fusion_pb2_grpc as pb_grpc


def example_messages(pairs: Sequence[tuple[str, str]]) -> list[pb.Example]:
    return [pb.Example(input=i, target=t) for i, t in pairs]


def make_recipe(
    method: str,
    sources: dict[str, float],
    rank: int | None = None,
    seed: int = 0,
    examples: Sequence[tuple[str, str]] = (),
    source_examples: dict[str, Sequence[tuple[str, str]]] | None = None,
    raw: bool = False,
    **parameters,
) -> pb.Recipe:
    """A Recipe message from {adapter name: weight}; numeric parameters and string options split.
    Data-aware methods: `examples` (input, target) shared by all sources (learned), or
    `source_examples` per source name (regmean, fisher); `raw`: inputs are not chat messages."""
    if unknown := set(source_examples or {}) - set(sources):
        raise ValueError(f"source_examples names {sorted(unknown)}, which are not among the sources {sorted(sources)}")
    numbers = {k: float(v) for k, v in parameters.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    options = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in parameters.items() if k not in numbers}
    recipe = pb.Recipe(
        method=method,
        sources=[pb.Source(adapter=name, weight=weight, examples=example_messages((source_examples or {}).get(name, ()))) for name, weight in sources.items()],
        parameters=numbers,
        options=options,
        seed=seed,
        examples=example_messages(examples),
        raw=raw,
    )
    if rank is not None:
        recipe.rank = rank
    return recipe


class Client:
    """`application`: the Ray Serve application to call, needed only when a cluster runs several.
    `multiplex=False` sends no routing key (a cluster then routes Generate and Score at random:
    the benchmark's baseline)."""

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        token: str | None = None,
        root_certificate: Path | None = None,
        application: str | None = None,
        multiplex: bool = True,
    ) -> None:
        if root_certificate is not None:
            self.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(Path(root_certificate).read_bytes()))
        else:
            self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.AdapterFusionStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        if application:
            self.metadata += ((APPLICATION_KEY, application),)
        self.multiplex = multiplex

    def routed(self, request: pb.GenerateRequest | pb.ScoreRequest) -> tuple[tuple[str, str], ...]:
        """The metadata for a Generate or Score call: ours plus its routing key."""
        key = routing_key(request) if self.multiplex else ""
        return self.metadata + (((MULTIPLEXED_KEY, key),) if key else ())

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def load_adapter(self, name: str, path: str | Path, pin: bool = False) -> pb.AdapterInfo:
        return self.stub.LoadAdapter(pb.LoadAdapterRequest(name=name, path=str(path), pin=pin), metadata=self.metadata)

    def unload_adapter(self, name: str) -> None:
        self.stub.UnloadAdapter(pb.UnloadAdapterRequest(name=name), metadata=self.metadata)

    def list_adapters(self) -> list[pb.AdapterInfo]:
        return list(self.stub.ListAdapters(pb.ListAdaptersRequest(), metadata=self.metadata).adapters)

    def compose(self, name: str, recipe: pb.Recipe, pin: bool = False) -> pb.ComposeAdapterResponse:
        return self.stub.ComposeAdapter(pb.ComposeAdapterRequest(name=name, recipe=recipe, pin=pin), metadata=self.metadata)

    def generate(
        self,
        prompt: str | None = None,
        messages: list[dict] | None = None,
        adapter: str | None = None,
        recipe: pb.Recipe | None = None,
        timeout: float | None = None,
        **sampling,
    ) -> Iterator[pb.GenerateResponse]:
        """Stream responses; give `prompt` (raw text) or `messages` (chat), and an adapter, a recipe or neither."""
        request = pb.GenerateRequest(adapter=adapter, recipe=recipe, **sampling)
        if messages is not None:
            request.messages.CopyFrom(pb.Messages(messages=[pb.ChatMessage(**m) for m in messages]))
        else:
            request.prompt = prompt or ""
        return self.stub.Generate(request, metadata=self.routed(request), timeout=timeout)

    def chat(self, message: str, adapter: str | None = None, recipe: pb.Recipe | None = None, **sampling) -> str:
        """The whole reply to one user message."""
        stream = self.generate(messages=[{"role": "user", "content": message}], adapter=adapter, recipe=recipe, **sampling)
        return "".join(r.text for r in stream)

    def score(self, examples: list[tuple[str, str]], adapter: str | None = None, recipe: pb.Recipe | None = None, raw: bool = False) -> pb.ScoreResponse:
        request = pb.ScoreRequest(adapter=adapter, recipe=recipe, raw=raw, examples=example_messages(examples))
        return self.stub.Score(request, metadata=self.routed(request))

    def export_adapter(self, name: str, path: str | Path, dtype: str = "float32", overwrite: bool = False) -> pb.ExportAdapterResponse:
        request = pb.ExportAdapterRequest(name=name, path=str(path), dtype=dtype, overwrite=overwrite)
        return self.stub.ExportAdapter(request, metadata=self.metadata)

    def bake_model(self, adapter: str, output_path: str | Path, dtype: str = "", max_shard_bytes: int = 0, overwrite: bool = False) -> Iterator[pb.BakeModelProgress]:
        request = pb.BakeModelRequest(adapter=adapter, output_path=str(output_path), dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
        return self.stub.BakeModel(request, metadata=self.metadata)

    def search_weights(
        self,
        adapters: list[str],
        examples: list[tuple[str, str]],
        output_name: str,
        budget: int = 0,
        optimizer: str = "",
        seed: int = 0,
        l1: float | None = None,
        parallel: int = 0,
        raw: bool = False,
        method: str = "",
        per: str = "",
        lr: float | None = None,
        bound: float | None = None,
        batch_size: int = 0,
    ) -> Iterator[pb.SearchWeightsProgress]:
        """Composition weights fitted on examples (`method` "lorahub", the default, or "learned"):
        a stream of progress, the last message with the registered result. Zero or empty means
        the server's default (lorahub: 40 evaluations by NGOpt; learned: 30 Adam steps)."""
        request = pb.SearchWeightsRequest(
            adapters=adapters,
            examples=example_messages(examples),
            budget=budget,
            optimizer=optimizer,
            seed=seed,
            output_name=output_name,
            parallel=parallel,
            raw=raw,
            method=method,
            per=per,
            batch_size=batch_size,
            l1=l1,
            lr=lr,
            bound=bound,
        )
        return self.stub.SearchWeights(request, metadata=self.metadata)
