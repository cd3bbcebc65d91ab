"""Naive baseline server, built like the reference project's handler, for ``bench/loadtest.py --baseline``.

What the reference did per request: decode the full-size JPEG with Pillow, torchvision
``Resize`` + ``ToTensor`` + ``Normalize``, one image through an eager PyTorch ResNet18, one model
worker. It exists only to be measured against; the real server (:mod:`serving.model`) never imports
it or torch.

``python bench/naive.py --model_dir DIR --port 8090`` (binds 127.0.0.1 unless ``--host`` says so).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python bench/naive.py` puts bench/ first, not the repo
    sys.path.insert(0, str(REPO_ROOT))

from components.common import ConfigError, setup_logging  # noqa: E402

logger = logging.getLogger("bench.naive")


class NaivePredictor:
    """Eager PyTorch model + per-request torchvision transforms, one image at a time."""

    def __init__(self, model_dir: Path, num_threads: int | None = None) -> None:
        import torch
        from torchvision import transforms

        from components.model import ExportWrapper, build_model
        from components.modelspec import STATE_DICT_FILE, load_model_spec

        spec = load_model_spec(model_dir)
        weights = Path(model_dir) / STATE_DICT_FILE
        if not weights.is_file():
            raise ConfigError(f"{weights} is missing: the naive baseline needs the PyTorch state dict")
        if num_threads:
            torch.set_num_threads(num_threads)
        model = build_model(len(spec.classes), spec.head)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        temperature = spec.answers.temperature if spec.answers.distribution else None
        self.model = ExportWrapper(
            model, spec.head, spec.classes, spec.decision_offsets, temperature=temperature
        ).eval()
        self.classes = [str(c) for c in spec.classes]
        pp = spec.preprocess
        self.transform = transforms.Compose(
            [transforms.Resize(pp.image_size), transforms.ToTensor(), transforms.Normalize(pp.mean, pp.std)]
        )
        self.lock = threading.Lock()  # one model worker, like the reference
        self._torch = torch

    def predict(self, body: bytes) -> dict[str, Any]:
        from PIL import Image

        image = Image.open(io.BytesIO(body)).convert("RGB")  # full-size decode
        x = self.transform(image).unsqueeze(0)
        with self.lock, self._torch.no_grad():
            probs, count, expected = self.model(x)
        p = probs[0].tolist()
        return {
            "count": int(count[0]),
            "probabilities": dict(zip(self.classes, p, strict=True)),
            "confidence": max(p),
            "expected": float(expected[0]),
        }


def make_handler(predictor: NaivePredictor) -> type[BaseHTTPRequestHandler]:
    """A stdlib handler: any POST path is a prediction on a raw image body, GET /ping is health."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, so the client measures the model, not TCP setup

        def _reply(self, status: int, obj: dict[str, Any]) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._reply(200 if self.path in ("/ping", "/") else 404, {"status": "ready"})

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                self._reply(200, {"predictions": [predictor.predict(body)]})
            except Exception as e:  # the baseline only needs to survive the benchmark
                self._reply(400, {"error": str(e)})

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler


def serve(model_dir: Path, host: str, port: int, num_threads: int | None = None) -> None:
    """Load the model and serve until interrupted."""
    predictor = NaivePredictor(model_dir, num_threads)
    server = ThreadingHTTPServer((host, port), make_handler(predictor))
    server.daemon_threads = True
    logger.info("naive baseline on http://%s:%d (model %s)", host, port, model_dir)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/naive.py", description=__doc__.split("\n")[0])
    p.add_argument("--model_dir", required=True, type=Path, help="exported model dir with model.pt")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--num_threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    setup_logging()
    try:
        serve(args.model_dir, args.host, args.port, args.num_threads)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
