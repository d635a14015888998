"""Triton Python-backend model (decoupled) that serves an LLMService.

``execute`` only validates and queues: every request joins the continuous-batching
engine, whose own thread runs one decode step at a time for all running sequences and
sends each sequence's text through that request's response sender as it is produced.
A request that arrives while others generate joins at the next step. The logic lives
in :mod:`tritonop_backend.llm`; this file only moves tensors and responses.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import triton_python_backend_utils as pb_utils

from tritonop_backend import check_release
from tritonop_backend.cpus import available_cpus
from tritonop_backend.llm.engine import LLMEngine
from tritonop_backend.llm.loading import load_causal_lm
from tritonop_backend.llm.prefix import DEFAULT_BUDGET_BYTES
from tritonop_backend.llm.serving import (
    INPUTS,
    INTERNAL,
    INVALID,
    UNAVAILABLE,
    Outputs,
    Refusal,
    Server,
    policy_from_parameters,
)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CODES = {INVALID: "INVALID_ARG", UNAVAILABLE: "UNAVAILABLE", INTERNAL: "INTERNAL"}
"""Our error kinds as ``TritonError`` codes (looked up late: the stub binds them after import)."""
SHUTDOWN_SECONDS = 30.0


class _Request:
    """One Triton request as the server sees it: its inputs, its sender, its cancellation."""

    def __init__(self, request: Any) -> None:
        self.request = request
        self.sender = request.get_response_sender()

    def read(self) -> dict[str, Any]:
        values = {}
        for name in INPUTS:
            tensor = pb_utils.get_input_tensor_by_name(self.request, name)
            values[name] = None if tensor is None else tensor.as_numpy()
        return values

    def send(self, outputs: Outputs | None, final: bool, error: Refusal | None = None) -> None:
        if error is not None:
            response = pb_utils.InferenceResponse(
                error=pb_utils.TritonError(error.message,
                                           getattr(pb_utils.TritonError, CODES[error.kind])))
        else:
            assert outputs is not None
            response = pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, value) for name, value in outputs.items()])
        self.sender.send(response, flags=FINAL if final else 0)

    def is_cancelled(self) -> bool:
        return bool(self.request.is_cancelled())


def _device(args: dict[str, Any], wanted: str) -> str:
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{args['model_instance_device_id']}"
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


class _Metrics:
    """Engine metrics on Triton's /metrics endpoint, next to Triton's own.

    Generated tokens per engine step is the batching factor: 1.0 means requests ran one
    at a time; continuous batching pushes it toward the number of running sequences.
    """

    def __init__(self, model: str, instance: str) -> None:
        labels = {"model": model, "instance": instance}
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        # Triton drops a metric whose family is garbage-collected: keep the families.
        self.families = [
            pb_utils.MetricFamily("tritonop_llm_steps_total",
                                  "Engine steps (one batched forward pass each)", counter),
            pb_utils.MetricFamily("tritonop_llm_generated_tokens_total", "Tokens generated",
                                  counter),
            pb_utils.MetricFamily("tritonop_llm_running_sequences",
                                  "Sequences holding a slot (in the batch or prefilled in chunks)",
                                  gauge),
            pb_utils.MetricFamily("tritonop_llm_waiting_requests",
                                  "Requests waiting for a slot", gauge),
        ]
        self.steps, self.tokens, self.running, self.waiting = (
            family.Metric(labels) for family in self.families)

    def step(self, engine: LLMEngine, events: list[Any]) -> None:
        self.steps.increment(1)
        self.tokens.increment(sum(len(event.token_ids) for event in events))
        self.running.set(engine.running)
        self.waiting.set(engine.waiting)


class TritonPythonModel:
    """Decoupled LLM model: requests in, streams of responses out."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        check_release(params.get("tritonop_version"))
        self.policy = policy_from_parameters(params)
        # Set deliberately: the server starts stubs with OMP_NUM_THREADS=1.
        threads = params.get("threads", "auto")
        torch.set_num_threads(available_cpus() if threads == "auto" else int(threads))
        loaded = load_causal_lm(params["model_dir"], params.get("dtype", "auto"),
                                _device(args, params.get("device", "auto")),
                                trust_remote_code=params.get("trust_remote_code") == "true")
        if loaded.note:
            pb_utils.Logger.log_warn(loaded.note)
        pb_utils.Logger.log_info(f"{args['model_name']}: {params['model_dir']} loaded on "
                                 f"{loaded.device} in {str(loaded.dtype).removeprefix('torch.')}")
        # None lets the engine decide: CUDA graphs where the model is on a GPU.
        graphs = params.get("cuda_graphs", "true") == "true"
        engine = LLMEngine(loaded.model, loaded.tokenizer, self.policy,
                           max_sequences=int(params["max_sequences"]),
                           max_waiting=int(params["max_waiting"]),
                           static_decode=None if graphs else False,
                           prefix_cache_bytes=int(params.get("prefix_cache_bytes",
                                                             DEFAULT_BUDGET_BYTES)))
        self.metrics = _Metrics(args["model_name"], args["model_instance_name"])
        self.server = Server(engine, streaming=params.get("streaming", "true") == "true",
                             on_step=self.metrics.step)
        self.server.start()

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            try:
                handle = _Request(request)
            except Exception as err:  # no sender, no way to answer: Triton logs the rest
                pb_utils.Logger.log_error(f"LLM request without a sender: {err}")
                continue
            self.server.accept(handle.read, handle)
        return None

    def is_ready(self) -> bool:
        """Triton's readiness hook (python_backend r26.03 and later call it on
        /v2/models/<m>/ready): false once the engine has failed for good, so that the
        pod is taken out of service and restarted instead of failing every request."""
        return self.server.ready

    def finalize(self) -> None:
        # In-flight requests are cancelled and each gets its final response first.
        self.server.shutdown(timeout=SHUTDOWN_SECONDS)
