"""vLLM's side of the vLLM engine: the knobs a serving team sets, the engine started in this process
for this machine, and our requests in vLLM's terms (sampling, prompt logprobs, LoRA requests).
vLLM is imported only here and only when called: the package imports without it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from adapter_fusion.adapters import Adapter
from adapter_fusion.decoding import Request
from adapter_fusion.engines.vllm_loras import Lora
from adapter_fusion.errors import IncompatibleAdaptersError, InvalidRequestError
from adapter_fusion.limits import Limits
from adapter_fusion.vllm_env import cpu_environment


@dataclass(frozen=True)
class VllmSettings:
    """The vLLM knobs a serving team sets (`serve --engine vllm`)."""

    max_loras: int = 8  # distinct LoRAs in one batch
    max_lora_rank: int = 16  # a larger adapter is refused; a larger mix is truncated to it (SVD, error reported)
    max_cpu_loras: int | None = None  # LoRAs vLLM keeps in host memory (None: vLLM's default, max_loras)
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None  # None: the model's
    tensor_parallel_size: int = 1
    max_mixes: int = 32  # weighted mixes kept as LoRAs, least recently used dropped


def check_rank(adapter: Adapter, settings: VllmSettings) -> None:
    """Refuse an adapter vLLM's LoRA buffers cannot hold, naming the flag to change."""
    rank = max(adapter.ranks.values(), default=0)
    if rank > settings.max_lora_rank:
        raise IncompatibleAdaptersError(
            f"adapter {adapter.name!r} has rank {rank}, over this vLLM engine's --max-lora-rank {settings.max_lora_rank}; "
            "restart with a larger --max-lora-rank, or compose it with `rank` set"
        )


def device_environment(device: str | None, tensor_parallel_size: int = 1, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """What vLLM's environment must say for it to run on `--device` (it takes no device argument: it
    uses its platform's first visible devices). cpu, cuda or none: nothing to set; cuda:N: only that
    GPU visible (N counts within an existing CUDA_VISIBLE_DEVICES, as torch counts). Anything else
    is refused with what to do instead."""
    if device in (None, "cpu", "cuda"):
        return {}
    kind, _, index = device.partition(":")
    if kind != "cuda" or not index.isdigit():
        raise InvalidRequestError(f"--engine vllm runs on cpu or cuda, not --device {device}")
    if tensor_parallel_size > 1:
        raise InvalidRequestError(
            f"--device {device} names one GPU but --tensor-parallel-size is {tensor_parallel_size}: "
            "set CUDA_VISIBLE_DEVICES to the GPUs to use and pass --device cuda"
        )
    visible = [d.strip() for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()] if "CUDA_VISIBLE_DEVICES" in environ else None
    if visible is not None and int(index) >= len(visible):
        raise InvalidRequestError(f"--device {device}: CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']} shows {len(visible)} GPU(s), numbered from 0")
    return {"CUDA_VISIBLE_DEVICES": visible[int(index)] if visible is not None else index}


def start_vllm(base_dir: Path, limits: Limits, settings: VllmSettings, targets: list[str], dtype: str | None, device: str | None = None):
    """vLLM's `LLMEngine` in this process (one process: no engine-core child; several for tensor
    parallelism), configured for this machine (`vllm_env.cpu_environment`, read by its CPU build
    only) and on `device` (`device_environment`)."""
    placed = device_environment(device, settings.tensor_parallel_size)
    if placed and placed["CUDA_VISIBLE_DEVICES"] != os.environ.get("CUDA_VISIBLE_DEVICES"):
        import torch

        if torch.cuda.is_initialized():  # too late: the visible GPUs are fixed once CUDA starts
            raise InvalidRequestError(f"CUDA is already in use in this process, so vLLM cannot be moved to --device {device}: start the process with CUDA_VISIBLE_DEVICES={placed['CUDA_VISIBLE_DEVICES']} and --device cuda")
    os.environ.update(placed)
    for key, value in cpu_environment().items():
        os.environ.setdefault(key, value)
    # the host owns logging: vLLM's own setup (at its import) runs dictConfig, which closes every handler
    # of the process (a Ray Serve replica's log file among them); its records go to the root logger instead
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0" if settings.tensor_parallel_size == 1 else "1")
    from vllm import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    args = EngineArgs(
        model=str(base_dir), dtype=dtype or "auto", enable_lora=True, max_loras=settings.max_loras,
        max_lora_rank=settings.max_lora_rank, max_cpu_loras=settings.max_cpu_loras,
        lora_target_modules=targets,  # never the output head: its LoRA wrapper breaks prompt logprobs on the CPU build
        gpu_memory_utilization=settings.gpu_memory_utilization, max_model_len=settings.max_model_len,
        tensor_parallel_size=settings.tensor_parallel_size, max_num_seqs=limits.max_batch, disable_log_stats=True,
    )
    return LLMEngine.from_engine_args(args)


def sampling_params(request: Request, stop_ids: set[int]):
    """A generation's settings as vLLM's, streamed as deltas; it stops where ours stops."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        max_tokens=request.max_new_tokens, temperature=request.temperature, top_p=request.top_p, top_k=request.top_k or -1,
        seed=request.seed if request.temperature > 0 else None, stop=list(request.stop) or None,
        stop_token_ids=sorted(stop_ids), output_kind=RequestOutputKind.DELTA, skip_special_tokens=True,
    )


def scoring_params():
    """One token generated, the log-probability of every prompt token given the ones before it."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)


def target_nll(output, target: list[int]) -> float:
    """The summed negative log-likelihood of `target`, the last tokens of a scored prompt
    (`prompt_logprobs[i]`: {token i: its logprob given the tokens before it}; entry 0 is None)."""
    start = len(output.prompt_token_ids) - len(target)
    return -sum(output.prompt_logprobs[start + j][token].logprob for j, token in enumerate(target))


def lora_request(lora: Lora | None):
    if lora is None:
        return None
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora.name, lora.lora_id, str(lora.path))
