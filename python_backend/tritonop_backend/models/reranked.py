"""Triton Python-backend model ``<name>_reranked``: a search re-scored by the cross-encoder.

``text`` [+ ``num_results``, ``filter``] -> ``ids``, ``scores`` (the cross-encoder's),
``texts``, ``search_scores`` (cosine), as the search ensemble ``<name>`` answers but
reranked. Business logic scripting (BLS): for each request it asks the ensemble
``<name>`` for the candidates, then ``<name>_rerank`` for each row's scores; the choice
of the best is :func:`tritonop_backend.rerank.best_rows`. The gateway's
``/v1/search`` with ``rerank: true`` makes the same two calls itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from tritonop_backend import check_release
from tritonop_backend.errors import RequestError
from tritonop_backend.models.pipeline import parameters
from tritonop_backend.rerank import RerankedSearch, best_rows


class _Failed(Exception):
    """An inner model's error, handed on to the client as it is."""

    def __init__(self, error: Any) -> None:
        super().__init__(error.message())
        self.error = error


def _input(request: Any, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _call(model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
    request = pb_utils.InferenceRequest(
        model_name=model, requested_output_names=outputs,
        inputs=[pb_utils.Tensor(name, value) for name, value in inputs.items()])
    response = request.exec()
    if response.has_error():
        raise _Failed(response.error())
    return [pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs]


class TritonPythonModel:
    """Reads its settings once; each request is one search and one rerank per row."""

    def initialize(self, args: dict[str, Any]) -> None:
        params = parameters(args)
        check_release(params.get("tritonop_version"))
        self.settings = RerankedSearch.of(params)
        self.search_model, self.rerank_model = params["search_model"], params["rerank_model"]

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._answer(request) for request in requests]

    def _answer(self, request: Any) -> Any:
        try:
            outputs = self._rerank(request)
        except RequestError as err:
            error = pb_utils.TritonError(str(err), pb_utils.TritonError.INVALID_ARG)
            return pb_utils.InferenceResponse(error=error)
        except _Failed as err:
            return pb_utils.InferenceResponse(error=err.error)
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(name, value) for name, value in outputs.items()])

    def _rerank(self, request: Any) -> dict[str, np.ndarray]:
        text = _input(request, "text")
        if text is None:
            raise RequestError("text", "is required")
        rows = len(text)
        k = self.settings.num_results(_input(request, "num_results"), rows)
        inputs = {"text": text, "num_results": np.full(
            (rows, 1), self.settings.search_count(k), dtype=np.int32)}
        search_filter = _input(request, "filter")
        if search_filter is not None:
            inputs["filter"] = search_filter
        ids, scores, texts = _call(self.search_model, inputs, ["ids", "scores", "texts"])
        rerank_scores = []
        for row in range(rows):
            if texts.shape[1] == 0:
                rerank_scores.append(np.zeros(0, dtype=np.float32))
                continue
            (row_scores,) = _call(self.rerank_model, {
                "query": text[row].reshape(1, 1),
                "documents": self.settings.documents(texts[row]).reshape(1, -1)},
                ["scores"])
            rerank_scores.append(row_scores.reshape(-1))
        return best_rows(ids, texts, scores, rerank_scores, k)
