"""Our compositions inside vLLM's own OpenAI-compatible server: a `LoRAResolver` registered as a
vLLM general plugin (entry point group `vllm.general_plugins`), so `model` in a request may name a
store entry, an exact weighted mix (`mix:a=0.5+b=-0.25`) or a recipe (`recipe:NAME`); see
`adapter_fusion.lora_names` for what each means. vLLM composes nothing itself.

Configured by the environment (read when vLLM loads its plugins):
- ADAPTER_FUSION_STORE: the adapter store `adapter-fusion serve` writes (default <cache>/store);
- ADAPTER_FUSION_MIX_CACHE: where composed mixes and recipes are written (default <cache>/vllm-mixes);
- ADAPTER_FUSION_RECIPES: a directory of recipe files (optional);
- ADAPTER_FUSION_MAX_LORA_RANK: vLLM's --max-lora-rank (default 16), the rank above which a mix is
  truncated exactly; ADAPTER_FUSION_MAX_MIX_SOURCES: adapters in one mix (default 64).
vLLM needs `--enable-lora` and VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 to resolve names at run time.
A name that cannot be served is refused with one log line and None, so vLLM answers 404 and keeps
serving; the composing runs on a worker thread, off vLLM's event loop.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from adapter_fusion.errors import AdapterFusionError
from adapter_fusion.lora_names import Limits, LoraNames
from adapter_fusion.models import cache_dir
from adapter_fusion.worker_threads import in_thread

log = logging.getLogger("vllm.adapter_fusion")  # under vLLM's logger: its handler and level
RESOLVER_NAME = "adapter-fusion"


class CompositionResolver(LoRAResolver):
    def __init__(self, names: LoraNames) -> None:
        self.names = names

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        try:
            found = await in_thread(self.names.resolve, lora_name, base_model_name)
        except AdapterFusionError as error:  # the name's own problem: said as it is
            log.warning("adapter-fusion cannot serve LoRA %r: %s", lora_name[:200], error)
            return None
        except Exception:  # anything else is ours: logged with its traceback, and still a refusal, never a 500
            log.exception("adapter-fusion failed to resolve LoRA %r", lora_name[:200])
            return None
        how = "composed" if found.built else "found"
        log.info("adapter-fusion %s LoRA %r: rank %d, truncation error %.2e, %s", how, lora_name[:200], found.rank, found.relative_error, found.path)
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(found.path))  # vLLM assigns the id


def names_from_environment() -> LoraNames:
    env = os.environ.get
    limits = Limits(max_rank=int(env("ADAPTER_FUSION_MAX_LORA_RANK", 16)), max_sources=int(env("ADAPTER_FUSION_MAX_MIX_SOURCES", 64)))
    store = Path(env("ADAPTER_FUSION_STORE") or cache_dir() / "store")
    cache = Path(env("ADAPTER_FUSION_MIX_CACHE") or cache_dir() / "vllm-mixes")
    return LoraNames(store, cache, env("ADAPTER_FUSION_RECIPES") or None, limits)


def register() -> None:
    """vLLM's entry point: called in each of its processes; only its API server resolves names."""
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, CompositionResolver(names_from_environment()))
