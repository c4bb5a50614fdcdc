"""Score jobs on the vLLM engine's thread: one vLLM request per example (its prompt and target as
one prompt, each with its own LoRA), the summed target NLL read from vLLM's prompt logprobs, the
job's result set when its last row is in. Called only on the engine thread."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from adapter_fusion.engines.vllm_loras import Lora
from adapter_fusion.engines.vllm_setup import lora_request, scoring_params, target_nll
from adapter_fusion.errors import InvalidRequestError, RequestCancelledError
from adapter_fusion.work import Job


@dataclass(eq=False)
class Scoring:
    """A Score job: its examples' targets and LoRAs; the sums arrive by row."""

    job: Job
    targets: list[list[int]]
    loras: list[Lora | None]
    nll: dict[int, float] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)


class ScoreRows:
    def __init__(self, llm, ids: itertools.count, end_job: Callable[[Job, Exception | None, Scoring | None], None], cancelled: str) -> None:
        self.llm, self._ids, self._end_job, self._cancelled = llm, ids, end_job, cancelled
        self._rows: dict[str, tuple[Scoring, int]] = {}  # vLLM id -> (its job, its row)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._rows

    def __bool__(self) -> bool:
        return bool(self._rows)

    def add(self, scoring: Scoring, prompts: list[list[int]]) -> None:
        job = scoring.job
        if job.cancelled.is_set() or not job.future.set_running_or_notify_cancel():
            return self._end_job(job, RequestCancelledError(self._cancelled), scoring)
        for row, (prompt, target) in enumerate(zip(prompts, scoring.targets)):
            rid = f"s{next(self._ids)}"
            try:
                self.llm.add_request(rid, {"prompt_token_ids": prompt + target}, scoring_params(), lora_request=lora_request(scoring.loras[row]))
            except (ValueError, TypeError) as error:  # vLLM refused it (e.g. over max_model_len)
                self._abort(scoring)
                return self._end_job(job, InvalidRequestError(f"vLLM refused example {row}: {error}"), scoring)
            scoring.ids.append(rid)
            self._rows[rid] = (scoring, row)

    def deliver(self, output) -> None:
        scoring, row = self._rows.pop(output.request_id)
        if not output.finished or scoring.job.future.done():
            return
        scoring.nll[row] = target_nll(output, scoring.targets[row])
        if len(scoring.nll) == len(scoring.targets):
            scoring.job.future.set_result(torch.tensor([scoring.nll[r] for r in range(len(scoring.targets))], dtype=torch.float64))
            self._end_job(scoring.job, None, scoring)

    def cancel(self, cancelled: threading.Event) -> None:
        """Every job of a call (sharing `cancelled`) leaves vLLM now."""
        for scoring in {s for s, _ in self._rows.values() if s.job.cancelled is cancelled}:
            self._abort(scoring)
            self._end_job(scoring.job, RequestCancelledError(self._cancelled), scoring)

    def take_all(self) -> dict[Job, Scoring]:
        """Every job still scoring (after a fault, or at stop), forgotten here."""
        jobs = {s.job: s for s, _ in self._rows.values()}
        self._rows.clear()
        return jobs

    def _abort(self, scoring: Scoring) -> None:
        live = [rid for rid in scoring.ids if self._rows.pop(rid, None) is not None]
        if live:
            self.llm.abort_request(live)
