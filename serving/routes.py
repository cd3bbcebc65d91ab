"""The REST routes the server answers: inference, health, metadata and metrics, nothing more.

KServe 0.21 registers more than this model serves. Its model-repository routes let anyone unload
the model with one unauthenticated POST while the health probes kept answering 200 (and ``load``
cannot bring this model back); ``:explain`` and the ``/versions/`` routes are not implemented (501
and a traceback per call). :func:`register_served_routes` takes the place of KServe's route
registration, reusing KServe's handlers for the routes it keeps, so everything else is an unknown
path (404). Readiness is the models' own: 503 once a model is stopped or unregistered.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, Response
from grpc_interceptor.exceptions import Unimplemented
from kserve.model_repository import ModelRepository
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.model_repository_extension import ModelRepositoryExtension
from kserve.protocol.rest.server import metrics_handler
from kserve.protocol.rest.v1_endpoints import V1Endpoints
from kserve.protocol.rest.v2_datamodels import (
    InferenceRequest,
    InferenceResponse,
    ListModelsResponse,
    ModelMetadataResponse,
    ModelReadyResponse,
    ServerLiveResponse,
)
from kserve.protocol.rest.v2_endpoints import V2Endpoints
from starlette.convertors import StringConvertor, register_url_convertor

from serving.errors import json_response


class ModelNameConvertor(StringConvertor):
    """A model name in a URL: one path segment without ``:``, so that ``POST /v1/models/m:explain``
    (no such route) is a 404, not a 405 from the ``GET /v1/models/{model_name}`` route."""

    regex = "[^/:]+"


register_url_convertor("model_name", ModelNameConvertor())


class ReadOnlyModelRepository(ModelRepositoryExtension):
    """KServe's model-repository extension with ``load`` and ``unload`` refused.

    The REST routes are gone, but with ``--enable_grpc true`` KServe's gRPC service offers the same
    two calls; they answer UNIMPLEMENTED (without a traceback in the log) instead.
    """

    async def load(self, model_name: str) -> None:
        raise Unimplemented("the model repository is read-only: the server loads its model at start")

    async def unload(self, model_name: str) -> None:
        raise Unimplemented("the model repository is read-only: the server loads its model at start")


async def models_ready(registry: ModelRepository) -> bool:
    """Ready when at least one model is registered and every registered model reports healthy.

    KServe's server readiness is a constant ``True`` (without a remote predictor), so a stopped or
    unregistered model would still pass the Kubernetes readiness probe.
    """
    names = list(registry.get_models())
    if not names:
        return False
    for name in names:
        if not await registry.is_model_ready(name):
            return False
    return True


def register_served_routes(app: FastAPI, dataplane: DataPlane, *, docs: bool = False) -> None:
    """Add the served routes to ``app`` (KServe's handlers, without their unimplemented version
    parameter: ``?model_version=`` would be a 501); with ``docs`` off, drop the OpenAPI schema too."""
    v1 = V1Endpoints(dataplane)
    v2 = V2Endpoints(dataplane)

    async def server_metadata() -> Response:
        # KServe advertises the model-repository extension, whose routes are not served here.
        return json_response({**dataplane.metadata(), "extensions": []})

    async def server_ready() -> Response:
        ready = await models_ready(dataplane.model_registry)
        return json_response({"ready": ready}, 200 if ready else 503)

    async def model_metadata(model_name: str) -> ModelMetadataResponse:
        return await v2.model_metadata(model_name)

    async def model_ready(model_name: str) -> ModelReadyResponse:
        return await v2.model_ready(model_name)

    async def infer(
        raw_request: Request,
        raw_response: Response,
        model_name: str,
        request_body: InferenceRequest | bytes,
    ) -> InferenceResponse | Response:
        return await v2.infer(raw_request, raw_response, model_name, request_body)

    routes: list[tuple[str, str, Any, Any]] = [
        ("GET", "/", dataplane.live, None),
        ("GET", "/metrics", metrics_handler, None),
        ("GET", "/v1/models", v1.models, None),
        ("GET", "/v1/models/{model_name:model_name}", v1.model_ready, None),
        ("POST", "/v1/models/{model_name:model_name}:predict", v1.predict, None),
        ("GET", "/v2", server_metadata, None),
        ("GET", "/v2/health/live", v2.live, ServerLiveResponse),
        ("GET", "/v2/health/ready", server_ready, None),
        ("GET", "/v2/models", v2.models, ListModelsResponse),
        ("GET", "/v2/models/{model_name:model_name}", model_metadata, ModelMetadataResponse),
        ("GET", "/v2/models/{model_name:model_name}/ready", model_ready, ModelReadyResponse),
        ("POST", "/v2/models/{model_name:model_name}/infer", infer, None),
    ]
    for method, path, endpoint, response_model in routes:
        app.add_api_route(path, endpoint, methods=[method], response_model=response_model)
    if not docs and app.openapi_url:
        app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != app.openapi_url]
        app.openapi_url = None
