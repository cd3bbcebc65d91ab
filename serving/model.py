"""The KServe model: exported ONNX counter on onnxruntime, fed by the shared preprocessing.

Request flow (all off the event loop except checking the request's structure and formatting):

1. :meth:`InventoryCounter.preprocess` turns a V1 JSON body, a V2 ``InferRequest`` or a raw image
   body into per-image sources (:func:`parse_request`; a body still in bytes is parsed on the decode
   pool), then base64-decodes and decodes each image on that pool with
   :func:`components.preprocess.load_uint8` (JPEG draft mode, whole frame) and normalizes them
   exactly as in training.
2. :meth:`InventoryCounter.predict` hands each image to the :class:`~serving.batcher.MicroBatcher`,
   which runs concurrent requests as one onnxruntime batch on a dedicated thread.
3. :meth:`InventoryCounter.postprocess` formats the answer for the protocol that was used: count,
   per-class probabilities, expected count and, as model.json's ``answers`` allow, the confidence of
   the returned count, its count set and whether a person should review it
   (:func:`components.answers.answer`), plus the :func:`served_version` that gave it.

Torch is never imported here (checked by the tests), so the serving image stays small.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from kserve import Model
from kserve.errors import InferenceError
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from components.answers import answer
from components.common import ConfigError, sha256_file
from components.modelspec import INT8_CHOICES, ModelSpec, choose_onnx_file, load_model_spec
from components.preprocess import ImageError, load_uint8, normalize, open_image
from serving.batcher import MicroBatcher
from serving.contract import ModelContractError, check_graph, check_outputs, tensor_infos
from serving.errors import BadRequest, PayloadTooLarge, from_image_error

logger = logging.getLogger("serving.model")

#: Pixels per image the server decodes. The bin photos are under 1 MP and the model sees 224 x 224;
#: 4 MP leaves room for a better camera and refuses, from the image header, the 40 MP images that
#: cost seconds and gigabytes to decode (PNG and WebP have no draft mode).
SERVING_MAX_PIXELS = 4_000_000
#: Pixels per request, over all its images: 64 photos of 1 MP (``--max_instances`` at its default).
SERVING_MAX_REQUEST_PIXELS = 64_000_000


@dataclass(frozen=True)
class ServingOptions:
    """Tuning and limits of one model server (all have CLI flags in :mod:`serving.__main__`)."""

    max_batch_size: int = 16
    max_wait_ms: float = 2.0
    max_instances: int = 64
    max_pixels: int = SERVING_MAX_PIXELS
    max_request_pixels: int = SERVING_MAX_REQUEST_PIXELS
    max_queue_images: int = 256  # ceiling on admitted images (the limit follows throughput x budget)
    latency_budget_ms: float = 1000.0  # an admitted request not answered within this gets 503
    max_inflight_mb: float = 64.0  # request bodies admitted at once
    read_timeout_s: float = 10.0  # for a request's headers, then for its body (408)
    max_header_kb: int = 16  # request line + headers (431)
    max_headers: int = 100  # header fields per request (431)
    decode_threads: int = 0  # 0: one per CPU core
    inference_workers: int = 0  # batches run in parallel; 0: one per 4 CPU cores (see resolve_workers)
    intra_op_threads: int = 0  # 0: CPU cores / inference_workers
    int8: str = "auto"  # auto: use model.int8.onnx when model.json lists it (it passed the accuracy gate)
    providers: tuple[str, ...] = field(default_factory=tuple)  # empty: CUDA when available, else CPU

    def __post_init__(self) -> None:
        checks = [
            (self.max_batch_size >= 1, f"--max_batch_size must be >= 1, got {self.max_batch_size}"),
            (self.max_wait_ms >= 0, f"--max_wait_ms must be >= 0, got {self.max_wait_ms}"),
            (self.max_instances >= 1, f"--max_instances must be >= 1, got {self.max_instances}"),
            (self.max_pixels >= 1, f"--max_pixels must be >= 1, got {self.max_pixels}"),
            (
                self.max_request_pixels >= self.max_pixels,
                f"--max_request_pixels must be >= --max_pixels ({self.max_pixels:,}), "
                f"got {self.max_request_pixels:,}",
            ),
            (self.max_queue_images >= 1, f"--max_queue_images must be >= 1, got {self.max_queue_images}"),
            (self.latency_budget_ms > 0, f"--latency_budget_ms must be > 0, got {self.latency_budget_ms}"),
            (self.max_inflight_mb > 0, f"--max_inflight_mb must be > 0, got {self.max_inflight_mb}"),
            (self.read_timeout_s > 0, f"--read_timeout_s must be > 0, got {self.read_timeout_s}"),
            (self.max_header_kb >= 1, f"--max_header_kb must be >= 1, got {self.max_header_kb}"),
            (self.max_headers >= 1, f"--max_headers must be >= 1, got {self.max_headers}"),
            (self.decode_threads >= 0, f"--decode_threads must be >= 0, got {self.decode_threads}"),
            (self.inference_workers >= 0, f"--inference_workers must be >= 0, got {self.inference_workers}"),
            (self.intra_op_threads >= 0, f"--intra_op_threads must be >= 0, got {self.intra_op_threads}"),
            (self.int8 in INT8_CHOICES, f"--int8 must be one of {list(INT8_CHOICES)}, got {self.int8!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def resolve_workers(self, cores: int | None = None) -> int:
        """Batches run in parallel: as asked, or one per 4 cores (at least one).

        On 2 cores one batch on both cores keeps requests in arrival order: measured at 8 clients,
        p99 fell from ~270 ms (two single-threaded batches) to ~210 ms at the same throughput, and
        one image alone takes ~23 ms instead of ~37 ms. Past ~4 threads onnxruntime's speed-up per
        thread flattens, so bigger machines run more batches side by side.
        """
        if self.inference_workers:
            return self.inference_workers
        return max(1, (cores or cpu_count()) // 4)


def cpu_count() -> int:
    """CPUs this process may use: affinity mask, capped by a cgroup v2 CPU quota (a pod's CPU limit).

    A pod limited to 2 CPUs on a 64-core node still sees 64 CPUs in its affinity mask; sizing thread
    pools from that would oversubscribe the quota and throttle the server.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, n)


#: model.json's ``version`` when nobody named the model (ModelSpec's and training's default).
UNPUBLISHED_VERSION: str = ModelSpec.version


def served_version(spec: ModelSpec, onnx_path: Path) -> str:
    """The version every answer names: model.json's ``version``, or ``sha256:<12 hex>`` of the ONNX
    file served when that version is the unnamed default (:data:`UNPUBLISHED_VERSION`).

    ``components.publish`` writes the version it publishes under into the published model.json, so a
    published model answers with its published version. A model straight from training says "0"
    (unless trained with ``--version``): it has no name, so the bytes actually served (the int8 file
    when that is the one loaded) name it instead. Computed once, when the model loads.
    """
    if spec.version and spec.version != UNPUBLISHED_VERSION:
        return spec.version
    return "sha256:" + sha256_file(onnx_path)[:12]


class OnnxCounter:
    """The exported model on onnxruntime: ``run(float32 NCHW) -> {probabilities, count, expected}``."""

    def __init__(self, model_dir: str | os.PathLike[str], options: ServingOptions | None = None) -> None:
        import onnxruntime as ort

        options = options or ServingOptions()
        self.model_dir = Path(model_dir)
        self.spec: ModelSpec = load_model_spec(self.model_dir)
        self.onnx_path = choose_onnx_file(self.model_dir, self.spec, options.int8)
        self.model_version = served_version(self.spec, self.onnx_path)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.intra_op_threads = options.intra_op_threads or max(1, cpu_count() // options.resolve_workers())
        so.intra_op_num_threads = self.intra_op_threads
        so.inter_op_num_threads = 1
        # Don't busy-wait between batches: the decode threads need those cores.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        if options.providers:
            missing = [p for p in options.providers if p not in available]
            if missing:
                raise ConfigError(f"onnxruntime providers {missing} are not available here ({available})")
            providers = list(options.providers)
        elif "CUDAExecutionProvider" in available:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(self.onnx_path), so, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise ConfigError(f"cannot load {self.onnx_path} with onnxruntime: {e}") from e
        self.providers = self.session.get_providers()
        check_graph(
            self.spec,
            tensor_infos(self.session.get_inputs()),
            tensor_infos(self.session.get_outputs()),
            self.onnx_path,
        )
        self.input_name = self.spec.input_name
        self.output_names = list(self.spec.output_names)
        size = self.spec.preprocess.image_size
        self.item_shape = (3, size, size)

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """One batch through the model (thread-safe; onnxruntime releases the GIL)."""
        outs = self.session.run(self.output_names, {self.input_name: x})
        return dict(zip(self.output_names, outs, strict=True))

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        """Run each batch size once and check the outputs against model.json.

        First runs allocate and pick kernels, so this belongs before readiness, not on a user; it is
        also the last check that the model serves: a failure is a :class:`ModelContractError`.
        """
        for n in sorted(set(batch_sizes)):
            try:
                outputs = self.run(np.zeros((n, *self.item_shape), dtype=np.float32))
            except Exception as e:  # onnxruntime raises its own exception types
                reason = " ".join(str(e).split())  # its messages span lines; the error is one line
                raise ModelContractError(
                    f"{self.onnx_path} failed its warm-up inference on a batch of {n}: {reason}"
                ) from e
            check_outputs(self.spec, outputs, n, self.onnx_path)


# ----------------------------------------------------------------------------- request parsing


#: One image as the request carried it: raw bytes, or base64 text decoded later on the decode pool.
ImageSource = bytes | str


@dataclass
class ParsedRequest:
    """Image sources from any protocol, plus what is needed to answer in the same protocol."""

    images: list[ImageSource]
    protocol: str  # "v1" (JSON instances), "v2" (InferRequest), "raw" (image body)
    request_id: str | None = None


@dataclass
class DecodedRequest:
    """Model inputs (float32 CHW each) for a parsed request."""

    inputs: list[np.ndarray]
    protocol: str
    request_id: str | None = None


@dataclass
class Prediction:
    """Stacked model outputs for one request."""

    outputs: dict[str, np.ndarray]
    protocol: str
    request_id: str | None = None


V1_SHAPE_HINT = '{"instances": [{"image_bytes": {"b64": "<base64 JPEG>"}}, ...]}'


def _b64_text(text: Any, where: str) -> str:
    """Check that a base64 field is a string; decoding it waits for the decode pool."""
    if not isinstance(text, str):
        raise BadRequest(f"{where}: expected a base64 string, got {type(text).__name__}")
    return text


def _b64(text: Any, where: str) -> bytes:
    _b64_text(text, where)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"{where}: invalid base64 ({e})") from e


def _check_count(n: int, max_instances: int) -> None:
    if n == 0:
        raise BadRequest("the request holds no images")
    if n > max_instances:
        raise PayloadTooLarge(f"{n} images in one request, over the limit of {max_instances}; split it up")


def parse_v1(body: Any, max_instances: int) -> list[ImageSource]:
    """V1 JSON ``{"instances": [{"image_bytes": {"b64": ...}}, ...]}`` -> base64 texts (not decoded)."""
    if not isinstance(body, dict):
        raise BadRequest(f"expected a JSON object like {V1_SHAPE_HINT}, got {type(body).__name__}")
    if "instances" not in body:
        raise BadRequest(f"missing field 'instances' (got {sorted(body)[:5]}); expected {V1_SHAPE_HINT}")
    instances = body["instances"]
    if not isinstance(instances, list):
        raise BadRequest(f"'instances' must be a list, got {type(instances).__name__}")
    _check_count(len(instances), max_instances)
    images: list[ImageSource] = []
    for i, inst in enumerate(instances):
        value = inst.get("image_bytes", inst) if isinstance(inst, dict) else None
        if not isinstance(value, dict) or "b64" not in value:
            raise BadRequest(f"instance {i}: expected {{'image_bytes': {{'b64': '<base64 JPEG>'}}}}")
        images.append(_b64_text(value["b64"], f"instance {i}"))
    return images


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, np.ndarray):
        return list(data.reshape(-1))
    out: list[Any] = []
    for v in data:
        out.extend(_flatten(v) if isinstance(v, list | tuple) else [v])
    return out


def parse_v2(request: InferRequest, max_instances: int) -> list[ImageSource]:
    """V2 ``InferRequest`` with one BYTES input (base64 strings in JSON, raw bytes over gRPC)."""
    inputs = request.inputs or []
    if not inputs:
        raise BadRequest("V2 request has no inputs; send one BYTES input with base64-encoded images")
    if len(inputs) > 1:
        named = [i for i in inputs if i.name in ("image", "image_bytes", "images")]
        if len(named) != 1:
            raise BadRequest(f"expected one BYTES input named 'image', got {[i.name for i in inputs]}")
        inputs = named
    inp = inputs[0]
    if inp.datatype != "BYTES":
        raise BadRequest(f"input {inp.name!r} must have datatype BYTES (encoded images), got {inp.datatype}")
    data = inp.data
    if data is None and getattr(inp, "_raw_data", None) is not None:
        data = inp.as_numpy()
    items = _flatten(data if data is not None else [])
    expected = int(np.prod(inp.shape)) if inp.shape else len(items)
    if expected != len(items):
        raise BadRequest(f"input {inp.name!r}: shape {inp.shape} does not match {len(items)} elements")
    _check_count(len(items), max_instances)
    return [
        bytes(v) if isinstance(v, bytes | bytearray) else _b64_text(v, f"instance {i}")
        for i, v in enumerate(items)
    ]


def parse_request(
    payload: Any, max_instances: int, request_id: str | None = None, content_type: str = ""
) -> ParsedRequest:
    """Any supported request body -> :class:`ParsedRequest` (raises :class:`BadRequest`).

    A body still in bytes is parsed here (JSON included), so call this off the event loop for those;
    base64 texts are only checked to be strings and are decoded later by :func:`decode_one`.
    """
    if isinstance(payload, InferRequest):
        return ParsedRequest(parse_v2(payload, max_instances), "v2", payload.id)
    if isinstance(payload, bytes | bytearray | memoryview):
        # KServe passes non-JSON content types through untouched: an image/* body is one image.
        # A JSON body sent with a generic type (curl -d uses form encoding) is still V1 JSON.
        data = bytes(payload)
        if content_type == "application/json":  # e.g. SageMaker's /invocations: JSON or nothing
            try:
                body = orjson.loads(data)
            except orjson.JSONDecodeError as e:
                raise BadRequest(f"body is not valid JSON: {e}") from e
            return ParsedRequest(parse_v1(body, max_instances), "v1", request_id)
        if not content_type.startswith("image/") and data.lstrip()[:1] == b"{":
            try:
                return ParsedRequest(parse_v1(orjson.loads(data), max_instances), "v1", request_id)
            except orjson.JSONDecodeError as e:
                raise BadRequest(f"body looks like JSON but does not parse: {e}") from e
        return ParsedRequest([data], "raw", request_id)
    return ParsedRequest(parse_v1(payload, max_instances), "v1", request_id)


def decode_one(data: ImageSource, spec: ModelSpec, max_pixels: int, index: int = 0) -> np.ndarray:
    """Image bytes (or their base64 text) -> float32 CHW model input, exactly as in training.

    Runs on the decode pool: base64, JPEG draft decode and normalization all stay off the event loop.
    """
    if isinstance(data, str):
        data = _b64(data, f"instance {index}")
    pp = spec.preprocess
    return normalize(load_uint8(data, pp.image_size, resample=pp.resample, max_pixels=max_pixels), pp)


def probe_images(sources: Sequence[ImageSource], max_pixels: int, max_request_pixels: int) -> list[bytes]:
    """Base64-decode each image and read its size from the header only; refuse oversize requests.

    Runs on the decode pool before any image is decoded, so a request whose images add up to more
    than ``max_request_pixels`` (or holds one over ``max_pixels``) costs headers, not decodes.
    """
    out: list[bytes] = []
    total = 0
    for i, src in enumerate(sources):
        data = _b64(src, f"instance {i}") if isinstance(src, str) else src
        try:
            with open_image(data, max_pixels=max_pixels) as img:
                width, height = img.size
        except ImageError as e:
            raise from_image_error(e, i) from e
        total += width * height
        if total > max_request_pixels:
            raise PayloadTooLarge(
                f"the images add up to over {max_request_pixels:,} pixels by instance {i} "
                f"({width}x{height}), the limit of --max_request_pixels; send fewer or smaller images"
            )
        out.append(data)
    return out


def format_v1(outputs: dict[str, np.ndarray], spec: ModelSpec) -> list[dict[str, Any]]:
    """Per-image dicts: ``count``, ``probabilities`` by class, ``confidence`` (the probability of the
    returned count; not for regression), ``expected``, then ``count_set`` (the counts it may be) and
    ``needs_review`` when model.json has their thresholds (:func:`components.answers.answer`)."""
    probs, counts, expected = outputs["probabilities"], outputs["count"], outputs["expected"]
    extra = answer(probs, counts, expected, spec.classes, spec.answers)
    keys = [str(c) for c in spec.classes]
    preds: list[dict[str, Any]] = []
    for i in range(len(counts)):
        p: dict[str, Any] = {
            "count": int(counts[i]),
            "probabilities": {k: round(float(v), 6) for k, v in zip(keys, probs[i], strict=True)},
        }
        if extra.confidence is not None:
            p["confidence"] = round(float(extra.confidence[i]), 6)
        p["expected"] = round(float(expected[i]), 6)
        if extra.count_set is not None:
            p["count_set"] = [int(c) for c in extra.count_set[i]]
        if extra.needs_review is not None:
            p["needs_review"] = bool(extra.needs_review[i])
        preds.append(p)
    return preds


def output_types(spec: ModelSpec | None) -> list[dict[str, Any]]:
    """The V2 outputs a model returns, in order: its metadata and :func:`format_v2` both follow this
    (before a model is loaded, only the outputs every model returns)."""
    c = len(spec.classes) if spec is not None else -1
    types: list[tuple[str, str, list[int]]] = [("count", "INT64", [-1]), ("probabilities", "FP32", [-1, c])]
    if spec is not None and spec.answers.distribution:
        types.append(("confidence", "FP32", [-1]))
    types.append(("expected", "FP32", [-1]))
    if spec is not None and spec.answers.set_threshold is not None:
        types += [("count_set_low", "INT64", [-1]), ("count_set_high", "INT64", [-1])]
    if spec is not None and spec.answers.review_threshold is not None:
        types.append(("needs_review", "BOOL", [-1]))
    return [{"name": name, "datatype": dt, "shape": shape} for name, dt, shape in types]


def format_v2(
    outputs: dict[str, np.ndarray],
    spec: ModelSpec,
    model_name: str,
    request_id: str | None,
    version: str | None = None,
) -> InferResponse:
    """V2 outputs as :func:`output_types` lists them: ``count`` INT64 [N], ``probabilities`` FP32 [N,C],
    ``confidence`` and ``expected`` FP32 [N], the count set's ``count_set_low``/``count_set_high``
    INT64 [N] (sets are contiguous) and ``needs_review`` BOOL [N]."""
    probs = np.asarray(outputs["probabilities"], dtype=np.float32)
    extra = answer(probs, outputs["count"], outputs["expected"], spec.classes, spec.answers)
    tensors: dict[str, np.ndarray] = {
        "count": np.asarray(outputs["count"], dtype=np.int64),
        "probabilities": probs,
        "expected": np.asarray(outputs["expected"], dtype=np.float32),
    }
    if extra.confidence is not None:
        tensors["confidence"] = np.asarray(extra.confidence, dtype=np.float32)
    if extra.count_set is not None:
        tensors["count_set_low"] = np.array([s[0] for s in extra.count_set], dtype=np.int64)
        tensors["count_set_high"] = np.array([s[-1] for s in extra.count_set], dtype=np.int64)
    if extra.needs_review is not None:
        tensors["needs_review"] = np.asarray(extra.needs_review, dtype=bool)
    infer_outputs = []
    for t in output_types(spec):
        arr = tensors[t["name"]]
        infer_outputs.append(
            InferOutput(
                name=t["name"], shape=list(arr.shape), datatype=t["datatype"], data=arr.reshape(-1).tolist()
            )
        )
    return InferResponse(
        response_id=request_id or "",
        model_name=model_name,
        infer_outputs=infer_outputs,
        model_version=version,
    )


# ----------------------------------------------------------------------------- the KServe model


class InventoryCounter(Model):
    """``kserve.Model`` serving the bin-count ONNX model; ``load()`` makes it ready."""

    def __init__(self, name: str, model_dir: str | os.PathLike[str], options: ServingOptions | None = None):
        super().__init__(name)
        self.model_dir = Path(model_dir)
        self.options = options or ServingOptions()
        self.counter: OnnxCounter | None = None
        self.batcher: MicroBatcher | None = None
        self._decode_pool: ThreadPoolExecutor | None = None
        self.on_batch: Any = None  # (size, seconds) -> None; set by the server for metrics
        self.on_images: Any = None  # (n) -> None
        self.admission: Any = None  # serving.admission.AdmissionController; set by the server

    # KServe lifecycle -------------------------------------------------------------------------
    def load(self) -> bool:
        """Open the ONNX session, check it against model.json, warm it up and start accepting requests.

        Raises :class:`~serving.contract.ModelContractError` (a ``ConfigError``) when model.json and
        the graph disagree: a model that loads is a model that serves.
        """
        counter = OnnxCounter(self.model_dir, self.options)
        size = counter.item_shape
        counter.warm_up([1, self.options.max_batch_size])
        self.counter = counter
        self.batcher = MicroBatcher(
            counter.run,
            size,
            max_batch_size=self.options.max_batch_size,
            max_wait_ms=self.options.max_wait_ms,
            workers=self.options.resolve_workers(),
            on_batch=self._observe_batch,
        )
        self._decode_pool = ThreadPoolExecutor(
            max_workers=self.options.decode_threads or cpu_count(), thread_name_prefix="decode"
        )
        self.ready = True
        logger.info(
            "loaded %s (version %s, %s, %d px, classes %s) on %s; max batch %d, max wait %.1f ms, "
            "%d inference worker(s) x %d onnxruntime thread(s)",
            counter.onnx_path,
            counter.model_version,
            counter.spec.head,
            counter.spec.preprocess.image_size,
            list(counter.spec.classes),
            counter.providers,
            self.options.max_batch_size,
            self.options.max_wait_ms,
            self.batcher.workers,
            counter.intra_op_threads,
        )
        return self.ready

    def stop(self) -> None:
        """Release the micro-batcher (its tasks and inference threads) and the decode pool."""
        self.ready = False
        if self.batcher is not None:
            self.batcher.close()
        if self._decode_pool is not None:
            self._decode_pool.shutdown(wait=False, cancel_futures=True)
            self._decode_pool = None

    def _observe_batch(self, size: int, seconds: float) -> None:
        if self.on_batch is not None:
            self.on_batch(size, seconds)

    @property
    def model_version(self) -> str:
        """What every answer names as its model (:func:`served_version`, computed at load)."""
        if self.counter is None:
            raise InferenceError(f"model {self.name} is not loaded")
        return self.counter.model_version

    @property
    def spec(self) -> ModelSpec:
        if self.counter is None:
            raise InferenceError(f"model {self.name} is not loaded")
        return self.counter.spec

    # Handlers ---------------------------------------------------------------------------------
    def validate(self, payload: Any) -> Any:
        """Our preprocess already validated the request; KServe's dict checks don't apply."""
        return payload

    async def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> DecodedRequest:
        """Parse the body and decode every image on the decode pool (never on the event loop)."""
        pool = self._decode_pool
        if self.counter is None or pool is None:
            raise InferenceError(f"model {self.name} is not loaded")
        headers = headers or {}
        content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        args = (payload, self.options.max_instances, headers.get("x-request-id"), content_type)
        loop = asyncio.get_running_loop()
        if isinstance(payload, bytes | bytearray | memoryview) and not content_type.startswith("image/"):
            parsed = await loop.run_in_executor(pool, parse_request, *args)  # JSON parsing of up to 16 MB
        else:
            parsed = parse_request(*args)  # an image body, or JSON KServe parsed: no heavy work here
        if self.admission is not None:
            self.admission.claim(len(parsed.images))  # 503 now, before anything is decoded
        sources: Sequence[ImageSource] = parsed.images
        spec, max_pixels = self.counter.spec, self.options.max_pixels
        if len(sources) > 1:  # one image is checked against --max_pixels by its own decode
            sources = await loop.run_in_executor(
                pool, probe_images, sources, max_pixels, self.options.max_request_pixels
            )
        jobs = [
            loop.run_in_executor(pool, decode_one, src, spec, max_pixels, i) for i, src in enumerate(sources)
        ]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for i, r in enumerate(results):
            if isinstance(r, ImageError):
                raise from_image_error(r, i if len(results) > 1 else None) from r
            if isinstance(r, BaseException):
                raise r
        if self.on_images is not None:
            self.on_images(len(results))
        return DecodedRequest(list(results), parsed.protocol, parsed.request_id)  # type: ignore[arg-type]

    async def predict(self, payload: DecodedRequest, headers: dict[str, str] | None = None) -> Prediction:
        """Run the images through the micro-batcher (shared with concurrent requests)."""
        assert self.batcher is not None
        rows = await self.batcher.submit_many(payload.inputs)
        outputs = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        return Prediction(outputs, payload.protocol, payload.request_id)

    async def postprocess(
        self, result: Prediction, headers: dict[str, str] | None = None, response_headers: Any = None
    ) -> dict[str, Any] | InferResponse:
        """Answer in the protocol the request used."""
        if result.protocol == "v2":
            return format_v2(result.outputs, self.spec, self.name, result.request_id, self.model_version)
        return {
            "predictions": format_v1(result.outputs, self.spec),
            "model_version": self.model_version,
        }

    def get_input_types(self) -> list[dict[str, Any]]:
        return [{"name": "image", "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict[str, Any]]:
        """Exactly the V2 outputs this model returns (see :func:`output_types`)."""
        return output_types(self.counter.spec if self.counter else None)
