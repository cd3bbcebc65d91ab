"""Typed request errors and their HTTP mapping.

Every problem with a request becomes a :class:`BadRequest` (400) or :class:`PayloadTooLarge` (413)
with a message that says what was wrong. Both subclass KServe's ``InvalidInput`` so KServe's own code
paths treat them as client errors, but they get their own FastAPI handler: one warning line per
rejection instead of a traceback, so a flood of bad requests cannot flood the logs or the disk.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from kserve.errors import InvalidInput

from components.preprocess import ImageError, ImageTooLargeError

logger = logging.getLogger("serving.errors")


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


def json_response(content: Any, status_code: int = 200) -> Response:
    """A JSON response serialized with orjson (numpy-free, fast)."""
    return Response(content=orjson.dumps(content), status_code=status_code, media_type="application/json")


def from_image_error(e: ImageError, index: int | None = None) -> BadRequest:
    """Map the shared preprocessing errors to HTTP errors (bombs and oversize images are 413)."""
    where = f"instance {index}: " if index is not None else ""
    cls = PayloadTooLarge if isinstance(e, ImageTooLargeError) else BadRequest
    return cls(f"{where}{e}")


async def handle_bad_request(request: Request, exc: Exception) -> Response:
    """FastAPI handler for :class:`BadRequest` and subclasses: one warning line, JSON error body.

    The rejection metric is counted in :class:`serving.server.RequestGuard`, for every 4xx.
    """
    status = int(getattr(exc, "status_code", 400))
    logger.warning("rejected %s %s -> %d: %s", request.method, request.url.path, status, exc)
    return json_response({"error": str(exc)}, status)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on ``app`` (before the server starts, as Starlette requires)."""
    handler: Any = handle_bad_request
    for cls in (BadRequest, PayloadTooLarge, UnsupportedMediaType):
        app.add_exception_handler(cls, handler)
