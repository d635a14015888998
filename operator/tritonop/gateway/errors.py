"""OpenAI error objects: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from typing import Any, ClassVar


class APIError(Exception):
    """An answer that is an error, with the status and the field at fault.

    Args:
        status: HTTP status: 400 for a malformed request, 404 for an unknown model, 429 when
            the model's admission bound is full, 503 while Triton is not ready, 504 when it
            did not answer in time; any other 4xx is the client's fault too.
        message: what is wrong, phrased so that the client can fix it.
        param: the request field at fault, if one is.
        code: a short machine-readable code.
        retry_after: seconds after which a retry may succeed (429, 503).
    """

    TYPES: ClassVar[dict[int, str]] = {400: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error",
             429: "rate_limit_error", 503: "service_unavailable_error"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        """The JSON object the client receives."""
        return {"error": {"message": self.message,
                          "type": self.TYPES.get(self.status, "invalid_request_error"
                                                 if self.status < 500 else "server_error"),
                          "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


def invalid(param: str, problem: str) -> APIError:
    """400 naming the field: ``"<param>: <problem>"``."""
    return APIError(400, f"{param}: {problem}", param=param, code="invalid_value")
