"""Typed request errors and their HTTP mapping.

Every problem with a request becomes a :class:`BadRequest` (400) or :class:`PayloadTooLarge` (413)
with a message that says what was wrong. Both subclass KServe's ``InvalidInput`` so KServe's own code
paths treat them as client errors, but they get their own FastAPI handler, as do KServe's client
errors (bad input, unknown model, model not ready): no traceback and no line of their own; the
reason goes into the request's one access line (:class:`serving.server.RequestGuard`), so a flood
of bad requests cannot flood the logs or the disk.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady

from components.preprocess import ImageError, ImageTooLargeError

#: ASGI scope key where an error handler leaves the reason for the request's access log line.
REJECTION_KEY = "serving.rejection"


class BadRequest(InvalidInput):
    """The request is malformed (HTTP 400)."""

    status_code = 400

    def __init__(self, reason: str) -> None:
        super().__init__(reason)


class PayloadTooLarge(BadRequest):
    """The request or an image in it is over a configured size limit (HTTP 413)."""

    status_code = 413


class UnsupportedMediaType(BadRequest):
    """The body's content type cannot carry an image for this route (HTTP 415)."""

    status_code = 415


class OverloadedError(Exception):
    """The server cannot answer this request within its latency budget (HTTP 503 + ``Retry-After``).

    Not a client error: the same request succeeds once the queue has drained. ``reason`` names the
    limit that shed it (the ``reason`` label of ``inventory_shed_requests_total``).
    """

    status_code = 503

    def __init__(self, message: str, *, reason: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


def overloaded_response(exc: OverloadedError) -> Response:
    """503 with ``Retry-After``.

    The connection stays open: a client still sending its body reads the 503 once it is done
    (closing now could reset the connection before the client reads the answer).
    """
    headers = {"retry-after": str(exc.retry_after_s)}
    body = orjson.dumps({"error": str(exc)})
    return Response(content=body, status_code=503, media_type="application/json", headers=headers)


def json_response(content: Any, status_code: int = 200) -> Response:
    """A JSON response serialized with orjson (numpy-free, fast)."""
    return Response(content=orjson.dumps(content), status_code=status_code, media_type="application/json")


def from_image_error(e: ImageError, index: int | None = None) -> BadRequest:
    """Map the shared preprocessing errors to HTTP errors (bombs and oversize images are 413)."""
    where = f"instance {index}: " if index is not None else ""
    cls = PayloadTooLarge if isinstance(e, ImageTooLargeError) else BadRequest
    return cls(f"{where}{e}")


def client_error_status(exc: Exception) -> int:
    """HTTP status of a client error: ours carry it, KServe's follow KServe's own handlers."""
    if isinstance(exc, ModelNotFound):
        return 404
    if isinstance(exc, ModelNotReady):
        return 503
    return int(getattr(exc, "status_code", 400))


async def handle_bad_request(request: Request, exc: Exception) -> Response:
    """FastAPI handler for client errors: JSON error body, the reason noted for the access line.

    The rejection metric is counted in :class:`serving.server.RequestGuard`, for every 4xx.
    """
    request.scope[REJECTION_KEY] = str(exc)
    return json_response({"error": str(exc)}, client_error_status(exc))


async def handle_overloaded(request: Request, exc: Exception) -> Response:
    """FastAPI handler for :class:`OverloadedError` (raised once a request's images are known)."""
    request.scope[REJECTION_KEY] = str(exc)
    assert isinstance(exc, OverloadedError)
    return overloaded_response(exc)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on ``app`` (before the server starts, as Starlette requires)."""
    handler: Any = handle_bad_request
    for cls in (BadRequest, PayloadTooLarge, UnsupportedMediaType):
        app.add_exception_handler(cls, handler)
    overloaded: Any = handle_overloaded
    app.add_exception_handler(OverloadedError, overloaded)


def install_client_error_handlers(app: FastAPI) -> None:
    """Take KServe's client errors over from its handlers, which log each one with a traceback.

    Call after KServe registered its handlers (it registers per exact class, replacing earlier ones).
    """
    handler: Any = handle_bad_request
    for cls in (InvalidInput, ModelNotFound, ModelNotReady):
        app.add_exception_handler(cls, handler)
