"""A TrainJob for the final fit, checked and rendered: names, sizes, the launch command, the manifest
(``trainer.kubeflow.org/v1alpha1``), and the errors a job can end in."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from components.common import ConfigError

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
#: k8s/components/trainer: the runtime, its volume and where every pod (and the task) mounts it
RUNTIME_NAME = "inventory-monitor-torch"
RUNTIME_KIND = "TrainingRuntime"
PVC_NAME = "inventory-monitor-training"
MOUNT_PATH = "/mnt/training"
#: the runtime's replicated job and container (Trainer's torch plugin looks for the container `node`)
TRAINER_JOB = "node"
GPU_RESOURCE = "nvidia.com/gpu"
#: owner of this module's entry in a TrainJob's spec.runtimePatches (a node selector)
PATCH_MANAGER = "inventory-monitor.io/pipeline"
KEEP_CHOICES = ("never", "failed", "always")
#: the pipeline parameter behind each setting: the messages below name these
PARAM = {
    "nodes": "trainjob_nodes",
    "gpus_per_node": "trainjob_gpus_per_node",
    "cpu": "trainjob_cpu",
    "memory": "trainjob_memory",
    "timeout_s": "trainjob_timeout_s",
    "keep": "trainjob_keep",
    "device": "device",
}
#: TrainJob names: an RFC 1035 label (the CRD's rule); at most 48 characters because the JobSet's
#: pods are named ``<name>-node-<job>-<pod>-<5 chars>`` and each must stay a 63-character DNS label
MAX_NAME = 48
RUN_DIRS = "runs"
METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "checkpoint.pt"
#: variables Trainer (PET_*) or torchrun set; a TrainJob may not set them (Trainer's webhook refuses PET_*)
RESERVED_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
#: consecutive failed status reads tolerated while polling (API server restarts, network blips)
MAX_READ_ERRORS = 5

_RFC1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_RFC1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_RFC1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUANTITY = re.compile(r"^(\d+(\.\d+)?|\.\d+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


class TrainJobError(RuntimeError):
    """The TrainJob could not be created, failed, or did not finish in time; the message says which."""


class TrainJobFailedError(TrainJobError):
    """The TrainJob's ``Failed`` condition became true."""


class TrainJobTimeoutError(TrainJobError):
    """The TrainJob did not finish within the timeout."""


class TrainJobNotCreatedError(TrainJobError):
    """The API server refused the TrainJob (no Trainer, no permission, invalid, name taken)."""


class CancelledError(TrainJobError):
    """SIGTERM while waiting (the pipeline run was stopped)."""


@dataclasses.dataclass(frozen=True)
class TrainJobResult:
    """A TrainJob that completed: its name, its last status and how long the wait took."""

    name: str
    namespace: str
    status: dict[str, Any]
    seconds: float
    deleted: bool


def param_name(key: str) -> str:
    return PARAM.get(key, key)


def check_int(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{param_name(key)} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_quantity(value: Any, key: str) -> str:
    text = str(value).strip()
    m = _QUANTITY.match(text)
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(
            f"{param_name(key)} must be a positive Kubernetes quantity (e.g. 4, 500m, 16Gi), got {value!r}"
        )
    return text


def check_job_name(name: str) -> str:
    """A TrainJob name: an RFC 1035 label (lowercase letters, digits, '-'; a letter first) of at most
    :data:`MAX_NAME` characters."""
    if not isinstance(name, str) or not _RFC1035_LABEL.match(name) or len(name) > MAX_NAME:
        raise ConfigError(
            f"TrainJob name {name!r} is invalid: lowercase letters, digits and '-', starting with a letter, "
            f"ending with a letter or digit, at most {MAX_NAME} characters"
        )
    return name


def check_namespace(namespace: str) -> str:
    if not isinstance(namespace, str) or not _RFC1123_LABEL.match(namespace) or len(namespace) > 63:
        raise ConfigError(f"namespace {namespace!r} is not a DNS-1123 label (lowercase, digits, '-', <= 63)")
    return namespace


def check_runtime_name(runtime: str) -> str:
    if not isinstance(runtime, str) or not _RFC1123_SUBDOMAIN.match(runtime) or len(runtime) > 253:
        raise ConfigError(f"training runtime name {runtime!r} is not a DNS-1123 subdomain")
    return runtime


def check_keep(keep: str) -> str:
    if keep not in KEEP_CHOICES:
        raise ConfigError(f"{param_name('keep')} must be one of {list(KEEP_CHOICES)}, got {keep!r}")
    return keep


def check_device(device: str, gpus_per_node: int) -> None:
    """The training device must match the TrainJob's GPUs: ``cpu`` with GPUs wastes them, ``cuda`` without
    any cannot start."""
    device = str(device).lower()
    if gpus_per_node > 0 and device == "cpu":
        raise ConfigError(
            f"{param_name('device')} is 'cpu' but {param_name('gpus_per_node')} is {gpus_per_node}: "
            "set device to auto or cuda"
        )
    if gpus_per_node == 0 and device.startswith("cuda"):
        raise ConfigError(
            f"{param_name('device')} is {device!r} but {param_name('gpus_per_node')} is 0: set device to "
            "cpu or auto, or give the TrainJob GPUs"
        )


def job_name(run_id: str, *, prefix: str = "inventory-train", suffix: str | None = None) -> str:
    """A fresh TrainJob name for a pipeline run: ``<prefix>-<first 8 of the run id>-<5 random>``."""
    stem = re.sub(r"[^a-z0-9]", "", str(run_id).lower())[:8] or "run"
    suffix = suffix if suffix is not None else hashlib.sha256(os.urandom(16)).hexdigest()[:5]
    return check_job_name(f"{prefix}-{stem}-{suffix}")


def launch(nodes: int, gpus_per_node: int) -> tuple[list[str], list[str]]:
    """The trainer container's command and the arguments before the training flags: one process runs
    the module directly; more go through torchrun (``torch.distributed.run``), which takes nnodes,
    nproc-per-node, the node rank and the master address from Trainer's ``PET_*`` variables."""
    if nodes * max(gpus_per_node, 1) == 1:
        return ["python", "-m", "components.train"], []
    return ["python", "-m", "torch.distributed.run"], ["--module", "components.train"]


def render_trainjob(
    name: str,
    *,
    namespace: str,
    image: str,
    train_args: Sequence[str],
    nodes: int = 1,
    gpus_per_node: int = 0,
    cpu: str = "4",
    memory: str = "16Gi",
    runtime: str = RUNTIME_NAME,
    runtime_kind: str = RUNTIME_KIND,
    env: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    active_deadline_s: int | None = None,
    node_selector: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The TrainJob (``trainer.kubeflow.org/v1alpha1``) for ``nodes`` x ``gpus_per_node``.

    ``train_args`` are ``python -m components.train``'s flags (:func:`components.settings.to_argv`).
    Each node gets requests = limits = ``cpu``, ``memory`` and ``gpus_per_node`` GPUs, and runs
    ``gpus_per_node`` processes (one on a CPU node). ``active_deadline_s`` lets the cluster stop the
    job even if the waiting task is gone; ``node_selector`` goes in through ``spec.runtimePatches``.
    Raises :class:`ConfigError` (naming the pipeline parameter) before anything is built.
    """
    nodes = check_int(nodes, "nodes", 1)
    gpus_per_node = check_int(gpus_per_node, "gpus_per_node", 0)
    cpu, memory = _check_quantity(cpu, "cpu"), _check_quantity(memory, "memory")
    check_job_name(name)
    check_namespace(namespace)
    check_runtime_name(runtime)
    if runtime_kind not in ("TrainingRuntime", "ClusterTrainingRuntime"):
        raise ConfigError(
            f"runtime kind must be TrainingRuntime or ClusterTrainingRuntime, got {runtime_kind!r}"
        )
    if not image or not isinstance(image, str) or any(c.isspace() for c in image) or len(image) > 500:
        raise ConfigError(f"the TrainJob image must be an image reference, got {image!r}")
    if image.endswith(":latest") or (":" not in image.rsplit("/", 1)[-1] and "@" not in image):
        raise ConfigError(f"the TrainJob image {image!r} needs a pinned tag or digest (never latest)")
    command, launcher_args = launch(nodes, gpus_per_node)
    args = launcher_args + [str(a) for a in train_args]
    if len(args) > 128:  # the CRD's limit
        raise ConfigError(f"{len(args)} arguments: a TrainJob takes at most 128")
    env_list = []
    for key, value in (env or {}).items():
        if not _ENV_NAME.match(key):
            raise ConfigError(f"environment variable name {key!r} is invalid")
        if key.startswith("PET_") or key in RESERVED_ENV:
            raise ConfigError(f"environment variable {key} is set by Trainer or torchrun; do not set it")
        env_list.append({"name": key, "value": str(value)})
    all_labels = {"app.kubernetes.io/part-of": "inventory-monitor", "app.kubernetes.io/component": "trainer"}
    for key, value in (labels or {}).items():
        if not _LABEL_VALUE.match(str(value)) or len(str(value)) > 63:
            raise ConfigError(f"label {key}={value!r}: a label value is <= 63 letters, digits, '-', '_', '.'")
        all_labels[key] = str(value)

    per_node: dict[str, str] = {"cpu": cpu, "memory": memory}
    if gpus_per_node:
        per_node[GPU_RESOURCE] = str(gpus_per_node)
    trainer: dict[str, Any] = {
        "image": image,
        "command": command,
        "args": args,
        "numNodes": nodes,
        "numProcPerNode": max(gpus_per_node, 1),
        "resourcesPerNode": {"requests": dict(per_node), "limits": dict(per_node)},
    }
    if env_list:
        trainer["env"] = env_list
    spec: dict[str, Any] = {
        "runtimeRef": {"apiGroup": GROUP, "kind": runtime_kind, "name": runtime},
        "trainer": trainer,
    }
    if active_deadline_s is not None:
        spec["activeDeadlineSeconds"] = check_int(active_deadline_s, "timeout_s", 1)
    if node_selector:
        pod_spec = {"nodeSelector": {str(k): str(v) for k, v in node_selector.items()}}
        replicated = {"name": TRAINER_JOB, "template": {"spec": {"template": {"spec": pod_spec}}}}
        spec["runtimePatches"] = [
            {
                "manager": PATCH_MANAGER,
                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [replicated]}}},
            }
        ]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": namespace, "labels": all_labels},
        "spec": spec,
    }
