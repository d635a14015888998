"""Building Triton ``config.pbtxt`` files as typed protobuf messages.

A config is written as a plain dict, parsed into ``inference.ModelConfig`` (which
rejects unknown fields and wrong types at render time instead of at server start)
and printed with ``text_format``; no string templating.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from tritonop import __version__
from tritonop.spec.common import StageSettings

ConfigDict = dict[str, Any]


def tensor(
    name: str, data_type: str, dims: list[int], *, ragged: bool = False, optional: bool = False
) -> ConfigDict:
    """One input or output; ``data_type`` without the ``TYPE_`` prefix (``"FP32"``)."""
    body: ConfigDict = {"name": name, "data_type": f"TYPE_{data_type}", "dims": dims}
    if ragged:
        # Lets the dynamic batcher group requests of different lengths; the Python
        # model pads them to one tensor itself.
        body["allow_ragged_batch"] = True
    if optional:
        body["optional"] = True
    return body


def python_model(
    name: str,
    stage: StageSettings,
    inputs: list[ConfigDict],
    outputs: list[ConfigDict],
    parameters: Mapping[str, str],
    *,
    gpu: bool = False,
) -> ConfigDict:
    """A Python-backend model with dynamic batching and a bounded queue.

    ``tritonop_version`` tells the adapter which release rendered it: the adapters come
    from the operator (in the ConfigMap), the library they import from the Triton image,
    and a mismatch fails the load naming both (``tritonop_backend.check_release``).
    """
    parameters = {**parameters, "tritonop_version": __version__}
    return {
        "name": name,
        "backend": "python",
        "max_batch_size": stage.max_batch_size,
        "input": inputs,
        "output": outputs,
        "instance_group": [{"kind": "KIND_GPU" if gpu else "KIND_CPU", "count": stage.instances}],
        "dynamic_batching": dynamic_batching(stage),
        "parameters": {key: {"string_value": value} for key, value in parameters.items()},
    }


def dynamic_batching(stage: StageSettings) -> ConfigDict:
    """Queue delay and bound; a request arriving at a full queue gets 503 / UNAVAILABLE."""
    return {
        "max_queue_delay_microseconds": stage.max_queue_delay_microseconds,
        "default_queue_policy": {"max_queue_size": stage.max_queue_size},
    }


def ensemble(
    name: str,
    max_batch_size: int,
    inputs: list[ConfigDict],
    outputs: list[ConfigDict],
    steps: list[tuple[str, Mapping[str, str], Mapping[str, str]]],
    *,
    response_cache: bool = False,
) -> ConfigDict:
    """An ensemble; each step is ``(model, {its input: tensor}, {its output: tensor})``."""
    body: ConfigDict = {
        "name": name,
        "platform": "ensemble",
        "max_batch_size": max_batch_size,
        "input": inputs,
        "output": outputs,
        "ensemble_scheduling": {
            "step": [
                {
                    "model_name": model,
                    "model_version": -1,
                    "input_map": dict(input_map),
                    "output_map": dict(output_map),
                }
                for model, input_map, output_map in steps
            ]
        },
    }
    if response_cache:
        body["response_cache"] = {"enable": True}
    return body


def to_pbtxt(config: ConfigDict) -> str:
    """Validate ``config`` against Triton's ``ModelConfig`` schema and print it."""
    message = json_format.ParseDict(config, model_config_pb2.ModelConfig())
    return text_format.MessageToString(message)
