"""The final fit as a Kubeflow Trainer TrainJob (components/trainjob.py, k8s/components/trainer).

No API server runs here, so, as in tests/test_k8s.py: rendered TrainJobs and the TrainingRuntime are
validated against Trainer's CRD schemas (../shared/schemas/kubeflow-trainer) with unknown fields
rejected at every level, plus the CRDs' CEL rules that matter here; the runtime's pod template and the
overlays' core kinds with ``kubernetes-validate --strict``. ``create_and_wait`` and ``fit_on_trainjob``
run against a fake CustomObjectsApi (a scripted status sequence, or a fake trainer that checks the
staged files and writes a model); torchrun's launch line runs for real with two CPU processes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from components import trainjob as tj
from components.common import ConfigError
from components.manifest import ManifestRow, read_manifest, write_manifest
from components.settings import add_arguments, setting, to_argv, values_from_args
from components.training.config import BACKBONE_FILE, TrainConfig
from tests.test_k8s import K8S, REPO, close_schema, core_errors, render

SCHEMAS = REPO.parent / "shared" / "schemas" / "kubeflow-trainer"
TRAINER_OVERLAYS = ("overlays/kubeflow-trainer", "overlays/kubeflow-trainer-kind")
KFP_NAMESPACE = "kubeflow"
IMAGE = "registry.example.com/inventory-monitor/components:0123456789ab"
FLAGS = ["--train", "/mnt/training/runs/x/train.csv", "--val", "/mnt/training/runs/x/val.csv", "--out", "/o"]


# --------------------------------------------------------------------------------------------------
# schemas
# --------------------------------------------------------------------------------------------------


@cache
def validator(kind: str) -> jsonschema.protocols.Validator:
    schema = close_schema(json.loads((SCHEMAS / f"{kind}_v1alpha1.json").read_text()))
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


def cel_errors(job: dict[str, Any]) -> list[str]:
    """The TrainJob CRD's CEL rules jsonschema cannot run (x-kubernetes-validations) that a new job meets."""
    errors = []
    name = job["metadata"]["name"]
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        errors.append(f"metadata.name {name!r}: not an RFC 1035 label of <= 63 characters")
    trainer = job["spec"].get("trainer", {})
    if trainer.get("numProcPerNode", 1) < 1:
        errors.append("spec.trainer.numProcPerNode must be >= 1")
    return errors


def schema_errors(doc: dict[str, Any]) -> list[str]:
    kind = {"TrainJob": "trainjob", "TrainingRuntime": "trainingruntime"}[doc["kind"]]
    errors = [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator(kind).iter_errors(doc)
    ]
    return errors + (cel_errors(doc) if kind == "trainjob" else [])


def job(nodes: int = 1, gpus: int = 0, **kw: Any) -> dict[str, Any]:
    return tj.render_trainjob(
        "inventory-train-1a2b3c4d-x7k2p",
        namespace=KFP_NAMESPACE,
        image=IMAGE,
        train_args=FLAGS,
        nodes=nodes,
        gpus_per_node=gpus,
        **kw,
    )


@pytest.mark.parametrize(("nodes", "gpus"), [(1, 0), (2, 1), (1, 1), (4, 8), (3, 0)])
def test_rendered_trainjobs_match_the_crd_schema(nodes: int, gpus: int) -> None:
    doc = job(nodes, gpus, cpu="8", memory="32Gi", active_deadline_s=3600, env={"NCCL_DEBUG": "WARN"})
    assert schema_errors(doc) == []
    spec = doc["spec"]
    assert spec["runtimeRef"] == {"apiGroup": tj.GROUP, "kind": "TrainingRuntime", "name": tj.RUNTIME_NAME}
    assert spec["activeDeadlineSeconds"] == 3600
    trainer = spec["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"], trainer["image"]) == (nodes, max(gpus, 1), IMAGE)
    res = trainer["resourcesPerNode"]
    assert res["requests"] == res["limits"]
    assert res["limits"].get(tj.GPU_RESOURCE) == (str(gpus) if gpus else None)
    assert (res["limits"]["cpu"], res["limits"]["memory"]) == ("8", "32Gi")
    if nodes * max(gpus, 1) == 1:  # one process: the module itself, as in a pipeline task
        assert trainer["command"] == ["python", "-m", "components.train"] and trainer["args"] == FLAGS
    else:  # torchrun takes the rest from Trainer's PET_* variables
        assert trainer["command"] == ["python", "-m", "torch.distributed.run"]
        assert trainer["args"] == ["--module", "components.train", *FLAGS]
    assert trainer["env"] == [{"name": "NCCL_DEBUG", "value": "WARN"}]
    assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "inventory-monitor"


def test_a_node_selector_goes_in_through_runtime_patches() -> None:
    doc = job(2, 1, node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"})
    assert schema_errors(doc) == []
    (patch,) = doc["spec"]["runtimePatches"]
    assert patch["manager"] == tj.PATCH_MANAGER
    (rj,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert rj["name"] == tj.TRAINER_JOB
    assert rj["template"]["spec"]["template"]["spec"]["nodeSelector"] == {
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"
    }


@pytest.mark.parametrize(
    ("path", "typo"),
    [
        (("spec",), "runtimeref"),
        (("spec", "trainer"), "numNode"),
        (("spec", "trainer", "resourcesPerNode"), "limitz"),
        (("spec", "runtimeRef"), "kinds"),
        (("spec", "runtimePatches", 0, "trainingRuntimeSpec", "template", "spec", "replicatedJobs", 0,
          "template", "spec", "template", "spec"), "nodeSelektor"),
    ],
)  # fmt: skip
def test_a_planted_typo_in_a_trainjob_fails(path: tuple[Any, ...], typo: str) -> None:
    bad = copy.deepcopy(job(2, 1, node_selector={"pool": "gpu"}))
    node: Any = bad
    for key in path:
        node = node[key]
    node[typo] = 1
    assert any(typo in e for e in schema_errors(bad))


def test_the_cel_rules_are_checked() -> None:
    bad = copy.deepcopy(job())
    bad["metadata"]["name"] = "1-starts-with-a-digit"
    bad["spec"]["trainer"]["numProcPerNode"] = 0
    assert len(cel_errors(bad)) == 2


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"nodes": 0}, "trainjob_nodes must be an integer >= 1"),
        ({"nodes": True}, "trainjob_nodes"),
        ({"gpus_per_node": -1}, "trainjob_gpus_per_node must be an integer >= 0"),
        ({"cpu": "lots"}, "trainjob_cpu must be a positive Kubernetes quantity"),
        ({"memory": "0Gi"}, "trainjob_memory"),
        ({"name": "Inventory_Train"}, "TrainJob name 'Inventory_Train' is invalid"),
        ({"name": "x" * 49}, "at most 48 characters"),
        ({"name": "7-starts-with-a-digit"}, "starting with a letter"),
        ({"namespace": "Kube_flow"}, "not a DNS-1123 label"),
        ({"runtime": "Inventory Runtime"}, "not a DNS-1123 subdomain"),
        ({"image": "inventory-monitor/components:latest"}, "pinned tag or digest"),
        ({"image": "localhost:5000/inventory-monitor/components"}, "pinned tag or digest"),
        ({"env": {"PET_NNODES": "2"}}, "set by Trainer or torchrun"),
        ({"env": {"WORLD_SIZE": "2"}}, "set by Trainer or torchrun"),
        ({"train_args": ["--lr", "0.1"] * 65}, "at most 128"),
        ({"active_deadline_s": 0}, "trainjob_timeout_s"),
        ({"labels": {"run": "x" * 64}}, "label value"),
    ],
)
def test_render_rejects_bad_settings_naming_the_parameter(kwargs: dict[str, Any], needle: str) -> None:
    args: dict[str, Any] = {
        "name": "inventory-train-1",
        "namespace": KFP_NAMESPACE,
        "image": IMAGE,
        "train_args": FLAGS,
        "nodes": 1,
        "gpus_per_node": 0,
    }
    args.update(kwargs)
    name = args.pop("name")
    with pytest.raises(ConfigError, match=re.escape(needle)):
        tj.render_trainjob(name, **args)


def test_device_must_match_the_gpus() -> None:
    tj.check_device("cpu", 0)
    tj.check_device("auto", 0)
    tj.check_device("auto", 2)
    tj.check_device("cuda", 1)
    with pytest.raises(ConfigError, match="device is 'cpu' but trainjob_gpus_per_node is 2"):
        tj.check_device("cpu", 2)
    with pytest.raises(ConfigError, match="trainjob_gpus_per_node is 0"):
        tj.check_device("cuda:0", 0)


def test_job_names_are_fresh_valid_labels() -> None:
    run_id = "1A2B3C4D-5e6f-7a8b-9c0d-0123456789ab"
    names = {tj.job_name(run_id) for _ in range(20)}
    assert len(names) == 20
    for name in names:
        assert name.startswith("inventory-train-1a2b3c4d-") and len(name) <= tj.MAX_NAME
        assert tj.check_job_name(name) == name
    assert tj.job_name("", suffix="abcde") == "inventory-train-run-abcde"


def test_the_cli_prints_a_valid_trainjob(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--name", "smoke-cpu", "--image", IMAGE, "--cpu", "2", "--memory", "4Gi", "--", *FLAGS]
    assert tj.main(argv) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert schema_errors(doc) == [] and doc["spec"]["trainer"]["args"] == FLAGS
    assert tj.main(["--name", "Bad", "--image", IMAGE]) == 2
    assert "TrainJob name 'Bad' is invalid" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# the training command's flags
# --------------------------------------------------------------------------------------------------


def parse_back(cls: type, flags: list[str]) -> Any:
    parser = argparse.ArgumentParser()
    add_arguments(parser, cls)
    return cls(**values_from_args(cls, parser.parse_args(flags)))


def test_train_args_parse_back_to_the_same_config(tmp_path: Path) -> None:
    cfg = TrainConfig(
        train_csv=tmp_path / "train.csv",
        val_csv=tmp_path / "val.csv",
        out_dir=tmp_path / "model",
        data_root=tmp_path / "data",
        test_csv=tmp_path / "test.csv",
        classes=(1, 2, 3),
        head="classification",
        weights=str(tmp_path / "w" / "model.pt"),
        image_size=96,
        epochs=3,
        lr=0.05,
        weight_decay=1e-5,
        ema=0.998,
        amp=False,  # on by default: --no-amp
        compile=True,
        tta=True,
        num_threads=2,
        progress=False,
        model_name="counter",
    )
    flags = to_argv(cfg)
    assert "--no-amp" in flags and "--compile" in flags and "--no-progress" in flags
    assert flags[flags.index("--classes") + 1] == "1,2,3"
    assert parse_back(TrainConfig, flags) == cfg
    # the defaults are left out: a small command line
    assert to_argv(TrainConfig(train_csv=Path("t"), val_csv=Path("v"), out_dir=Path("o"))) == [
        "--train", "t", "--val", "v", "--out", "o",
    ]  # fmt: skip


def test_train_args_refuse_what_the_command_line_cannot_say() -> None:
    import dataclasses

    @dataclasses.dataclass
    class Settings:
        path: Path = setting(help="required", group="g")
        limit: int | None = setting(5, help="unsettable", group="g")
        hidden: int = setting(0, help="not a flag", group="g", cli=False)
        models: tuple[str, ...] = setting(("a",), help="many", group="g", nargs="+")

    assert to_argv(Settings(Path("p"), models=("x", "y"))) == ["--path", "p", "--models", "x", "y"]
    assert parse_back(Settings, to_argv(Settings(Path("p"), models=("x", "y")))).models == ("x", "y")
    for bad, needle in [
        ({"limit": None}, "cannot unset"),
        ({"hidden": 3}, "has no command-line flag"),
        ({"models": ()}, "cannot empty"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            to_argv(Settings(Path("p"), **bad))


# --------------------------------------------------------------------------------------------------
# manifests: k8s/components/trainer in overlays/kubeflow-trainer(-kind)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer_docs() -> dict[str, list[dict[str, Any]]]:
    return {target: render(K8S / target) for target in TRAINER_OVERLAYS}


def the_one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in found])
    return found[0]


def runtime_pod(runtime: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    (rj,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    return rj, rj["template"]["spec"]["template"]["spec"]


def test_trainer_overlays_render_valid_objects_in_the_kfp_namespace(
    trainer_docs: dict[str, list[dict[str, Any]]],
) -> None:
    for target, docs in trainer_docs.items():
        kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
        assert {
            ("TrainingRuntime", tj.RUNTIME_NAME),
            ("PersistentVolumeClaim", tj.PVC_NAME),
            ("Role", "inventory-monitor-trainjobs"),
            ("RoleBinding", "inventory-monitor-trainjobs"),
        } <= kinds, target
        # a superset of overlays/kubeflow (the Optuna database): applying either one is consistent
        assert {(d["kind"], d["metadata"]["name"]) for d in render(K8S / "overlays" / "kubeflow")} <= kinds
        for doc in docs:
            assert doc["metadata"]["namespace"] == KFP_NAMESPACE, (target, doc["kind"])
            assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "inventory-monitor"
            if doc["kind"] == "TrainingRuntime":
                assert schema_errors(doc) == [], target
            else:
                assert core_errors(doc) == [], target


def test_the_runtimes_pod_template_is_a_valid_job_template(
    trainer_docs: dict[str, list[dict[str, Any]]],
) -> None:
    """The CRD schema checks field names; a Job around the same template checks the pod strictly."""
    runtime = the_one(trainer_docs["overlays/kubeflow-trainer"], "TrainingRuntime")
    rj, _ = runtime_pod(runtime)
    wrapped = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "check", "namespace": KFP_NAMESPACE},
        "spec": rj["template"]["spec"],
    }
    assert core_errors(wrapped) == []
    bad = copy.deepcopy(runtime)
    _, pod = runtime_pod(bad)
    pod["containers"][0]["volumeMountz"] = []
    assert any("volumeMountz" in e for e in schema_errors(bad))


def test_the_runtime_is_what_the_module_expects(trainer_docs: dict[str, list[dict[str, Any]]]) -> None:
    for target, docs in trainer_docs.items():
        runtime = the_one(docs, "TrainingRuntime", tj.RUNTIME_NAME)
        assert runtime["spec"]["mlPolicy"]["torch"] == {}  # torchrun's PET_* variables, nothing else
        rj, pod = runtime_pod(runtime)
        assert rj["name"] == tj.TRAINER_JOB
        assert (
            rj["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
        )
        assert rj["template"]["spec"]["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
        (c,) = pod["containers"]
        assert c["name"] == "node"  # Trainer's torch plugin finds the trainer container by this name
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        shared = volumes[mounts[tj.MOUNT_PATH]]
        assert shared["persistentVolumeClaim"]["claimName"] == tj.PVC_NAME
        the_one(docs, "PersistentVolumeClaim", tj.PVC_NAME)
        assert (
            "emptyDir" in volumes[mounts["/tmp"]]
            and volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        )
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["INVENTORY_MONITOR_CACHE"].startswith("/tmp/")  # per pod, writable
        assert not [n for n in env if n.startswith("PET_")]  # Trainer sets those
        image = c["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
        assert c["resources"]["requests"] == c["resources"]["limits"], target
        psc = pod["securityContext"]
        assert (psc["runAsNonRoot"], psc["runAsUser"], psc["fsGroup"]) == (True, 10001, 10001)
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert {"key": tj.GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_the_shared_volume_is_rwx_except_on_one_node(trainer_docs: dict[str, list[dict[str, Any]]]) -> None:
    modes = {
        t: the_one(d, "PersistentVolumeClaim", tj.PVC_NAME)["spec"]["accessModes"]
        for t, d in trainer_docs.items()
    }
    assert modes == {
        "overlays/kubeflow-trainer": ["ReadWriteMany"],
        "overlays/kubeflow-trainer-kind": ["ReadWriteOnce"],
    }


def test_the_role_allows_exactly_what_create_and_wait_calls(
    trainer_docs: dict[str, list[dict[str, Any]]],
) -> None:
    api = FakeApi([{"conditions": [cond("Complete")]}])
    tj.create_and_wait(api, job(), 60, 1, keep="never", sleep=lambda s: None, log=lambda m: None)
    used = {verb for verb, *_ in api.calls}
    for docs in trainer_docs.values():
        role = the_one(docs, "Role", "inventory-monitor-trainjobs")
        assert role["rules"] == [
            {"apiGroups": [tj.GROUP], "resources": [tj.PLURAL], "verbs": ["create", "get", "delete"]}
        ]
        assert used == set(role["rules"][0]["verbs"])
        binding = the_one(docs, "RoleBinding", "inventory-monitor-trainjobs")
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": "inventory-monitor-trainjobs",
        }
        # standalone KFP runs the pipeline's pods as pipeline-runner; no namespace: the binding's own
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pipeline-runner"}]


def test_trainer_component_is_a_reusable_component() -> None:
    kust = yaml.safe_load((K8S / "components" / "trainer" / "kustomization.yaml").read_text())
    assert kust["kind"] == "Component" and "namespace" not in kust
    overlay = yaml.safe_load((K8S / "overlays" / "kubeflow-trainer" / "kustomization.yaml").read_text())
    assert overlay["namespace"] == KFP_NAMESPACE
    assert overlay["components"] == ["../../components/trainer"]


# --------------------------------------------------------------------------------------------------
# create_and_wait against a fake CustomObjectsApi
# --------------------------------------------------------------------------------------------------


def cond(kind: str, status: str = "True", reason: str = "", message: str = "") -> dict[str, str]:
    return {
        "type": kind,
        "status": status,
        "reason": reason or kind,
        "message": message,
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }


def api_error(status: int, message: str) -> ApiException:
    e = ApiException(status=status, reason={403: "Forbidden", 404: "Not Found"}.get(status, "Error"))
    e.body = json.dumps({"kind": "Status", "message": message, "code": status})
    return e


class FakeApi:
    """CustomObjectsApi's three calls: records them; ``get`` returns the created object with the next
    scripted status (the last one repeats), or raises a scripted exception."""

    def __init__(self, statuses: list[Any], *, create_error: Exception | None = None) -> None:
        self.statuses = list(statuses)
        self.create_error = create_error
        self.calls: list[tuple[str, str, str, str, str]] = []
        self.created: dict[str, Any] | None = None

    def create_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, body: Any
    ):
        self.calls.append(("create", group, version, namespace, plural))
        if self.create_error is not None:
            raise self.create_error
        self.created = copy.deepcopy(body)
        self.on_create(body)
        return body

    def on_create(self, body: dict[str, Any]) -> None:
        pass

    def get_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str, name: str):
        self.calls.append(("get", group, version, namespace, plural))
        assert self.created is not None and name == self.created["metadata"]["name"]
        item = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        if isinstance(item, Exception):
            raise item
        return {**copy.deepcopy(self.created), "status": item}

    def delete_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, name: str, propagation_policy: str = ""
    ):
        self.calls.append(("delete", group, version, namespace, plural))
        assert name == self.created["metadata"]["name"] and propagation_policy == "Background"

    def verbs(self) -> list[str]:
        return [c[0] for c in self.calls]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


def wait(
    api: FakeApi, manifest: dict[str, Any] | None = None, *, timeout: float = 600, poll: float = 10, **kw: Any
) -> tuple[tj.TrainJobResult, Clock, list[str]]:
    clock, lines = Clock(), []
    kw.setdefault("keep", "failed")
    result = tj.create_and_wait(
        api, manifest or job(), timeout, poll, clock=clock, sleep=clock.sleep, log=lines.append, **kw
    )
    return result, clock, lines


def test_success_creates_the_rendered_manifest_then_deletes_it() -> None:
    manifest = job(2, 1, active_deadline_s=600)
    created = cond("Created", reason="JobsCreationSucceeded")
    done = cond("Complete", message="jobset completed")
    api = FakeApi([{}, {"conditions": [created]}, {"conditions": [created, done]}])
    result, clock, lines = wait(api, manifest)
    assert api.created == manifest  # exactly what render_trainjob made
    assert api.calls[0] == ("create", tj.GROUP, tj.VERSION, KFP_NAMESPACE, tj.PLURAL)
    assert api.verbs() == ["create", "get", "get", "get", "delete"]
    assert clock.sleeps == [10, 10] and result.seconds == 20
    assert result.deleted and result.status["conditions"][-1]["type"] == "Complete"
    assert any("no conditions yet" in line for line in lines) and any(
        "Complete=True" in line for line in lines
    )
    assert any("jobset.sigs.k8s.io/jobset-name=inventory-train-1a2b3c4d-x7k2p" in line for line in lines)


def test_keep_always_keeps_a_completed_job() -> None:
    api = FakeApi([{"conditions": [cond("Complete")]}])
    result, _, lines = wait(api, keep="always")
    assert not result.deleted and api.verbs() == ["create", "get"]
    assert any("kept TrainJob" in line for line in lines)


@pytest.mark.parametrize(("keep", "deleted"), [("failed", False), ("never", True), ("always", False)])
def test_a_failed_job_raises_its_own_message(keep: str, deleted: bool) -> None:
    message = "jobset failed: node-0 exited with code 2: error: --lr must be > 0, got -1.0"
    api = FakeApi(
        [
            {"conditions": [cond("Created")]},
            {"conditions": [cond("Failed", reason="FailedJobs", message=message)]},
        ]
    )
    with pytest.raises(tj.TrainJobFailedError) as err:
        wait(api, keep=keep)
    text = str(err.value)
    assert "TrainJob kubeflow/inventory-train-1a2b3c4d-x7k2p failed (FailedJobs)" in text and message in text
    assert ("delete" in api.verbs()) is deleted
    if deleted:
        assert "was deleted (trainjob_keep=never)" in text
    else:
        assert "kubectl -n kubeflow logs -l jobset.sigs.k8s.io/jobset-name=" in text and "kept" in text


@pytest.mark.parametrize(("keep", "deleted"), [("failed", True), ("never", True), ("always", False)])
def test_a_job_that_does_not_finish_in_time_is_stopped(keep: str, deleted: bool) -> None:
    waiting = {"conditions": [cond("Suspended", reason="Suspended", message="queued by Kueue")]}
    api = FakeApi([waiting])
    with pytest.raises(tj.TrainJobTimeoutError) as err:
        wait(api, timeout=95, poll=10, keep=keep)
    assert "did not finish within 95 s (trainjob_timeout_s)" in str(err.value)
    assert "Suspended=True (Suspended: queued by Kueue)" in str(err.value)
    assert api.verbs().count("get") == 11  # at 0, 10, ..., 90 and at 95
    assert ("delete" in api.verbs()) is deleted


@pytest.mark.parametrize(
    ("status", "needle"),
    [
        (404, "Is Kubeflow Trainer installed"),
        (
            403,
            "create/get/delete on trainjobs in kubeflow: kubectl apply -k k8s/overlays/kubeflow-trainer",
        ),
        (409, "exists already"),
        (422, "rejected by the API server"),
    ],
)
def test_a_refused_create_says_why_and_touches_nothing_else(status: int, needle: str) -> None:
    api = FakeApi([{}], create_error=api_error(status, f'trainjobs.trainer.kubeflow.org "x" is {status}'))
    with pytest.raises(tj.TrainJobNotCreatedError) as err:
        wait(api)
    assert needle in str(err.value) and f"is {status}" in str(err.value)
    assert api.verbs() == ["create"]  # never deletes a job it did not create


def test_read_errors_are_retried_then_reported() -> None:
    blip = api_error(503, "etcdserver: leader changed")
    api = FakeApi([blip, blip, {"conditions": [cond("Complete")]}])
    result, _, lines = wait(api)
    assert result.name == job()["metadata"]["name"] and any("retrying" in line for line in lines)
    api = FakeApi([blip])
    with pytest.raises(tj.TrainJobError, match=r"cannot read .* \(6 tries\): etcdserver: leader changed"):
        wait(api)
    assert api.verbs()[-1] == "delete"
    api = FakeApi([{}, api_error(404, "not found")])
    with pytest.raises(tj.TrainJobError, match="disappeared while running"):
        wait(api)


def test_sigterm_while_waiting_deletes_the_job_and_restores_the_handler() -> None:
    before = signal.getsignal(signal.SIGTERM)
    api = FakeApi([{"conditions": [cond("Created")]}])
    clock = Clock()

    def sleep(s: float) -> None:
        clock.sleep(s)
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(tj.TrainJobError, match="stopped \\(SIGTERM\\)"):
        tj.create_and_wait(api, job(), 600, 10, clock=clock, sleep=sleep, log=lambda m: None)
    assert api.verbs()[-1] == "delete" and signal.getsignal(signal.SIGTERM) == before


def test_bad_wait_settings_are_refused_before_creating() -> None:
    for kwargs, needle in [
        ({"keep": "sometimes"}, "trainjob_keep must be one of"),
        ({"timeout": 0}, "trainjob_timeout_s"),
    ]:
        api = FakeApi([{}])
        with pytest.raises(ConfigError, match=needle):
            wait(api, **kwargs)
        assert api.calls == []


# --------------------------------------------------------------------------------------------------
# fit_on_trainjob: stage on the shared volume, run (a fake trainer), collect the model
# --------------------------------------------------------------------------------------------------


class FakeTrainer(FakeApi):
    """On create, does what the TrainJob's pods would: parses the command's flags as the training CLI
    does, checks every input is on the shared volume, and writes a model into --out (rank 0)."""

    def __init__(self, statuses: list[Any], mount: Path) -> None:
        super().__init__(statuses)
        self.mount = mount
        self.cfg: TrainConfig | None = None

    def on_create(self, body: dict[str, Any]) -> None:
        trainer = body["spec"]["trainer"]
        assert trainer["command"] == ["python", "-m", "components.train"]
        cfg = self.cfg = parse_back(TrainConfig, trainer["args"])
        for path in (cfg.train_csv, cfg.val_csv, cfg.data_root, cfg.out_dir, Path(cfg.weights)):
            assert self.mount in Path(path).parents, path
        for csv in (cfg.train_csv, cfg.val_csv):
            for row in read_manifest(csv):
                assert (cfg.data_root / row.path).read_bytes() == f"jpeg {row.id}".encode()
        assert Path(cfg.weights).read_bytes() == b"state dict"
        assert (Path(cfg.weights).parent / BACKBONE_FILE).is_file()
        out = cfg.out_dir
        out.mkdir(parents=True)
        (out / "model.onnx").write_bytes(b"onnx")
        (out / "checkpoint.pt").write_bytes(b"resumable")
        history = [{"epoch": 1, "val_accuracy": 0.5}, {"epoch": 2, "val_accuracy": 0.6}]
        metrics = {
            "val": {"accuracy": 0.6, "rmse": 0.8, "mae": 0.5, "n": 2},
            "best_epoch": 2,
            "epochs_run": 2,
            "stopped_early": False,
            "history": history,
        }
        (out / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What the pipeline task has: a dataset artifact, split manifests, a backbone, the mounted volume."""
    data = tmp_path / "dataset"
    rows = {}
    for split, ids in {"train": ["a", "b", "c"], "val": ["d"], "test": ["e"]}.items():
        rows[split] = []
        for i in ids:
            (data / "images").mkdir(parents=True, exist_ok=True)
            (data / "images" / f"{i}.jpg").write_bytes(f"jpeg {i}".encode())
            rows[split].append(ManifestRow(i, 1, f"images/{i}.jpg", "0" * 64, 8, 8, "test"))
        write_manifest(tmp_path / f"{split}.csv", rows[split])
    backbone = tmp_path / "backbone" / "pretrain"
    backbone.mkdir(parents=True)
    (backbone / "model.pt").write_bytes(b"state dict")
    (backbone / BACKBONE_FILE).write_text("{}")
    mount = tmp_path / "mnt" / "training"
    mount.mkdir(parents=True)
    monkeypatch.setenv("POD_NAMESPACE", KFP_NAMESPACE)
    cfg = TrainConfig(
        train_csv=tmp_path / "train.csv",
        val_csv=tmp_path / "val.csv",
        out_dir=tmp_path / "kfp" / "model",
        data_root=data,
        weights=str(backbone / "model.pt"),
        epochs=2,
        device="cpu",
        num_threads=1,
        progress=False,
    )
    return {"cfg": cfg, "mount": mount, "name": "inventory-train-1a2b3c4d-abcde"}


def fit(task: dict[str, Any], api: FakeApi, **kw: Any) -> Any:
    kw.setdefault("keep", "failed")
    kw.setdefault("mount_path", task["mount"])
    return tj.fit_on_trainjob(
        task["cfg"], name=task["name"], image=IMAGE, api=api, poll_s=0.001,
        log=lambda m: None, labels={"inventory-monitor/kfp-run-id": "1a2b3c4d"}, **kw,
    )  # fmt: skip


def test_fit_on_trainjob_stages_runs_and_collects_the_model(task: dict[str, Any]) -> None:
    api = FakeTrainer([{"conditions": [cond("Complete")]}], task["mount"])
    result = fit(task, api, nodes=1, gpus_per_node=0, cpu="2", memory="4Gi")
    cfg = task["cfg"]
    assert result.model_dir == cfg.out_dir and result.best_epoch == 2 and result.epochs_run == 2
    assert result.metrics["val"]["accuracy"] == 0.6 and "history" not in result.metrics
    assert len(result.history) == 2
    assert (cfg.out_dir / "model.onnx").read_bytes() == b"onnx"
    assert not (cfg.out_dir / "checkpoint.pt").exists()
    # the job: the task's namespace, the run's settings, the staged paths; valid against the CRD
    created = api.created
    assert created["metadata"]["namespace"] == KFP_NAMESPACE and schema_errors(created) == []
    assert created["metadata"]["labels"]["inventory-monitor/kfp-run-id"] == "1a2b3c4d"
    run_dir = task["mount"] / tj.RUN_DIRS / task["name"]
    assert api.cfg.out_dir == run_dir / "model" and api.cfg.epochs == 2 and api.cfg.device == "cpu"
    assert api.cfg.cache_dir is None and api.cfg.progress is False
    # only the images the train/val manifests list reached the volume, and all is removed afterwards
    assert not run_dir.exists() and api.verbs()[-1] == "delete"


def test_fit_on_trainjob_copies_only_the_listed_images(task: dict[str, Any]) -> None:
    seen: list[str] = []

    class Spy(FakeTrainer):
        def on_create(self, body: dict[str, Any]) -> None:
            super().on_create(body)
            seen.extend(sorted(p.name for p in (self.cfg.data_root / "images").iterdir()))

    fit(task, Spy([{"conditions": [cond("Complete")]}], task["mount"]))
    assert seen == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]  # not the test split's e.jpg


def test_a_failed_fit_keeps_the_job_and_its_run_directory(task: dict[str, Any]) -> None:
    run_dir = task["mount"] / tj.RUN_DIRS / task["name"]
    failed = {"conditions": [cond("Failed", reason="FailedJobs", message="node-0: out of memory")]}
    with pytest.raises(tj.TrainJobFailedError, match="out of memory"):
        fit(task, FakeTrainer([failed], task["mount"]))
    assert (run_dir / "train.csv").is_file()  # kept with the job for inspection
    task["name"] = "inventory-train-1a2b3c4d-fffff"
    with pytest.raises(tj.TrainJobFailedError):
        fit(task, FakeTrainer([failed], task["mount"]), keep="never")
    assert not (task["mount"] / tj.RUN_DIRS / task["name"]).exists()
    assert not task["cfg"].out_dir.exists()


def test_fit_on_trainjob_checks_everything_before_copying(task: dict[str, Any], tmp_path: Path) -> None:
    cases = [
        ({"nodes": 0}, "trainjob_nodes"),
        ({"gpus_per_node": 1}, "device is 'cpu' but trainjob_gpus_per_node is 1"),
        ({"keep": "maybe"}, "trainjob_keep"),
        ({"cpu": "-1"}, "trainjob_cpu"),
        ({"mount_path": tmp_path / "not-mounted"}, f"mount the PVC {tj.PVC_NAME}"),
    ]
    for kwargs, needle in cases:
        api = FakeTrainer([{}], task["mount"])
        with pytest.raises(ConfigError, match=re.escape(needle)):
            fit(task, api, **kwargs)
        assert api.calls == [] and not list(task["mount"].iterdir())


def test_fit_on_trainjob_reads_the_namespace_from_the_pod(
    task: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("POD_NAMESPACE")
    monkeypatch.setattr(tj, "SA_NAMESPACE_FILE", task["mount"].parent / "no-such-file")
    with pytest.raises(ConfigError, match="cannot tell this pod's namespace"):
        fit(task, FakeTrainer([{}], task["mount"]))
    sa = task["mount"].parent / "namespace"
    sa.write_text("team-a\n")
    monkeypatch.setattr(tj, "SA_NAMESPACE_FILE", sa)
    api = FakeTrainer([{"conditions": [cond("Complete")]}], task["mount"])
    fit(task, api)
    assert api.created["metadata"]["namespace"] == "team-a"


def test_a_completed_job_without_a_model_is_an_error(task: dict[str, Any]) -> None:
    class NoModel(FakeApi):
        pass

    with pytest.raises(tj.TrainJobError, match=r"metrics\.json does not exist"):
        fit(task, NoModel([{"conditions": [cond("Complete")]}]))
    assert (task["mount"] / tj.RUN_DIRS / task["name"] / "train.csv").is_file()  # kept for inspection


# --------------------------------------------------------------------------------------------------
# torchrun: the rendered launch line with the variables Trainer's torch policy sets
# --------------------------------------------------------------------------------------------------


def test_the_torchrun_launch_gives_each_process_its_rank(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    probe = tmp_path / "probe" / "components"
    probe.mkdir(parents=True)
    (probe / "__init__.py").write_text("")
    (probe / "train.py").write_text(
        "import json, os, sys\n"
        "keys = ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR')\n"
        "record = {k: os.environ.get(k) for k in keys}\n"
        "record['argv'] = sys.argv[1:]\n"
        "out = os.path.join(os.environ['PROBE_OUT'], 'rank%s.json' % os.environ['RANK'])\n"
        "open(out, 'w').write(json.dumps(record))\n"
    )
    doc = tj.render_trainjob(
        "smoke", namespace="kubeflow", image=IMAGE, train_args=FLAGS, nodes=1, gpus_per_node=2
    )
    trainer = doc["spec"]["trainer"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {  # what Trainer's torch plugin sets for 1 node x 2 processes
        **{k: v for k, v in os.environ.items() if not k.startswith(("PET_", "PYTHONPATH"))},
        "PET_NNODES": "1",
        "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
        "PET_NODE_RANK": "0",
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": str(port),
        "PROBE_OUT": str(tmp_path),
        "PYTHONPATH": str(probe.parent),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, *trainer["command"][1:], *trainer["args"]]
    proc = subprocess.run(command, cwd=probe.parent, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["WORLD_SIZE"], r["RANK"], r["LOCAL_RANK"]) for r in ranks] == [
        ("2", "0", "0"),
        ("2", "1", "1"),
    ]
    assert all(r["argv"] == FLAGS for r in ranks)


# --------------------------------------------------------------------------------------------------
# the real kubernetes client against a fake API server: paths, bodies and error messages
# --------------------------------------------------------------------------------------------------


def test_create_and_wait_speaks_the_custom_objects_api() -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from kubernetes import client

    prefix = f"/apis/{tj.GROUP}/{tj.VERSION}/namespaces/{KFP_NAMESPACE}/{tj.PLURAL}"
    store: dict[str, Any] = {}
    seen: list[tuple[str, str]] = []
    polls = {"n": 0}

    class Api(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def reply(self, code: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def handle_one(self) -> None:
            seen.append((self.command, self.path))
            name = self.path.split("?")[0].removeprefix(prefix).strip("/")
            if self.command == "POST":
                obj = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if obj["spec"]["runtimeRef"]["name"] != tj.RUNTIME_NAME:
                    msg = 'admission webhook "validator.trainjob.trainer.kubeflow.org" denied the request'
                    return self.reply(422, {"kind": "Status", "message": msg, "code": 422})
                store[obj["metadata"]["name"]] = obj
                return self.reply(201, obj)
            if name not in store:
                return self.reply(404, {"kind": "Status", "message": f'trainjobs "{name}" not found'})
            if self.command == "DELETE":
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                del store[name]
                return self.reply(200, {"kind": "Status", "status": "Success"})
            polls["n"] += 1
            state = [cond("Created")] + ([cond("Complete")] if polls["n"] >= 2 else [])
            return self.reply(200, {**store[name], "status": {"conditions": state}})

        do_GET = do_POST = do_DELETE = handle_one  # noqa: N815

    server = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        api = client.CustomObjectsApi(
            client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{server.server_address[1]}"))
        )
        manifest = job(2, 1)
        result = tj.create_and_wait(api, manifest, 60, 0.01, keep="failed", log=lambda m: None)
        assert result.deleted and store == {}
        name = manifest["metadata"]["name"]
        assert [m for m, _ in seen] == ["POST", "GET", "GET", "DELETE"]
        assert seen[0][1] == prefix and seen[1][1] == f"{prefix}/{name}"
        bad = copy.deepcopy(manifest)
        bad["spec"]["runtimeRef"]["name"] = "torch-distributed"
        with pytest.raises(
            tj.TrainJobNotCreatedError, match=r"rejected by the API server.*denied the request"
        ):
            tj.create_and_wait(api, bad, 60, 0.01, log=lambda m: None)
    finally:
        server.shutdown()
        server.server_close()
