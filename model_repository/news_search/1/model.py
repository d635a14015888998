"""Triton Python-backend model for every step of the embedding-search ensemble.

The renderer copies this file as ``model.py`` into the tokenizer, encoder, pooling and
search models; the ``stage`` parameter of each model's config picks which pure stage
from :mod:`tritonop_backend.stages` it runs. This is the one module of the embedding
path that imports Triton's ``triton_python_backend_utils``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from tritonop_backend import check_release
from tritonop_backend.errors import RequestError
from tritonop_backend.stages import STAGES, Stage


def parameters(args: dict[str, Any]) -> dict[str, str]:
    """The ``parameters`` map of the model's config, as plain strings."""
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def device(args: dict[str, Any]) -> str:
    """``cuda:N`` for a GPU instance, ``cpu`` otherwise."""
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{args['model_instance_device_id']}"
    return "cpu"


def execute(requests: list[Any], stage: Stage) -> list[Any]:
    """Run ``stage`` once over the batch and answer every request exactly once."""
    batch = []
    for request in requests:
        inputs = {}
        for name in stage.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            inputs[name] = None if tensor is None else tensor.as_numpy()
        batch.append(inputs)
    return [_response(result) for result in stage.run(batch)]


def _response(result: dict[str, np.ndarray] | RequestError) -> Any:
    if isinstance(result, RequestError):
        error = pb_utils.TritonError(str(result), pb_utils.TritonError.INVALID_ARG)
        return pb_utils.InferenceResponse(error=error)
    tensors = [pb_utils.Tensor(name, value) for name, value in result.items()]
    return pb_utils.InferenceResponse(output_tensors=tensors)


class TritonPythonModel:
    """Builds the configured stage once, then hands it every batch."""

    def initialize(self, args: dict[str, Any]) -> None:
        params = parameters(args)
        check_release(params.get("tritonop_version"))
        self.stage = STAGES[params["stage"]](params, device(args))
        if description := getattr(self.stage, "description", ""):  # which index: the log says
            pb_utils.Logger.log_info(f"{args['model_name']}: {description}")

    def execute(self, requests: list[Any]) -> list[Any]:
        return execute(requests, self.stage)
