"""The server's one error shape, and the mapping from errors to HTTP statuses, in one place.

Every answer that is not a success is `{"error": {"message", "type", "code"}}` (OpenAI's shape, which
its client turns into a readable exception), whether it comes from a route, the request guard, an
unknown path or a wrong method.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

from corom_runtime.errors import BatcherClosedError, InvalidInputError, InvalidInputTypeError, OverloadedError, RequestTooLargeError

KIND = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
        404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
        415: "invalid_request_error", 503: "server_error"}


class HTTPError(Exception):
    """A client-facing error: raised anywhere in a request, answered by `error_response`."""

    def __init__(self, status: int, message: str, kind: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.kind = kind or KIND.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers


def error_body(status: int, message: str, kind: str | None = None) -> dict:
    """The one error shape, for the app's responses and the protocol-level ones `runner` writes itself."""
    kind = kind or KIND.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "code": status}}


def error_response(status: int, message: str, kind: str | None = None, headers: dict | None = None) -> JSONResponse:
    if status == 503:
        headers = {"Retry-After": "1", **(headers or {})}
    return JSONResponse(error_body(status, message, kind), status, headers=headers)


def from_exception(exc: Exception, request_id: str = "") -> HTTPError:
    """Map the runtime's errors to statuses: overload and shutdown are 503, the caller's invalid input
    (`InvalidInputError`, `InvalidInputTypeError`) 400. Anything else, a plain `ValueError` included,
    is a bug: a 500 whose message names only the request id (the log has the rest)."""
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, OverloadedError):
        return HTTPError(503, str(exc), "overloaded")
    if isinstance(exc, BatcherClosedError):
        return HTTPError(503, str(exc), "server_error")
    if isinstance(exc, RequestTooLargeError):
        return HTTPError(413, str(exc))
    if isinstance(exc, (InvalidInputError, InvalidInputTypeError)):
        return HTTPError(400, str(exc))
    return HTTPError(500, f"internal error (request id {request_id}); see the server log", "server_error")
