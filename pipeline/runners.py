"""Where ``kfp.local`` runs the tasks of a local run: this venv, or the components image under Docker.

``subprocess`` (the default) runs every task as a subprocess of the current venv: quick to start, but it
is not what a cluster runs. ``docker`` runs every task in the components image with
``kfp.local.DockerRunner``, the way a KFP cluster does: the image's venv and the modules its Dockerfile
copies, the image's non-root user, the component's own command in place of the image's entrypoint. The
containers share the host's network (a local S3 server or MinIO on 127.0.0.1 is reachable; no task
listens on a port) and see, at the same paths, the run directory (read-write: the pipeline root, the
SQLite study, a local model store) and a local data source or model store (the source read-only).
S3 credentials reach them as they would from a Kubernetes Secret: the ``AWS_*`` variables of this
environment.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from components.common import ConfigError

RUNNERS = ("subprocess", "docker")
#: The components image's user (docker/components.Dockerfile): owns the run directory when root runs.
IMAGE_UID = 10001
#: Environment passed into the task containers (what a cluster's Secrets and pod spec would set).
FORWARDED_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "OPTUNA_STORAGE",
    "OMP_NUM_THREADS",
)


def docker_client() -> Any:
    """A client of the engine at ``DOCKER_HOST`` (or the default socket) that answered a ping."""
    try:
        import docker
    except ImportError as e:  # pragma: no cover - kfp depends on docker
        raise ConfigError("the docker Python package is missing: pip install docker") from e
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        client = docker.from_env()
        client.ping()
    except Exception as e:  # the SDK raises DockerException, requests' or OSError's errors
        raise ConfigError(
            f"no Docker engine answers at {host}: start one (`sudo systemctl start docker`, or "
            "`sudo dockerd &`) or set DOCKER_HOST, or run the tasks in this venv (--runner subprocess; "
            "make: RUNNER=subprocess)"
        ) from e
    return client


def require_image(client: Any, image: str) -> None:
    """The image must be in the engine: kfp.local would otherwise try to pull it from a registry."""
    import docker

    try:
        client.images.get(image)
    except docker.errors.ImageNotFound as e:
        raise ConfigError(
            f"image {image} is not in the Docker engine: build it with `make images` "
            "(or name another with --image; make: COMPONENTS_IMAGE=...)"
        ) from e


def _outside(path: Path, parents: Iterable[Path]) -> bool:
    return not any(path == p or p in path.parents for p in parents)


def _hand_to_image_user(run_dir: Path) -> None:
    """As root, give the run directory to the image's user, who writes the task outputs into it."""
    for root, dirs, files in os.walk(run_dir):
        for name in (*dirs, *files):
            os.lchown(os.path.join(root, name), IMAGE_UID, IMAGE_UID)
    os.chown(run_dir, IMAGE_UID, IMAGE_UID)


def docker_runner(image: str, run_dir: Path, params: dict[str, Any]) -> Any:
    """``kfp.local.DockerRunner`` for ``image`` with the run directory and local paths of ``params``
    mounted; checks the engine and the image first (a ConfigError that says what to do)."""
    from kfp import local

    import docker

    client = docker_client()
    try:
        require_image(client, image)
    finally:
        client.close()
    run_dir = run_dir.resolve()
    mounts = [docker.types.Mount(str(run_dir), str(run_dir), type="bind", read_only=False)]
    for key, read_only in (("source", True), ("model_store", False)):
        value = str(params.get(key) or "")
        if value and not value.startswith("s3://"):
            path = Path(value).resolve()
            if _outside(path, [run_dir]):
                path.mkdir(parents=True, exist_ok=True)
                mounts.append(docker.types.Mount(str(path), str(path), type="bind", read_only=read_only))
    if os.getuid() == 0:
        _hand_to_image_user(run_dir)
        user = None  # the image's own non-root user
    else:
        user = f"{os.getuid()}:{os.getgid()}"  # the run's files stay the caller's
    args: dict[str, Any] = {
        "network_mode": "host",
        # KFP's container spec replaces the image's ENTRYPOINT with the component's command
        "entrypoint": [],
        "mounts": mounts,
        "environment": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ},
    }
    if user:
        args["user"] = user
    return local.DockerRunner(**args)
