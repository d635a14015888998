"""Triton Python-backend model (decoupled) that serves an LLMService.

``execute`` only validates and queues: every request joins the continuous-batching
engine, whose own thread runs one decode step at a time for all running sequences and
sends each sequence's text through that request's response sender as it is produced.
A request that arrives while others generate joins at the next step. The logic lives
in :mod:`tritonop_backend.llm`; this file only moves tensors and responses.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from typing import Any

import torch
import triton_python_backend_utils as pb_utils

from tritonop_backend.errors import RequestError
from tritonop_backend.llm.engine import ERROR, LLMEngine, QueueFullError
from tritonop_backend.llm.loading import load_causal_lm
from tritonop_backend.llm.params import parse_request
from tritonop_backend.llm.serving import INPUTS, Deliveries, policy_from_parameters

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CANCEL_CHECK_SECONDS = 0.1


def _error(message: str, code: Any) -> Any:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


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
                                  "Sequences in the running batch", gauge),
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
        self.policy = policy_from_parameters(params)
        # Set deliberately: the server starts stubs with OMP_NUM_THREADS=1.
        threads = params.get("threads", "auto")
        torch.set_num_threads((os.cpu_count() or 1) if threads == "auto" else int(threads))
        self.streaming = params.get("streaming", "true") == "true"
        loaded = load_causal_lm(params["model_dir"], params.get("dtype", "auto"),
                                _device(args, params.get("device", "auto")))
        if loaded.note:
            pb_utils.Logger.log_warn(loaded.note)
        # None lets the engine decide: CUDA graphs where the model is on a GPU.
        graphs = params.get("cuda_graphs", "true") == "true"
        self.engine = LLMEngine(loaded.model, loaded.tokenizer, self.policy,
                                max_sequences=int(params["max_sequences"]),
                                max_waiting=int(params["max_waiting"]),
                                static_decode=None if graphs else False)
        self.metrics = _Metrics(args["model_name"], args["model_instance_name"])
        self.deliveries = Deliveries()
        self.requests: dict[int, tuple[Any, Any]] = {}  # id -> (request, response sender)
        self.ids = itertools.count()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.loop = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self.loop.start()

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            self._accept(request)
        return None

    def _accept(self, request: Any) -> None:
        sender = request.get_response_sender()
        values = {}
        for name in INPUTS:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            values[name] = None if tensor is None else tensor.as_numpy()
        try:
            generation = parse_request(values, self.policy)
            if generation.stream and not self.streaming:
                raise RequestError("stream", "streaming is turned off for this service")
            request_id = next(self.ids)
            with self.lock:
                self.deliveries.add(request_id, generation.stream)
                self.requests[request_id] = (request, sender)
            try:
                self.engine.add(request_id, generation)
            except BaseException:
                with self.lock:
                    self.deliveries.open.pop(request_id, None)
                    self.requests.pop(request_id, None)
                raise
        except RequestError as err:
            sender.send(_error(str(err), pb_utils.TritonError.INVALID_ARG), flags=FINAL)
        except QueueFullError as err:
            sender.send(_error(f"the service is at capacity: {err}",
                               pb_utils.TritonError.UNAVAILABLE), flags=FINAL)

    def _run(self) -> None:
        checked = time.monotonic()
        while not self.stopping.is_set():
            if not self.engine.wait_for_work(timeout=0.1):
                continue
            if time.monotonic() - checked > CANCEL_CHECK_SECONDS:
                self._cancel_disconnected()
                checked = time.monotonic()
            try:
                events = self.engine.step()
                self.metrics.step(self.engine, events)
                for event in events:
                    self._deliver(event)
            except Exception as err:
                pb_utils.Logger.log_error(f"LLM engine loop: {type(err).__name__}: {err}")

    def _cancel_disconnected(self) -> None:
        with self.lock:
            open_requests = list(self.requests.items())
        for request_id, (request, _) in open_requests:
            if request.is_cancelled():
                self.engine.cancel(request_id)

    def _deliver(self, event: Any) -> None:
        with self.lock:
            responses = self.deliveries.route(event)
            _, sender = self.requests.get(event.request_id, (None, None))
            if event.finish_reason is not None:
                self.requests.pop(event.request_id, None)
        if sender is None:
            return
        if event.finish_reason == ERROR:
            sender.send(_error(event.error or "generation failed", pb_utils.TritonError.INTERNAL),
                        flags=FINAL)
            return
        for tensors, final in responses:
            response = pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, value) for name, value in tensors.items()])
            try:
                sender.send(response, flags=FINAL if final else 0)
            except Exception:  # the client went away; the engine is told at the next check
                self.engine.cancel(event.request_id)
                return

    def finalize(self) -> None:
        self.stopping.set()
        self.loop.join(timeout=10)
        self.engine.cancel_all()
