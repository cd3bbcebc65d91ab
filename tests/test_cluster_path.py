"""The cluster path, run for real: the components image, the pipeline inside it, and a served answer.

* The components image is built on the local base (torch from the package index this machine reaches)
  and one step's CLI runs in it as the image's non-root user, against the local S3 server.
* ``python -m pipeline.run_local --runner docker`` (``make run RUNNER=docker``) runs the whole pipeline
  with ``kfp.local.DockerRunner``: every task in that image, on the host network, reading a small ABID
  sample from the local S3 server and publishing to an S3 bucket on it (the way MinIO serves a cluster).
* From the version it published, a pod is assembled the way KServe does it: KServe's own storage
  initializer code (``kserve_storage.Storage``) downloads the rendered manifest's ``STORAGE_URI`` with
  the environment KServe derives from the overlay's S3 Secret into a directory that the serving image
  then mounts read-only at ``/mnt/models``; the container must answer a real bin JPEG with the count
  ``components.evaluate`` gives for that image and that model.

Everything binds 127.0.0.1; every container is removed afterwards.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.aws import FAKE_CREDENTIALS, free_port
from tests.fixtures.docker import DockerEngine
from tests.fixtures.images import http, start, wait_until
from tests.fixtures.s3data import AbidBucket, s3_client

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "inventory-counter"
IMAGE_UID = "10001"


def kserve_storage_env(secret: dict[str, Any], endpoint: str) -> dict[str, str]:
    """What KServe's controller puts into the storage initializer for an S3 Secret of the predictor's
    service account: the keys of its data, and its ``serving.kserve.io/s3-*`` annotations as
    ``S3_ENDPOINT``/``AWS_ENDPOINT_URL`` (scheme from ``s3-usehttps``), ``S3_USE_HTTPS``,
    ``S3_VERIFY_SSL``, ``AWS_DEFAULT_REGION``. ``endpoint`` stands in for the annotation's in-cluster
    host name, which only cluster DNS resolves."""
    ann = secret["metadata"].get("annotations", {})
    env = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    env.update(secret.get("stringData", {}))
    use_https = ann.get("serving.kserve.io/s3-usehttps", "1")
    if "serving.kserve.io/s3-endpoint" in ann:
        env["S3_ENDPOINT"] = endpoint
        env["AWS_ENDPOINT_URL"] = ("http://" if use_https == "0" else "https://") + endpoint
        env["S3_USE_HTTPS"] = use_https
    if "serving.kserve.io/s3-verifyssl" in ann:
        env["S3_VERIFY_SSL"] = ann["serving.kserve.io/s3-verifyssl"]
    if "serving.kserve.io/s3-region" in ann:
        env["AWS_DEFAULT_REGION"] = ann["serving.kserve.io/s3-region"]
    return env


def kind_overlay_secret(tmp_path: Path) -> dict[str, Any]:
    """The ``s3-credentials`` Secret of the kind overlay (MinIO in the cluster), rendered by kubectl
    from a copy of k8s/ whose git-ignored s3.env holds the local S3 server's credentials."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl not found: `kubectl kustomize` renders the manifests (install kubectl >= 1.27)")
    k8s = tmp_path / "k8s"
    shutil.copytree(REPO / "k8s", k8s, ignore=shutil.ignore_patterns("s3.env"))
    (k8s / "base" / "s3.env").write_text(
        "".join(f"{k}={FAKE_CREDENTIALS[k]}\n" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))
    )
    out = subprocess.run(
        [kubectl, "kustomize", str(k8s / "overlays" / "kind")], capture_output=True, text=True, check=True
    ).stdout
    (secret,) = [
        d
        for d in yaml.safe_load_all(out)
        if d and d["kind"] == "Secret" and d["metadata"]["name"] == "s3-credentials"
    ]
    return secret


def storage_uri(manifest: dict[str, Any]) -> str:
    """The first container's ``STORAGE_URI`` of a rendered InferenceService."""
    (container,) = manifest["spec"]["predictor"]["containers"]
    (uri,) = [e["value"] for e in container["env"] if e["name"] == "STORAGE_URI"]
    return uri


# --------------------------------------------------------------------------------------------------
# the docker runner's checks (no engine needed)
# --------------------------------------------------------------------------------------------------


def run_local(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.run_local", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_docker_runner_without_an_engine_says_how_to_start_one(tmp_path: Path, abid_dir: Path) -> None:
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    proc = run_local("--runner", "docker", "--source", str(abid_dir), "--out", str(tmp_path / "run"), env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: no Docker engine answers at unix://")
    assert "start one" in lines[0] and "--runner subprocess" in lines[0]
    assert not (tmp_path / "run" / "kfp").exists() or not any((tmp_path / "run" / "kfp").iterdir())


def test_make_run_rejects_an_unknown_runner_in_make_words(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["make", "-o", ".venv/.installed-dev", "run", "RUNNER=kubernetes", f"RUN_DIR={tmp_path}/run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "RUNNER=kubernetes" in proc.stdout + proc.stderr
    assert "RUNNER=subprocess" in proc.stdout + proc.stderr and "RUNNER=docker" in proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------------
# the components image
# --------------------------------------------------------------------------------------------------


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_components_image_runs_a_step_as_its_non_root_user(
    docker_engine: DockerEngine, components_image: str, abid_bucket: AbidBucket, tmp_path: Path
) -> None:
    info = json.loads(docker_engine.run(["image", "inspect", components_image]).stdout)[0]
    assert info["Config"]["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert info["Config"]["Entrypoint"] == ["/opt/venv/bin/python", "-m"]
    print(f"\ncomponents image: {info['Size'] / 1e9:.2f} GB, storage driver {docker_engine.storage_driver}")

    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)  # the image's user writes here, as into a KFP output volume
    env = [a for k, v in FAKE_CREDENTIALS.items() for a in ("-e", f"{k}={v}")]
    proc = docker_engine.run(
        [
            "run", "--rm", "--network", "host", "--read-only", "--tmpfs", "/tmp",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges", *env,
            "-v", f"{out}:/out", components_image,
            "components.ingest", "--source", abid_bucket.url, "--endpoint-url", abid_bucket.endpoint,
            "--per-class", "2", "--out", "/out/data", "--no-progress",
        ],
        timeout=300,
    )  # fmt: skip
    manifest = (out / "data" / "manifest.csv").read_text().splitlines()
    assert len(manifest) - 1 == 2 * 5, proc.stdout + proc.stderr
    owners = {p.stat().st_uid for p in (out / "data").rglob("*")}
    assert owners == {int(IMAGE_UID)}, f"written by uids {owners}, not the image's user"
    imports = docker_engine.run(
        [
            "run", "--rm", "--network", "none", "--entrypoint", "/opt/venv/bin/python", components_image,
            "-c", "import torch, torchvision, onnxruntime, kfp, optuna, components.quantize, "
            "pipeline.steps, components.trainjob, components.ingest_merge; import importlib.util as u, sys; "
            "sys.exit(u.find_spec('pip') is not None)",
        ],
        check=False,
    )  # fmt: skip
    assert imports.returncode == 0, f"the image lacks what its steps import, or keeps pip:\n{imports.stderr}"


# --------------------------------------------------------------------------------------------------
# the pipeline in the image, then a pod-style server from what it published
# --------------------------------------------------------------------------------------------------


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_pipeline_in_the_components_image_publishes_a_model_a_pod_serves(
    docker_engine: DockerEngine,
    components_image: str,
    serving_image: str,
    abid_bucket: AbidBucket,
    tmp_path: Path,
    abid_dir: Path,
) -> None:
    s3 = s3_client(abid_bucket.endpoint)
    s3.create_bucket(Bucket="models")
    run_dir = tmp_path / "run"
    env = {**docker_engine.env, **FAKE_CREDENTIALS, "OMP_NUM_THREADS": "1"}
    argv = [
        sys.executable, "-m", "pipeline.run_local", "--runner", "docker", "--image", components_image,
        "--source", abid_bucket.url, "--endpoint-url", abid_bucket.endpoint,
        "--store", "s3://models/registry", "--model-version", "in-image", "--out", str(run_dir),
        "--per-class", "4", "--image-size", "32", "--epochs", "1", "--trials", "2", "--tune-epochs", "1",
        "--workers", "2", "--param", "batch_size=8", "--param", "accuracy_margin=-1",
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800, check=False)
    print(f"\nin-image pipeline run: {time.monotonic() - started:.0f}s")
    assert proc.returncode == 0, (
        f"run_local --runner docker failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    )

    from pipeline.run_local import collect_run

    (run,) = list((run_dir / "kfp").iterdir())
    summary = collect_run(run)
    assert summary.published, proc.stdout[-3000:]
    # the tasks ran in the image as its user: every output was written by uid 10001
    model_art = summary.artifact("train-model", "model")
    assert model_art is not None
    model_dir = Path(model_art["uri"])
    assert model_dir.stat().st_uid == int(IMAGE_UID)
    # int8 is on in every profile: the train task quantized in the image (components.quantize)
    assert summary.artifact("train-model", "metrics")["metadata"].get("int8_accepted") in (0.0, 1.0)

    # the rendered manifest names the published version
    isvc = summary.artifact("publish-model", "inference_service")
    assert isvc is not None
    manifest = yaml.safe_load(Path(isvc["uri"]).read_text())
    uri = storage_uri(manifest)
    assert uri == summary.param("publish-model", "storage_uri")
    assert uri.startswith("s3://models/registry/") and "in-image" in uri

    # KServe's storage initializer: its own code, the Secret's S3 settings, into the model volume
    models = tmp_path / "mnt-models"
    host = abid_bucket.endpoint.removeprefix("http://")
    init_env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        **kserve_storage_env(kind_overlay_secret(tmp_path), host),
    }
    init = subprocess.run(
        [
            sys.executable, "-c",
            "import sys; from kserve_storage import Storage; Storage.download(sys.argv[1], sys.argv[2])",
            uri, str(models),
        ],
        env=init_env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert init.returncode == 0, init.stderr[-3000:]
    assert (models / "model.json").is_file() and (models / "model.onnx").is_file(), sorted(models.iterdir())
    models.chmod(0o755)
    for f in models.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)

    # components.evaluate's count for each test image, with the model the store holds
    dataset = Path(summary.artifact("merge-shards", "dataset")["uri"])
    test_csv = Path(summary.artifact("split", "test")["uri"])
    from components.evaluate import evaluate, load_predictions

    evaluate(models, test_csv, tmp_path / "eval", data_root=dataset, progress=False)
    ids, _, predicted = load_predictions(tmp_path / "eval" / "predictions.csv")
    with test_csv.open(newline="") as fh:
        paths = {row["id"]: row["path"] for row in csv.DictReader(fh)}
    image, expected = dataset / paths[ids[0]], int(predicted[0])

    port = free_port()
    server = start(
        docker_engine, serving_image, models, "/mnt/models", port,
        "--model_dir=/mnt/models", f"--model_name={MODEL_NAME}",
    )  # fmt: skip
    try:
        wait_until(docker_engine, server, "/v2/health/ready")
        status, body = http(
            "POST", f"{server.url}/v1/models/{MODEL_NAME}:predict", image.read_bytes(), "image/jpeg"
        )
    finally:
        docker_engine.run(["rm", "-f", "-v", server.cid], check=False)
    assert status == 200, body
    assert body["predictions"][0]["count"] == expected, (body, expected, image)
