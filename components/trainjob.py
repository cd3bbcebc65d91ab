"""The pipeline's final fit as a Kubeflow Trainer TrainJob: render it, create it, wait for it.

A pipeline task (in the components image, with the shared volume mounted at :data:`MOUNT_PATH`)
calls :func:`fit_on_trainjob` with the same :class:`~components.training.config.TrainConfig` it would
train in its own pod. That

1. checks every setting (:func:`render_trainjob`: nodes, GPUs, resources, names), before any copy;
2. stages the run on the shared volume, ``MOUNT_PATH/runs/<job name>/``: the train/val(/test)
   manifests, only the images they list (under ``data/``), the starting weights;
3. creates a TrainJob that references the project's TrainingRuntime (``k8s/components/trainer``:
   the same volume at the same path in every training pod, so one set of paths means the same files
   in the task and in the pods) and runs ``python -m components.train`` with the config as flags, or,
   for more than one process (N nodes x G GPUs), the same module under torchrun, which reads the
   ``PET_*`` variables Trainer's torch policy sets and gives each process WORLD_SIZE, RANK and
   LOCAL_RANK;
4. polls the TrainJob's conditions until ``Complete`` or ``Failed`` or the timeout
   (:func:`create_and_wait`), deletes it or keeps it (``keep``), and
5. copies the model directory rank 0 wrote back into the task's output (``cfg.out_dir``, without
   ``checkpoint.pt``) and returns the run's :class:`~components.training.config.TrainResult` read from
   its ``metrics.json``.

The Kubernetes API is injected (``api``: anything with the three ``*_namespaced_custom_object``
methods of ``kubernetes.client.CustomObjectsApi``), so tests pass a fake. Torch-free, and the
``kubernetes`` package is imported only by :func:`custom_objects_api`.
``python -m components.trainjob --name NAME --image IMAGE -- TRAIN_FLAGS...`` prints a TrainJob as YAML.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from components.common import ConfigError
from components.settings import to_argv

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
SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

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


class _CancelledError(TrainJobError):
    """SIGTERM while waiting (the pipeline run was stopped)."""


@dataclasses.dataclass(frozen=True)
class TrainJobResult:
    """A TrainJob that completed: its name, its last status and how long the wait took."""

    name: str
    namespace: str
    status: dict[str, Any]
    seconds: float
    deleted: bool


# -------------------------------------------------------------------------------------------- checks


def _param(key: str) -> str:
    return PARAM.get(key, key)


def _check_int(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{_param(key)} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_quantity(value: Any, key: str) -> str:
    text = str(value).strip()
    m = _QUANTITY.match(text)
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(
            f"{_param(key)} must be a positive Kubernetes quantity (e.g. 4, 500m, 16Gi), got {value!r}"
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
        raise ConfigError(f"{_param('keep')} must be one of {list(KEEP_CHOICES)}, got {keep!r}")
    return keep


def check_device(device: str, gpus_per_node: int) -> None:
    """The training device must match the TrainJob's GPUs: ``cpu`` with GPUs wastes them, ``cuda`` without
    any cannot start."""
    device = str(device).lower()
    if gpus_per_node > 0 and device == "cpu":
        raise ConfigError(
            f"{_param('device')} is 'cpu' but {_param('gpus_per_node')} is {gpus_per_node}: "
            "set device to auto or cuda"
        )
    if gpus_per_node == 0 and device.startswith("cuda"):
        raise ConfigError(
            f"{_param('device')} is {device!r} but {_param('gpus_per_node')} is 0: set device to cpu or "
            f"auto, or give the TrainJob GPUs"
        )


def job_name(run_id: str, *, prefix: str = "inventory-train", suffix: str | None = None) -> str:
    """A fresh TrainJob name for a pipeline run: ``<prefix>-<first 8 of the run id>-<5 random>``."""
    stem = re.sub(r"[^a-z0-9]", "", str(run_id).lower())[:8] or "run"
    suffix = suffix if suffix is not None else hashlib.sha256(os.urandom(16)).hexdigest()[:5]
    return check_job_name(f"{prefix}-{stem}-{suffix}")


# ------------------------------------------------------------------------------------------- render


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
    nodes = _check_int(nodes, "nodes", 1)
    gpus_per_node = _check_int(gpus_per_node, "gpus_per_node", 0)
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
        spec["activeDeadlineSeconds"] = _check_int(active_deadline_s, "timeout_s", 1)
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


# --------------------------------------------------------------------------------------------- wait


def _api_status(e: BaseException) -> int | None:
    status = getattr(e, "status", None)
    return status if isinstance(status, int) else None


def _api_message(e: BaseException) -> str:
    """The API server's own message from an ApiException's JSON body, else the exception's text."""
    body = getattr(e, "body", None)
    if body:
        try:
            data = json.loads(body)
        except (TypeError, ValueError):
            data = None
        if isinstance(data, dict) and data.get("message"):
            return str(data["message"])
    reason = getattr(e, "reason", None)
    if reason:
        return f"{_api_status(e) or ''} {reason}".strip()
    return str(e) or type(e).__name__


def _create_error(e: BaseException, namespace: str, name: str) -> str:
    status, msg = _api_status(e), _api_message(e)
    where = f"TrainJob {namespace}/{name}"
    if status == 404:
        return (
            f"cannot create {where}: {msg}. Is Kubeflow Trainer installed (CRD trainjobs.{GROUP}) and does "
            f"namespace {namespace} exist? See docs/kubernetes.md"
        )
    if status == 403:
        return (
            f"cannot create {where}: {msg}. The pipeline's service account needs create/get/delete on "
            f"trainjobs in {namespace}: kubectl apply -k k8s/overlays/kubeflow-trainer"
        )
    if status == 409:
        return f"cannot create {where}: a TrainJob of that name exists already ({msg})"
    if status in (400, 422):
        return f"{where} was rejected by the API server (is runtime and image right?): {msg}"
    return f"cannot create {where}: {msg}"


def _conditions(obj: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    conds = ((obj or {}).get("status") or {}).get("conditions") or []
    return [c for c in conds if isinstance(c, dict)]


def _true(conds: Sequence[Mapping[str, Any]], kind: str) -> Mapping[str, Any] | None:
    return next((c for c in conds if c.get("type") == kind and c.get("status") == "True"), None)


def _summary(conds: Sequence[Mapping[str, Any]]) -> str:
    if not conds:
        return "no conditions yet (Trainer has not picked the job up: is its controller running?)"
    return "; ".join(
        f"{c.get('type')}={c.get('status')}"
        + (f" ({c.get('reason')}: {c.get('message')})" if c.get("reason") or c.get("message") else "")
        for c in conds
    )


def _should_delete(keep: str, outcome: str) -> bool:
    """never: always delete; failed: keep a failed job (its pods' logs), delete the rest; always: keep.
    A job still running when the wait ends (timeout, cancel) is deleted unless keep is always: it would
    hold its nodes."""
    return keep == "never" or (keep == "failed" and outcome != "failed")


def _print(message: str) -> None:
    print(message, flush=True)


def create_and_wait(
    api: Any,
    manifest: Mapping[str, Any],
    timeout_s: float,
    poll_s: float = 15.0,
    *,
    keep: str = "failed",
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    log: Callable[[str], None] | None = None,
    handle_sigterm: bool = True,
) -> TrainJobResult:
    """Create the TrainJob ``manifest`` through ``api`` (a ``kubernetes.client.CustomObjectsApi``), poll
    its conditions every ``poll_s`` until ``Complete`` (returned) or ``Failed`` (:class:`TrainJobFailedError`
    with the job's own message) or ``timeout_s`` (:class:`TrainJobTimeoutError` with its last conditions),
    then delete it or keep it per ``keep`` (:data:`KEEP_CHOICES`, see :func:`_should_delete`).

    A SIGTERM while waiting (the KFP run was cancelled) ends the wait like a timeout, so the job is
    deleted rather than left running.
    """
    keep = check_keep(keep)
    if not timeout_s or timeout_s <= 0:
        raise ConfigError(f"{_param('timeout_s')} must be > 0, got {timeout_s!r}")
    if not poll_s or poll_s <= 0:
        raise ConfigError(f"poll interval must be > 0, got {poll_s!r}")
    say = log or _print
    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    where = f"TrainJob {namespace}/{name}"
    ref = {"group": GROUP, "version": VERSION, "namespace": namespace, "plural": PLURAL}
    try:
        api.create_namespaced_custom_object(body=copy.deepcopy(dict(manifest)), **ref)
    except Exception as e:
        raise TrainJobNotCreatedError(_create_error(e, namespace, name)) from e
    trainer = manifest.get("spec", {}).get("trainer", {})
    say(
        f"created {where}: {trainer.get('numNodes', 1)} node(s) x {trainer.get('numProcPerNode', 1)} "
        f"process(es); logs: kubectl -n {namespace} logs -l jobset.sigs.k8s.io/jobset-name={name} -f"
    )

    installed, previous = False, None
    if handle_sigterm and threading.current_thread() is threading.main_thread():

        def on_sigterm(signum: int, frame: Any) -> None:
            raise _CancelledError(f"{where}: the task was stopped (SIGTERM) while waiting")

        previous, installed = signal.signal(signal.SIGTERM, on_sigterm), True
    start = clock()
    outcome, obj, errors, seen = "unfinished", None, 0, ""
    try:
        while True:
            try:
                obj = api.get_namespaced_custom_object(name=name, **ref)
                errors = 0
            except Exception as e:
                if _api_status(e) == 404:
                    raise TrainJobError(f"{where} disappeared while running (deleted by someone?)") from e
                errors += 1
                if errors > MAX_READ_ERRORS:
                    raise TrainJobError(f"cannot read {where} ({errors} tries): {_api_message(e)}") from e
                say(f"reading {where} failed ({_api_message(e)}); retrying")
            conds = _conditions(obj)
            now = _summary(conds) if obj is not None else seen
            if now != seen:
                progress = ((obj or {}).get("status") or {}).get("trainerStatus") or {}
                pct = progress.get("progressPercentage")
                say(f"{where}: {now}" + (f" [{pct}%]" if pct is not None else ""))
                seen = now
            failed = _true(conds, "Failed")
            if failed:
                outcome = "failed"
                kept = not _should_delete(keep, outcome)
                raise TrainJobFailedError(
                    f"{where} failed ({failed.get('reason') or 'no reason'}): "
                    f"{failed.get('message') or 'no message'}. "
                    + (
                        f"Logs: kubectl -n {namespace} logs -l jobset.sigs.k8s.io/jobset-name={name} "
                        "--tail=200 (the job is kept)"
                        if kept
                        else f"The job was deleted ({_param('keep')}={keep}); keep it with failed or always"
                    )
                )
            if _true(conds, "Complete"):
                outcome = "complete"
                return TrainJobResult(
                    name,
                    namespace,
                    dict((obj or {}).get("status") or {}),
                    clock() - start,
                    _should_delete(keep, outcome),
                )
            left = timeout_s - (clock() - start)
            if left <= 0:
                raise TrainJobTimeoutError(
                    f"{where} did not finish within {timeout_s:g} s ({_param('timeout_s')}); last state: "
                    f"{_summary(conds)}"
                )
            sleep(min(poll_s, left))
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        if _should_delete(keep, outcome):
            try:
                api.delete_namespaced_custom_object(name=name, propagation_policy="Background", **ref)
                say(f"deleted {where}")
            except Exception as e:  # never hide the outcome behind a failed clean-up
                if _api_status(e) != 404:
                    say(f"could not delete {where}: {_api_message(e)}; delete it by hand")
        else:
            say(f"kept {where} ({_param('keep')}={keep}); kubectl -n {namespace} delete trainjob {name}")


def custom_objects_api() -> Any:
    """A ``CustomObjectsApi`` with the pod's service account (in a cluster) or the local kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


def current_namespace() -> str:
    """This pod's namespace: ``$POD_NAMESPACE`` (the downward API), else the service account's."""
    ns = os.environ.get("POD_NAMESPACE", "").strip()
    if not ns and SA_NAMESPACE_FILE.is_file():
        ns = SA_NAMESPACE_FILE.read_text(encoding="utf-8").strip()
    if not ns:
        raise ConfigError(
            "cannot tell this pod's namespace: set POD_NAMESPACE (kfp-kubernetes: "
            "use_field_path_as_env(task, 'POD_NAMESPACE', 'metadata.namespace')) or pass namespace"
        )
    return check_namespace(ns)


# ------------------------------------------------------------------------------- stage and collect


def staged_config(cfg: Any, run_dir: Path) -> Any:
    """``cfg`` with every path in ``run_dir`` (the layout :func:`stage_inputs` writes) and the settings a
    pod needs: no progress bars, the image cache per pod (``$INVENTORY_MONITOR_CACHE``), no resume."""
    if getattr(cfg, "pretrain_extra", None) or getattr(cfg, "teacher", ()):
        raise ConfigError(
            "pretraining (pretrain_extra) and teachers do not run on a TrainJob: the pipeline's pretrain "
            "task makes the backbone this fit starts from"
        )
    changes: dict[str, Any] = {
        "train_csv": run_dir / "train.csv",
        "val_csv": run_dir / "val.csv",
        "data_root": run_dir / "data",
        "out_dir": run_dir / "model",
        "cache_dir": None,
        "progress": False,
        "resume": False,
    }
    if cfg.test_csv is not None:
        changes["test_csv"] = run_dir / "test.csv"
    if cfg.weights not in ("none", "imagenet"):
        changes["weights"] = str(run_dir / "weights" / Path(cfg.weights).name)
    return dataclasses.replace(cfg, **changes)


def _staged_path(path: str) -> str:
    """Where an image of a manifest goes under ``data/``: its relative path, or, for an absolute path or
    one that leaves the data root, ``external/<hash>/<file name>``."""
    p = Path(path)
    if p.is_absolute() or ".." in p.parts:
        return str(Path("external") / hashlib.sha256(path.encode()).hexdigest()[:16] / p.name)
    return str(p)


def stage_inputs(cfg: Any, staged: Any) -> int:
    """Copy what ``staged`` (:func:`staged_config`) reads from where ``cfg`` has it: each manifest
    (rewritten with the staged image paths), the images they list, the starting weights (and the
    backbone record next to them). Returns the number of images copied."""
    from components.manifest import read_manifest, resolve_data_root, write_manifest
    from components.training.config import BACKBONE_FILE

    copied: set[str] = set()
    pairs = [(cfg.train_csv, staged.train_csv), (cfg.val_csv, staged.val_csv)]
    if cfg.test_csv is not None:
        pairs.append((cfg.test_csv, staged.test_csv))
    for src_csv, dst_csv in pairs:
        src_root = resolve_data_root(src_csv, cfg.data_root)
        rows = read_manifest(src_csv)
        out_rows = []
        for row in rows:
            rel = _staged_path(row.path)
            if rel not in copied:
                src = Path(row.path) if os.path.isabs(row.path) else src_root / row.path
                if not src.is_file():
                    raise ConfigError(f"{src_csv}: image {src} does not exist")
                dst = Path(staged.data_root) / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
                copied.add(rel)
            out_rows.append(dataclasses.replace(row, path=rel))
        Path(dst_csv).parent.mkdir(parents=True, exist_ok=True)
        write_manifest(dst_csv, out_rows)
    if staged.weights != cfg.weights:
        dst = Path(staged.weights)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cfg.weights, dst)
        record = Path(cfg.weights).parent / BACKBONE_FILE
        if record.is_file():
            shutil.copyfile(record, dst.parent / BACKBONE_FILE)
    return len(copied)


def collect_model(run_model: Path, out_dir: Path, seconds: float = 0.0) -> Any:
    """Copy the model directory the TrainJob wrote into ``out_dir`` (without ``checkpoint.pt``) and return
    its :class:`~components.training.config.TrainResult` (from ``metrics.json``)."""
    from components.training.config import TrainResult

    metrics_path = Path(run_model) / METRICS_FILE
    if not metrics_path.is_file():
        raise TrainJobError(
            f"the TrainJob completed but {metrics_path} does not exist: rank 0 exports the model into --out"
        )
    shutil.copytree(run_model, out_dir, ignore=shutil.ignore_patterns(CHECKPOINT_FILE), dirs_exist_ok=True)
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    history = list(metrics.pop("history", []))
    return TrainResult(
        Path(out_dir),
        metrics,
        int(metrics.get("best_epoch", 0)),
        int(metrics.get("epochs_run", len(history))),
        bool(metrics.get("stopped_early", False)),
        history,
        seconds,
    )


def fit_on_trainjob(
    cfg: Any,
    *,
    name: str,
    image: str,
    nodes: int = 1,
    gpus_per_node: int = 0,
    cpu: str = "4",
    memory: str = "16Gi",
    timeout_s: int = 24 * 3600,
    keep: str = "failed",
    namespace: str = "",
    runtime: str = RUNTIME_NAME,
    runtime_kind: str = RUNTIME_KIND,
    mount_path: str | Path = MOUNT_PATH,
    poll_s: float = 15.0,
    env: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    node_selector: Mapping[str, str] | None = None,
    api: Any = None,
    log: Callable[[str], None] | None = None,
) -> Any:
    """Train ``cfg`` (a ``TrainConfig`` with this task's paths; the model goes to ``cfg.out_dir``) on a
    TrainJob and return its ``TrainResult``; see the module docstring. ``namespace`` "" is this pod's.

    The run directory on the shared volume is removed when the job is (``keep``); a failed run's stays
    next to the kept job for inspection.
    """
    say = log or _print
    check_keep(keep)
    _check_int(timeout_s, "timeout_s", 1)
    check_device(cfg.device, _check_int(gpus_per_node, "gpus_per_node", 0))
    mount = Path(mount_path)
    run_dir = mount / RUN_DIRS / check_job_name(name)
    staged = staged_config(cfg, run_dir)
    manifest = render_trainjob(
        name,
        namespace=namespace or current_namespace(),
        image=image,
        train_args=to_argv(staged),
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        cpu=cpu,
        memory=memory,
        runtime=runtime,
        runtime_kind=runtime_kind,
        env=env,
        labels=labels,
        active_deadline_s=int(timeout_s),
        node_selector=node_selector,
    )
    if not mount.is_dir() or not os.access(mount, os.W_OK):
        raise ConfigError(
            f"no writable shared volume at {mount}: mount the PVC {PVC_NAME} there in this task "
            f"(kfp-kubernetes mount_pvc) and apply k8s/overlays/kubeflow-trainer"
        )
    if run_dir.exists():
        raise ConfigError(f"{run_dir} exists already: TrainJob names must be new for each run")
    remove = True  # what fails before a job exists leaves nothing worth keeping
    try:
        n = stage_inputs(cfg, staged)
        say(f"staged {n} images and the manifests in {run_dir}")
        api = api if api is not None else custom_objects_api()
        try:
            result = create_and_wait(api, manifest, timeout_s, poll_s, keep=keep, log=say)
        except TrainJobNotCreatedError:
            raise
        except TrainJobFailedError:
            remove = _should_delete(keep, "failed")
            raise
        except TrainJobError:
            remove = _should_delete(keep, "unfinished")
            raise
        remove = keep == "never"  # a model directory that cannot be collected stays for inspection
        model = collect_model(Path(staged.out_dir), Path(cfg.out_dir), result.seconds)
        remove = result.deleted
        return model
    finally:
        if remove:
            shutil.rmtree(run_dir, ignore_errors=True)
        elif run_dir.exists():
            say(f"kept {run_dir} on the shared volume; remove it with the job")


# ----------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Print a TrainJob for ``python -m components.train`` flags (after ``--``) as YAML."""
    import yaml

    p = argparse.ArgumentParser(prog="python -m components.trainjob", description=main.__doc__)
    p.add_argument("--name", required=True, help="TrainJob name (RFC 1035 label, <= 48 characters)")
    p.add_argument("--namespace", default="kubeflow", help="namespace of the TrainJob and its runtime")
    p.add_argument("--image", required=True, help="the components image, pinned tag or digest")
    p.add_argument("--nodes", type=int, default=1, help="training nodes (pods)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (0: CPU, one process)")
    p.add_argument("--cpu", default="4", help="CPU per node (requests = limits)")
    p.add_argument("--memory", default="16Gi", help="memory per node (requests = limits)")
    p.add_argument("--runtime", default=RUNTIME_NAME, help="the TrainingRuntime to use")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then python -m components.train's flags")
    args = p.parse_args(argv)
    flags = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    try:
        job = render_trainjob(
            args.name,
            namespace=args.namespace,
            image=args.image,
            train_args=flags,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            cpu=args.cpu,
            memory=args.memory,
            runtime=args.runtime,
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(job, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
