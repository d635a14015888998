"""Triton Python-backend model of an EmbeddingSearch's cross-encoder (``<name>_rerank``).

The renderer copies this file as the rerank model's ``model.py``. The work is
:class:`tritonop_backend.rerank.RerankStage`'s; moving tensors in and out is the embedding
pipeline's adapter's (:mod:`tritonop_backend.models.pipeline`).
"""

from __future__ import annotations

from typing import Any

from tritonop_backend import check_release
from tritonop_backend.models.pipeline import device, execute, parameters
from tritonop_backend.rerank import RerankStage


class TritonPythonModel:
    """Loads the exported cross-encoder once, then scores every batch of requests."""

    def initialize(self, args: dict[str, Any]) -> None:
        params = parameters(args)
        check_release(params.get("tritonop_version"))
        self.stage = RerankStage(params, device(args))

    def execute(self, requests: list[Any]) -> list[Any]:
        return execute(requests, self.stage)  # type: ignore[arg-type]
