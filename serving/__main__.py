"""``python -m serving``: the KServe model server for the bin-count model (also SageMaker's ``serve``).

KServe::

    python -m serving --model_dir /mnt/models --model_name inventory-counter --http_port 8080

SageMaker runs the image as ``docker run IMAGE serve``; ``serve`` as the first argument means model
directory ``/opt/ml/model`` and port 8080 unless flags say otherwise. ``/ping`` and
``/invocations`` are served in both modes.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys

from components.common import ConfigError, setup_logging

SAGEMAKER_MODEL_DIR = "/opt/ml/model"
DEFAULT_MODEL_NAME = "inventory-counter"


def build_parser() -> argparse.ArgumentParser:
    """KServe's model-server flags plus ours (importing KServe's parser module is the cost)."""
    from kserve import model_server

    from serving.model import INT8_CHOICES, ServingOptions

    d = ServingOptions()
    parser = argparse.ArgumentParser(
        prog="python -m serving",
        description="Serve the exported bin-count model with KServe (V1, V2, raw image, SageMaker routes).",
        parents=[model_server.parser],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # KServe's per-request latency line repeats what /metrics histograms and our access line hold.
    parser.set_defaults(model_name=DEFAULT_MODEL_NAME, enable_grpc=False, enable_latency_logging=False)
    parser.add_argument("--model_dir", default=None, help="exported model directory (model.json, model.onnx)")
    parser.add_argument(
        "--http_host", default="0.0.0.0", help="address the REST server binds (127.0.0.1 for local use)"
    )
    parser.add_argument("--max_batch_size", type=int, default=d.max_batch_size, help="images per batch")
    parser.add_argument(
        "--max_wait_ms", type=float, default=d.max_wait_ms, help="how long an idle batch waits for company"
    )
    parser.add_argument("--max_instances", type=int, default=d.max_instances, help="images per request")
    parser.add_argument("--max_request_mb", type=float, default=16.0, help="request body limit (413 above)")
    parser.add_argument(
        "--max_pixels",
        type=int,
        default=d.max_pixels,
        help="pixels per image, read from its header before decoding (413 above; the photos are < 1 MP)",
    )
    parser.add_argument(
        "--max_request_pixels",
        type=int,
        default=d.max_request_pixels,
        help="pixels per request over all its images, read from their headers before decoding (413 above)",
    )
    parser.add_argument(
        "--latency_budget_ms",
        type=float,
        default=d.latency_budget_ms,
        help="time an admitted request may take once its body arrived: the queue holds what half of it "
        "allows at the measured throughput, and a request still unanswered by then gets 503 + Retry-After",
    )
    parser.add_argument(
        "--max_queue_images",
        type=int,
        default=d.max_queue_images,
        help="ceiling on images admitted at once; the working limit is min(this, throughput x budget) "
        "and a request over it gets 503 + Retry-After before its body is read",
    )
    parser.add_argument(
        "--max_inflight_mb",
        type=float,
        default=d.max_inflight_mb,
        help="request bodies admitted at once, by Content-Length (503 + Retry-After above; "
        ">= --max_request_mb)",
    )
    parser.add_argument(
        "--read_timeout_s",
        type=float,
        default=d.read_timeout_s,
        help="time a client may take to send a request's headers, and then its body "
        "(408 and the connection closed)",
    )
    parser.add_argument(
        "--max_header_kb",
        type=int,
        default=d.max_header_kb,
        help="request line and headers, in KiB (431 and the connection closed above)",
    )
    parser.add_argument(
        "--max_headers",
        type=int,
        default=d.max_headers,
        help="header fields per request (431 and the connection closed above)",
    )
    parser.add_argument("--decode_threads", type=int, default=0, help="JPEG decode threads (0: CPU cores)")
    parser.add_argument(
        "--inference_workers",
        type=int,
        default=d.inference_workers,
        help="batches run in parallel (0: one per 4 CPU cores)",
    )
    parser.add_argument(
        "--intra_op_threads", type=int, default=0, help="onnxruntime threads per batch (0: cores / workers)"
    )
    parser.add_argument(
        "--timing_middleware",
        type=lambda x: x.lower() in ("1", "true", "yes"),
        default=False,
        help="keep KServe's per-request CPU-timing log middleware (costs ~1 ms per request)",
    )
    parser.add_argument(
        "--int8", choices=INT8_CHOICES, default=d.int8, help="auto: use the int8 model if it passed the gate"
    )
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse flags; a leading ``serve`` switches to SageMaker's defaults."""
    sagemaker = bool(argv) and argv[0] == "serve"
    args = build_parser().parse_args(argv[1:] if sagemaker else argv)
    args.sagemaker = sagemaker
    if args.model_dir is None:
        if not sagemaker:
            raise ConfigError("--model_dir is required (the exported model directory with model.json)")
        args.model_dir = SAGEMAKER_MODEL_DIR
    if sagemaker and args.http_port != 8080:
        logging.getLogger("serving").warning("SageMaker sends requests to port 8080, not %d", args.http_port)
    if args.workers != 1:
        raise ConfigError("--workers must be 1: the micro-batcher batches requests within one process")
    if args.max_request_mb <= 0:
        raise ConfigError(f"--max_request_mb must be > 0, got {args.max_request_mb}")
    if args.max_inflight_mb < args.max_request_mb:
        raise ConfigError(
            f"--max_inflight_mb must be >= --max_request_mb ({args.max_request_mb:g}), "
            f"got {args.max_inflight_mb:g}: a request of the largest size could never be admitted"
        )
    return args


def run_server(args: argparse.Namespace) -> None:
    """Load the model, wire routes, metrics and limits onto KServe's app, and serve until stopped."""
    from functools import partial

    from kserve import model_server

    from serving.admission import AdmissionMetrics, build_admission
    from serving.admission_http import AdmissionMiddleware
    from serving.door import DoorLimits, DoorProtocol
    from serving.errors import install_error_handlers
    from serving.model import InventoryCounter, ServingOptions
    from serving.sagemaker_routes import register_sagemaker_routes
    from serving.server import HostModelServer, RequestGuard, ServingMetrics

    options = ServingOptions(
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_instances=args.max_instances,
        max_pixels=args.max_pixels,
        max_request_pixels=args.max_request_pixels,
        max_queue_images=args.max_queue_images,
        latency_budget_ms=args.latency_budget_ms,
        max_inflight_mb=args.max_inflight_mb,
        read_timeout_s=args.read_timeout_s,
        max_header_kb=args.max_header_kb,
        max_headers=args.max_headers,
        decode_threads=args.decode_threads,
        inference_workers=args.inference_workers,
        intra_op_threads=args.intra_op_threads,
        int8=args.int8,
    )
    model = InventoryCounter(args.model_name, args.model_dir, options)
    model.load()

    metrics = ServingMetrics()
    model.on_batch = metrics.observe_batch
    model.on_images = metrics.observe_images
    app = model_server.app  # the FastAPI app KServe's REST server serves
    install_error_handlers(app)
    admission_metrics = AdmissionMetrics()
    model.admission = build_admission(model, admission_metrics)
    # Added before RequestGuard, so it runs inside it: RequestGuard logs and counts its answers too.
    app.add_middleware(
        AdmissionMiddleware,
        controller=model.admission,
        read_timeout_s=options.read_timeout_s,
        on_admitted=admission_metrics.observe_admitted,
    )
    app.add_middleware(
        RequestGuard,
        max_body_bytes=int(args.max_request_mb * 1024 * 1024),
        on_reject=metrics.observe_rejected,
    )
    register_sagemaker_routes(app, model)

    server = HostModelServer(
        http_host=args.http_host,
        timing_middleware=args.timing_middleware,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        workers=1,
        enable_grpc=args.enable_grpc,
        enable_docs_url=args.enable_docs_url,
        enable_latency_logging=args.enable_latency_logging,
        access_log_format=args.access_log_format,
        event_loop=args.event_loop,
        timeout_keep_alive=args.timeout_keep_alive,
        http_protocol=partial(
            DoorProtocol,
            limits=DoorLimits(options.max_header_kb * 1024, options.max_headers, options.read_timeout_s),
            on_refuse=metrics.observe_rejected,
        ),
    )
    # Everything imported and loaded so far lives as long as the server. Moving it out of the
    # collector's view keeps full collections (~100 ms over ~150k objects on a small CPU) from
    # stalling the event loop and landing in the tail latency.
    gc.collect()
    gc.freeze()
    server.start([model])


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: exit 2 with ``error: ...`` for configuration problems."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        setup_logging()
        run_server(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
