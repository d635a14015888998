"""Errors that a single request can cause, as opposed to errors of the model."""

from __future__ import annotations


class RequestError(ValueError):
    """A problem with one request's input, reported to that client alone.

    The adapters turn it into a per-request ``TritonError`` with code
    ``INVALID_ARG`` (HTTP 400, gRPC INVALID_ARGUMENT); batch-mates are unaffected.

    Args:
        field: the input tensor or parameter at fault, as the client named it.
        problem: what is wrong with it, phrased so that the client can fix it.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem
