"""Serving engines behind one protocol (`engines.base.ServingEngine`): the builtin engine
(`adapter_fusion.engines.builtin`, the embedded default) and vLLM (`engines.vllm_engine`, optional)."""
