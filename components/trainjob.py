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
import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from components.common import ConfigError
from components.settings import to_argv
from components.trainjobs.api import create_and_wait, custom_objects_api, print_line, should_delete
from components.trainjobs.spec import (
    GPU_RESOURCE,
    GROUP,
    KEEP_CHOICES,
    MAX_NAME,
    MOUNT_PATH,
    PATCH_MANAGER,
    PLURAL,
    PVC_NAME,
    RUN_DIRS,
    RUNTIME_KIND,
    RUNTIME_NAME,
    TRAINER_JOB,
    VERSION,
    TrainJobError,
    TrainJobFailedError,
    TrainJobNotCreatedError,
    TrainJobResult,
    TrainJobTimeoutError,
    check_device,
    check_int,
    check_job_name,
    check_keep,
    check_namespace,
    job_name,
    render_trainjob,
)
from components.trainjobs.staging import collect_model, stage_inputs, staged_config

#: the Python API of this module (the rest lives in :mod:`components.trainjobs`)
__all__ = [
    "GPU_RESOURCE",
    "GROUP",
    "KEEP_CHOICES",
    "MAX_NAME",
    "MOUNT_PATH",
    "PATCH_MANAGER",
    "PLURAL",
    "PVC_NAME",
    "RUNTIME_KIND",
    "RUNTIME_NAME",
    "RUN_DIRS",
    "TRAINER_JOB",
    "VERSION",
    "TrainJobError",
    "TrainJobFailedError",
    "TrainJobNotCreatedError",
    "TrainJobResult",
    "TrainJobTimeoutError",
    "check_device",
    "check_job_name",
    "create_and_wait",
    "current_namespace",
    "fit_on_trainjob",
    "job_name",
    "main",
    "render_trainjob",
]

SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


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
    say = log or print_line
    check_keep(keep)
    check_int(timeout_s, "timeout_s", 1)
    check_device(cfg.device, check_int(gpus_per_node, "gpus_per_node", 0))
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
            remove = should_delete(keep, "failed")
            raise
        except TrainJobError:
            remove = should_delete(keep, "unfinished")
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
