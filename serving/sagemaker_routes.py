"""SageMaker's container contract on the same server: ``GET /ping`` and ``POST /invocations``.

SageMaker runs ``docker run IMAGE serve`` and talks to port 8080; answering these two routes next
to KServe's lets one image serve both platforms. ``/invocations`` takes a raw ``image/*`` body (one
image) or ``application/json`` in the V1 shape (several images) and answers like V1: the same
``{"predictions": [...], "model_version": ...}`` body, answer fields included.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, Response

from serving.errors import UnsupportedMediaType, json_response

JSON_TYPES = ("application/json", "")
IMAGE_TYPES = ("application/x-image", "application/octet-stream")


def media_type(request: Request) -> str:
    """The bare, lower-case content type (parameters such as ``charset`` dropped)."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def register_sagemaker_routes(app: FastAPI, model: Any) -> None:
    """Add ``/ping`` and ``/invocations`` for ``model`` (an :class:`~serving.model.InventoryCounter`)."""

    async def ping() -> Response:
        ready = bool(model.ready)
        return json_response({"status": "ready" if ready else "loading"}, 200 if ready else 503)

    async def invocations(request: Request) -> Response:
        if not model.ready:
            return json_response({"error": f"model {model.name} is not ready"}, 503)
        ctype = media_type(request)
        if not (ctype.startswith("image/") or ctype in IMAGE_TYPES or ctype in JSON_TYPES):
            raise UnsupportedMediaType(
                f"Content-Type {ctype!r} is not supported; send image/jpeg (one image) or "
                'application/json {"instances": [{"image_bytes": {"b64": "..."}}]}'
            )
        body = await request.body()
        headers = dict(request.headers)
        if ctype in JSON_TYPES:
            # The model parses the JSON on its decode pool, not here on the event loop.
            headers["content-type"] = "application/json"
        response, _ = await model(body, headers=headers)
        return json_response(response)

    app.add_api_route("/ping", ping, methods=["GET"], include_in_schema=False)
    app.add_api_route("/invocations", invocations, methods=["POST"], response_model=None)
