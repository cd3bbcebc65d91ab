"""Offline checks of the Kubernetes manifests, the deploy scripts and the Dockerfiles.

No API server runs here, so the manifests are checked the way a strict API server would: every
kustomization is rendered with ``kubectl kustomize``; core kinds are validated with
``kubernetes-validate --strict`` against a pinned Kubernetes version; the InferenceService against
KServe's published CRD schema with unknown fields rejected at every level (a planted typo must fail).
Then the project's own rules: requests == limits, pinned images, non-root, secrets never committed.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
SCHEMA_PATH = REPO.parent / "shared" / "schemas" / "kserve" / "inferenceservice_v1beta1.json"
#: Kubernetes version the core kinds are validated against (KServe 0.21 needs >= 1.32).
K8S_VERSION = "1.33.0"
TARGETS = ("base", "overlays/kind", "overlays/minikube")
#: Fake credentials written into the temp copy only; they must show up in the rendered Secret.
FAKE_KEY_ID = "AKIAFAKEFORTESTS0001"
FAKE_SECRET = "fake-secret-for-offline-render"
ISVC_KIND = "InferenceService"


# --------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl not found: `kubectl kustomize` renders the manifests (install kubectl >= 1.27)")
    return path


@pytest.fixture(scope="module")
def k8s_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temp copy of k8s/ with fake credentials in the git-ignored s3.env (the repo is never written)."""
    dst = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, dst, ignore=shutil.ignore_patterns("s3.env"))
    (dst / "base" / "s3.env").write_text(
        f"AWS_ACCESS_KEY_ID={FAKE_KEY_ID}\nAWS_SECRET_ACCESS_KEY={FAKE_SECRET}\n"
    )
    return dst


def render(root: Path) -> list[dict[str, Any]]:
    proc = subprocess.run([kubectl(), "kustomize", str(root)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {root} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module")
def rendered(k8s_copy: Path) -> dict[str, list[dict[str, Any]]]:
    """target -> rendered objects, for base and every overlay."""
    return {t: render(k8s_copy / t) for t in TARGETS}


def objects(rendered: dict[str, list[dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for target, docs in rendered.items():
        for doc in docs:
            yield target, doc


def the_isvc(docs: list[dict[str, Any]]) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == ISVC_KIND]
    assert len(found) == 1, f"expected one InferenceService, got {len(found)}"
    return found[0]


def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod-like specs of an object (Deployment template, InferenceService predictor)."""
    if doc["kind"] == ISVC_KIND:
        return [doc["spec"]["predictor"]]
    template = doc.get("spec", {}).get("template", {}).get("spec")
    return [template] if template else []


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        c for spec in pod_specs(doc) for key in ("containers", "initContainers") for c in spec.get(key, [])
    ]


# --------------------------------------------------------------------------------------------------
# schema validation
# --------------------------------------------------------------------------------------------------


def close_schema(node: Any) -> Any:
    """Reject unknown fields everywhere: ``additionalProperties: false`` on every object with
    ``properties`` that does not already allow extra fields (like an API server's strict decoding)."""
    if isinstance(node, dict):
        out = {k: close_schema(v) for k, v in node.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [close_schema(v) for v in node]
    return node


@cache
def isvc_validator() -> jsonschema.protocols.Validator:
    schema = close_schema(json.loads(SCHEMA_PATH.read_text()))
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


def isvc_errors(doc: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in isvc_validator().iter_errors(doc)
    ]


def core_errors(doc: dict[str, Any]) -> list[str]:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.path)}"]
    return []


def test_every_target_renders_the_expected_kinds(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for target, docs in rendered.items():
        kinds = sorted(d["kind"] for d in docs)
        assert {"Namespace", "ServiceAccount", "Secret", ISVC_KIND} <= set(kinds), (target, kinds)
        if target.startswith("overlays/"):
            assert {"Deployment", "Service", "PersistentVolumeClaim"} <= set(kinds), (target, kinds)
        for doc in docs:
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == "inventory-monitor", (target, doc["kind"])


def test_core_kinds_are_valid_in_strict_mode(rendered: dict[str, list[dict[str, Any]]]) -> None:
    checked = 0
    for target, doc in objects(rendered):
        if doc["kind"] == ISVC_KIND:
            continue
        assert core_errors(doc) == [], target
        checked += 1
    assert checked >= 3 * 3


def test_inferenceservice_matches_kserve_schema_strictly(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for target, docs in rendered.items():
        assert isvc_errors(the_isvc(docs)) == [], target


@pytest.mark.parametrize(
    ("path", "typo"),
    [
        (("spec", "predictor"), "maxReplicaz"),
        (("spec", "predictor", "autoScaling", "metrics", 0, "resource", "target"), "averageUtilisation"),
        (("spec", "predictor", "containers", 0, "readinessProbe", "httpGet"), "paht"),
        (("spec", "predictor", "containers", 0, "securityContext"), "runAsNonroot"),
    ],
)
def test_a_planted_typo_in_the_inferenceservice_fails(
    rendered: dict[str, list[dict[str, Any]]], path: tuple[Any, ...], typo: str
) -> None:
    bad = copy.deepcopy(the_isvc(rendered["overlays/kind"]))
    node: Any = bad
    for key in path:
        node = node[key]
    node[typo] = 3
    errors = isvc_errors(bad)
    assert any(typo in e for e in errors), errors


def test_a_planted_typo_in_a_core_kind_fails(rendered: dict[str, list[dict[str, Any]]]) -> None:
    deploy = next(d for d in rendered["overlays/kind"] if d["kind"] == "Deployment")
    bad = copy.deepcopy(deploy)
    bad["spec"]["replicaz"] = 2
    assert core_errors(bad), "kubernetes-validate --strict accepted an unknown field"
    bad = copy.deepcopy(deploy)
    bad["spec"]["template"]["spec"]["containers"][0]["resources"]["limitz"] = {"cpu": "1"}
    assert core_errors(bad)


# --------------------------------------------------------------------------------------------------
# project rules
# --------------------------------------------------------------------------------------------------


def test_inferenceservice_is_standard_mode_with_a_cpu_hpa(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for target, docs in rendered.items():
        isvc = the_isvc(docs)
        ann = isvc["metadata"]["annotations"]
        assert ann["serving.kserve.io/deploymentMode"] == "Standard", target
        assert ann["serving.kserve.io/autoscalerClass"] == "hpa", target
        pred = isvc["spec"]["predictor"]
        assert (pred["minReplicas"], pred["maxReplicas"]) == (1, 3), target
        (metric,) = pred["autoScaling"]["metrics"]
        assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu", target
        target_spec = metric["resource"]["target"]
        assert target_spec["type"] == "Utilization" and 10 <= target_spec["averageUtilization"] <= 90
        (c,) = pred["containers"]
        assert c["name"] == "kserve-container"
        # deploy.sh's JSON patch tests and replaces env[0]: STORAGE_URI must stay first.
        assert c["env"][0]["name"] == "STORAGE_URI"
        assert c["env"][0]["value"].startswith("s3://models/inventory-counter/")
        assert "--model_dir=/mnt/models" in c["args"] and "--model_name=inventory-counter" in c["args"]
        # Thread pools come from the server's own reading of the cgroup CPU quota (cores / workers);
        # a flag or OMP_NUM_THREADS set to the CPU limit would oversubscribe it.
        assert not [a for a in c["args"] if a.startswith(("--intra_op_threads", "--decode_threads"))]
        assert not {e["name"] for e in c["env"]} & {"OMP_NUM_THREADS", "CPU_LIMIT"}, target
        assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert (
            pred["serviceAccountName"]
            == next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]["name"]
        )


def test_requests_equal_limits_for_every_container(rendered: dict[str, list[dict[str, Any]]]) -> None:
    seen = 0
    for target, doc in objects(rendered):
        for c in containers(doc):
            res = c.get("resources", {})
            assert res.get("requests") and res["requests"] == res.get("limits"), (target, c["name"], res)
            seen += 1
    assert seen >= 5


def test_overlays_are_smaller_than_base(rendered: dict[str, list[dict[str, Any]]]) -> None:
    base = the_isvc(rendered["base"])["spec"]["predictor"]["containers"][0]["resources"]["limits"]
    assert base == {"cpu": "2", "memory": "2Gi"}
    for target in ("overlays/kind", "overlays/minikube"):
        c = the_isvc(rendered[target])["spec"]["predictor"]["containers"][0]
        assert c["resources"]["limits"] == {"cpu": "1", "memory": "1Gi"}, target
        assert c["imagePullPolicy"] == "IfNotPresent", target  # loaded into the nodes, never pulled


def test_images_are_pinned(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for target, doc in objects(rendered):
        for c in containers(doc):
            image = c["image"]
            name, _, tag = image.rpartition(":") if "@" not in image else (image, "", "digest")
            assert name and "/" not in tag, f"{target}: {image} has no tag"
            assert tag != "latest", f"{target}: {image} uses :latest"


def test_pods_run_as_non_root(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for target, doc in objects(rendered):
        for spec in pod_specs(doc):
            assert spec["securityContext"]["runAsNonRoot"] is True, (target, doc["kind"])
            assert spec["securityContext"]["runAsUser"] > 0
            assert spec.get("automountServiceAccountToken", True) is False or doc["kind"] == ISVC_KIND
        for c in containers(doc):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (target, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (target, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (target, c["name"])


def test_minio_home_is_writable(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """MinIO creates $HOME/.minio/certs at start; with a read-only root FS, HOME must be an emptyDir."""
    for target in ("overlays/kind", "overlays/minikube"):
        minio = next(d for d in rendered[target] if d["kind"] == "Deployment")
        assert minio["metadata"]["name"] == "minio", target
        spec = minio["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert mounts.get(env.get("HOME")) in empty_dirs, (target, env.get("HOME"), mounts)


def test_s3_secret_comes_from_the_env_file_with_kserve_annotations(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    import base64

    for target, docs in rendered.items():
        (secret,) = [d for d in docs if d["kind"] == "Secret"]
        data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        assert data == {"AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET}, target
        ann = secret["metadata"]["annotations"]
        sa = next(d for d in docs if d["kind"] == "ServiceAccount")
        assert {"name": secret["metadata"]["name"]} in sa["secrets"], target
        if target == "base":
            assert ann["serving.kserve.io/s3-endpoint"] == "s3.amazonaws.com"
            assert ann["serving.kserve.io/s3-usehttps"] == "1"
        else:
            svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "minio")
            host = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local"
            assert ann["serving.kserve.io/s3-endpoint"] == f"{host}:{svc['spec']['ports'][0]['port']}"
            assert ann["serving.kserve.io/s3-usehttps"] == "0"


def test_no_secret_values_are_committed() -> None:
    proc = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", "k8s/base/s3.env"], check=False)
    assert proc.returncode == 0, "k8s/base/s3.env must be git-ignored"
    for path in K8S.rglob("*"):
        if not path.is_file() or path.name == "s3.env":
            continue
        text = path.read_text(errors="replace")
        for line in text.splitlines():
            for key in ("AWS_ACCESS_KEY_ID=", "AWS_SECRET_ACCESS_KEY=", "MINIO_ROOT_PASSWORD="):
                if key in line:  # only empty values, shell variables or printf slots
                    value = line.split(key, 1)[1].strip().strip("\"'")
                    assert value == "" or value.startswith(("$", "%s")), f"{path}: a credential is committed"
        for doc in yaml.safe_load_all(text) if path.suffix in (".yaml", ".yml") else []:
            if isinstance(doc, dict) and doc.get("kind") == "Secret":
                assert not doc.get("data") and not doc.get("stringData"), f"{path}: Secret with values"


# --------------------------------------------------------------------------------------------------
# deploy / undeploy scripts
# --------------------------------------------------------------------------------------------------


def run_script(
    script: str, env: dict[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(K8S / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def bare_path(tmp_path: Path) -> Path:
    """A PATH holding only the basic utilities the scripts use before their tool checks."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "dirname", "git", "cat", "od", "tr", "mktemp", "chmod", "cp", "rm", "mkdir"):
        found = shutil.which(tool)
        if found:
            (bindir / tool).symlink_to(found)
    return bindir


def stub(bindir: Path, name: str) -> None:
    """A tool that exists but must not be reached in these tests."""
    (bindir / name).write_text('#!/bin/sh\necho "$0 should not run here" >&2\nexit 99\n')
    (bindir / name).chmod(0o755)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.json").write_text("{}")
    (d / "model.onnx").write_bytes(b"")
    return d


def script_env(bindir: Path, **extra: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "TMPDIR")}
    return {**keep, "PATH": str(bindir), "PYTHON": shutil.which("python3") or "python3", **extra}


def test_deploy_lists_every_missing_tool(bare_path: Path, model_dir: Path) -> None:
    proc = run_script("deploy.sh", script_env(bare_path, MODEL_DIR=str(model_dir)))
    assert proc.returncode == 2, proc.stderr
    for tool in ("docker", "kubectl", "kind", "curl"):
        assert f"  - {tool} " in proc.stderr or f"  - {tool}\n" in proc.stderr, proc.stderr
    assert "minikube" not in proc.stderr


def test_deploy_names_the_one_missing_tool(bare_path: Path, model_dir: Path) -> None:
    for tool in ("docker", "kubectl", "curl", "minikube"):
        stub(bare_path, tool)
    proc = run_script("deploy.sh", script_env(bare_path, MODEL_DIR=str(model_dir)))
    assert proc.returncode == 2
    assert "missing tools for CLUSTER=kind" in proc.stderr and "  - kind (" in proc.stderr, proc.stderr
    assert "docker" not in proc.stderr.split("CLUSTER=kind", 1)[1]
    proc = run_script("deploy.sh", script_env(bare_path, MODEL_DIR=str(model_dir), CLUSTER="minikube"))
    # Past the tool check (kind is not needed for minikube), stopped at the cluster check.
    assert proc.returncode == 2 and "missing tools" not in proc.stderr, proc.stderr
    assert "minikube profile 'minikube' is not running" in proc.stderr


def test_deploy_rejects_bad_settings_early(bare_path: Path, model_dir: Path, tmp_path: Path) -> None:
    proc = run_script("deploy.sh", script_env(bare_path, CLUSTER="eks"))
    assert proc.returncode == 2 and "CLUSTER=eks is not supported" in proc.stderr
    for tool in ("docker", "kubectl", "curl", "kind"):
        stub(bare_path, tool)
    proc = run_script("deploy.sh", script_env(bare_path, MODEL_DIR=str(tmp_path / "nope")))
    assert proc.returncode == 2 and "no exported model" in proc.stderr and "make run" in proc.stderr
    proc = run_script("deploy.sh", script_env(bare_path, PROFILE="sagemaker", MODEL_DIR=str(model_dir)))
    assert proc.returncode == 2 and "  - SAGEMAKER_ROLE: " in proc.stderr
    proc = run_script(
        "deploy.sh",
        script_env(bare_path, PROFILE="sagemaker", MODEL_DIR=str(model_dir), SAGEMAKER_ROLE="arn:x"),
    )
    assert proc.returncode == 2 and "  - IMAGE_URI: " in proc.stderr and "SAGEMAKER_ROLE" not in proc.stderr


SM_ROLE = "arn:aws:iam::123456789012:role/SageMakerExecution"
SM_IMAGE = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/inventory-monitor/serving:abc123"


@pytest.fixture
def sm_model_dir(tmp_path: Path) -> Path:
    """A model directory sagemaker_tools.endpoint accepts (model.json + the ONNX file)."""
    from components.modelspec import ModelSpec

    d = tmp_path / "sm-model"
    d.mkdir()
    ModelSpec(version="1").save(d)
    (d / "model.onnx").write_bytes(b"onnx")
    return d


def sagemaker_env(bindir: Path, **extra: str) -> dict[str, str]:
    """The real sagemaker_tools.endpoint (this interpreter) in --dry-run: prints its calls, makes none."""
    extra = {"SAGEMAKER_ARGS": "--dry-run", **extra}
    env = script_env(bindir, PYTHON=sys.executable, PROFILE="sagemaker", **extra)
    # any real AWS call would fail to connect
    aws = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}
    return {**env, **aws}


def dry_run_calls(proc: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    assert proc.returncode == 0, proc.stderr
    return {c["operation"]: c["params"] for c in map(json.loads, proc.stdout.splitlines())}


def test_deploy_sagemaker_maps_the_documented_variables(
    bare_path: Path, sm_model_dir: Path, tmp_path: Path
) -> None:
    smoke = tmp_path / "bin.jpg"
    smoke.write_bytes(b"\xff\xd8\xff")
    env = sagemaker_env(
        bare_path,
        MODEL_DIR=str(sm_model_dir),
        IMAGE_URI=SM_IMAGE,
        SAGEMAKER_ROLE=SM_ROLE,
        AWS_REGION="eu-west-1",
        SAGEMAKER_BUCKET="my-models",
        SAGEMAKER_ENDPOINT="inv-test",
        SAGEMAKER_INSTANCE_TYPE="ml.c5.xlarge",
        SAGEMAKER_MIN="2",
        SAGEMAKER_MAX="5",
        SAGEMAKER_MAX_RPS="52",
        SMOKE_IMAGE=str(smoke),
    )
    calls = dry_run_calls(run_script("deploy.sh", env))
    assert calls["create_bucket"] == {
        "Bucket": "my-models",
        "CreateBucketConfiguration": {"LocationConstraint": "eu-west-1"},
    }
    assert calls["create_model"]["ExecutionRoleArn"] == SM_ROLE
    assert calls["create_model"]["PrimaryContainer"]["Image"] == SM_IMAGE
    assert calls["create_endpoint"]["EndpointName"] == "inv-test"
    (variant,) = calls["create_endpoint_config"]["ProductionVariants"]
    assert (variant["InstanceType"], variant["InitialInstanceCount"]) == ("ml.c5.xlarge", 2)
    target = calls["register_scalable_target"]
    assert (target["ResourceId"], target["MinCapacity"], target["MaxCapacity"]) == (
        "endpoint/inv-test/variant/AllTraffic",
        2,
        5,
    )
    tt = calls["put_scaling_policy"]["TargetTrackingScalingPolicyConfiguration"]
    assert tt["TargetValue"] == 1560.0  # 52 req/s x 0.5 x 60
    assert calls["invoke_endpoint"]["Body"] == f"<{smoke}>"

    # defaults, SAGEMAKER_TARGET_INVOCATIONS, and SAGEMAKER_ARGS last (it wins over the mapped flags)
    env = sagemaker_env(
        bare_path,
        MODEL_DIR=str(sm_model_dir),
        IMAGE_URI=SM_IMAGE,
        SAGEMAKER_ROLE=SM_ROLE,
        AWS_REGION="eu-west-1",
        SAGEMAKER_TARGET_INVOCATIONS="600",
    )
    calls = dry_run_calls(run_script("deploy.sh", env))
    assert calls["create_endpoint"]["EndpointName"] == "inventory-counter"
    assert calls["create_endpoint_config"]["ProductionVariants"][0]["InstanceType"] == "ml.m5.large"
    assert calls["create_bucket"]["Bucket"] == "sagemaker-eu-west-1-123456789012"
    target = calls["register_scalable_target"]
    assert (target["MinCapacity"], target["MaxCapacity"]) == (1, 3)
    assert calls["put_scaling_policy"]["TargetTrackingScalingPolicyConfiguration"]["TargetValue"] == 600.0
    assert "invoke_endpoint" not in calls
    env["SAGEMAKER_ARGS"] = "--dry-run --max 6"
    calls = dry_run_calls(run_script("deploy.sh", env))
    assert calls["register_scalable_target"]["MaxCapacity"] == 6


def test_undeploy_sagemaker_passes_the_endpoint_and_region(bare_path: Path) -> None:
    # teardown has no dry run: an invalid name is rejected before any client exists, and the message
    # shows which name and region reached sagemaker_tools.endpoint.
    env = sagemaker_env(bare_path, SAGEMAKER_ENDPOINT="not_a_valid_name", SAGEMAKER_ARGS="")
    proc = run_script("undeploy.sh", {**env, "AWS_REGION": "eu-west-1"})
    assert proc.returncode == 2, proc.stderr
    assert "--endpoint-name 'not_a_valid_name' is invalid" in proc.stderr
    proc = run_script("undeploy.sh", {**env, "AWS_REGION": "mars"})
    assert proc.returncode == 2 and "'mars' is not an AWS region name" in proc.stderr, proc.stderr


def test_undeploy_checks_its_tools(bare_path: Path) -> None:
    proc = run_script("undeploy.sh", script_env(bare_path))
    assert proc.returncode == 2 and "missing tool: kubectl" in proc.stderr
    proc = run_script("undeploy.sh", script_env(bare_path, CLUSTER="gke"))
    assert proc.returncode == 2 and "CLUSTER=gke is not supported" in proc.stderr


@pytest.mark.parametrize("cluster", ["kind", "minikube"])
def test_deploy_render_sets_image_tag_and_model_version(cluster: str) -> None:
    env = {**os.environ, "CLUSTER": cluster, "IMAGE_REPO": "registry.local/im", "IMAGE_TAG": "0123456789ab"}
    env.pop("AWS_ACCESS_KEY_ID", None)
    env.pop("AWS_SECRET_ACCESS_KEY", None)
    kubectl()
    proc = run_script("deploy.sh", env, "--render", "s3://models/inventory-counter/20260101T000000-abcd")
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    isvc = the_isvc(docs)
    c = isvc["spec"]["predictor"]["containers"][0]
    assert c["image"] == "registry.local/im/serving:0123456789ab"
    assert c["env"][0] == {
        "name": "STORAGE_URI",
        "value": "s3://models/inventory-counter/20260101T000000-abcd",
    }
    assert isvc_errors(isvc) == []
    assert not (K8S / "base" / "s3.env").exists(), "deploy.sh must not write credentials into the repo"


def test_shell_scripts_parse_and_pass_shellcheck() -> None:
    scripts = sorted(
        {
            *K8S.glob("*.sh"),
            *(REPO / "docker").rglob("*.sh"),
            *(REPO / "bench").glob("*.sh"),
            REPO / ".ci" / "run",
        }
    )
    assert {"deploy.sh", "undeploy.sh", "build-base.sh", "gpu_session.sh", "run"} <= {p.name for p in scripts}
    for script in scripts:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck); bash -n passed")
    proc = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout


def test_deploy_sagemaker_lists_every_missing_variable_at_once(bare_path: Path, tmp_path: Path) -> None:
    for tool in ("docker", "kubectl", "kind", "curl"):
        stub(bare_path, tool)
    settings = ("MODEL_DIR", "SAGEMAKER_ROLE", "IMAGE_URI", "AWS_REGION", "SAGEMAKER_MAX_RPS")
    env = script_env(bare_path, PROFILE="sagemaker", MODEL_DIR=str(tmp_path / "no-model"))

    def listed(env: dict[str, str]) -> list[str]:
        proc = run_script("deploy.sh", env)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("error:") == 1 and "should not run" not in proc.stderr, proc.stderr
        assert "make deploy PROFILE=sagemaker VAR=value" in proc.stderr
        return [line[4:].split(":", 1)[0] for line in proc.stderr.splitlines() if line.startswith("  - ")]

    assert listed(env) == list(settings)
    given = {"SAGEMAKER_ROLE": SM_ROLE, "IMAGE_URI": SM_IMAGE, "AWS_REGION": "eu-west-1"}
    for name, value in given.items():  # each one given drops exactly that one
        assert listed({**env, name: value}) == [s for s in settings if s != name]
    # what sagemaker_tools.endpoint also accepts counts as given
    assert "AWS_REGION" not in listed({**env, "AWS_DEFAULT_REGION": "eu-west-1"})
    assert "SAGEMAKER_MAX_RPS" not in listed({**env, "SAGEMAKER_TARGET_INVOCATIONS": "600"})
    assert listed({**env, "SAGEMAKER_ARGS": "--no-autoscaling --region=eu-west-1 --role r"}) == [
        "MODEL_DIR",
        "IMAGE_URI",
    ]


def test_deploy_sagemaker_takes_the_settings_from_sagemaker_args(bare_path: Path, sm_model_dir: Path) -> None:
    # SAGEMAKER_ROLE / IMAGE_URI / AWS_REGION unset (set -u must not trip), all given as flags instead
    args = f"--dry-run --role {SM_ROLE} --image-uri {SM_IMAGE} --region eu-west-1 --target-invocations 600"
    env = sagemaker_env(bare_path, MODEL_DIR=str(sm_model_dir), SAGEMAKER_ARGS=args)
    calls = dry_run_calls(run_script("deploy.sh", env))
    assert calls["create_model"]["ExecutionRoleArn"] == SM_ROLE
    assert calls["create_model"]["PrimaryContainer"]["Image"] == SM_IMAGE


def test_make_deploy_sagemaker_lists_every_missing_variable(tmp_path: Path) -> None:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make not installed")
    drop = ("AWS_REGION", "AWS_DEFAULT_REGION", "IMAGE_URI", "MAKEFLAGS", "MAKELEVEL", "MFLAGS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_", *drop))}
    # -o: the venv stamp counts as up to date (no reinstall); the error comes before any AWS call
    cmd = [make, "-o", ".venv/.installed-dev", f"PY={sys.executable}", "deploy", "PROFILE=sagemaker"]
    proc = subprocess.run(
        [*cmd, f"MODEL_DIR={tmp_path / 'no-model'}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    for name in ("MODEL_DIR", "SAGEMAKER_ROLE", "IMAGE_URI", "AWS_REGION", "SAGEMAKER_MAX_RPS"):
        assert f"  - {name}: " in proc.stderr, proc.stderr
    assert proc.stderr.count("error:") == 1


# --------------------------------------------------------------------------------------------------
# overlays/kubeflow: the Optuna study database in the namespace the pipeline's tasks run in
# --------------------------------------------------------------------------------------------------

#: Standalone Kubeflow Pipelines (k8s/README.md) runs the pipeline's pods in this namespace.
KFP_NAMESPACE = "kubeflow"
OPTUNA_TARGET = K8S / "overlays" / "kubeflow"
OPTUNA_COMPONENT = K8S / "components" / "optuna-postgres"


@pytest.fixture(scope="module")
def optuna_docs() -> list[dict[str, Any]]:
    return render(OPTUNA_TARGET)


def the_one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in found])
    return found[0]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


class FakeSecrets:
    """The API server's Secrets of one namespace, as the generator script sees them."""

    def __init__(self) -> None:
        self.store: dict[str, dict[str, str]] = {}
        self.writes: list[tuple[str, str]] = []

    def get(self, name: str) -> dict[str, str] | None:
        return dict(self.store[name]) if name in self.store else None

    def create(self, name: str, data: dict[str, str]) -> bool:
        if name in self.store:
            return False
        self.store[name] = dict(data)
        self.writes.append(("create", name))
        return True

    def patch(self, name: str, data: dict[str, str]) -> None:
        self.store[name].update(data)
        self.writes.append(("patch", name))


def secrets_script(docs: list[dict[str, Any]]) -> tuple[Any, dict[str, str]]:
    """The generator exactly as the Job runs it (from the rendered ConfigMap) and the Job's env."""
    import types

    job = the_one(docs, "Job")
    spec = job["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    (mount,) = c["volumeMounts"]
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    cm = the_one(docs, "ConfigMap", volume["configMap"]["name"])
    script = c["command"][-1]
    assert script.startswith(mount["mountPath"] + "/"), (script, mount)
    source = cm["data"][script.rsplit("/", 1)[1]]
    module = types.ModuleType("optuna_db_secrets")
    exec(compile(source, script, "exec"), module.__dict__)
    env: dict[str, str] = {}
    for name, value in env_of(c).items():
        if isinstance(value, dict):  # the downward API: the Job's own namespace
            assert value == {"fieldRef": {"fieldPath": "metadata.namespace"}}, (name, value)
            env[name] = job["metadata"]["namespace"]
        else:
            env[name] = value
    return module, env


def test_optuna_db_renders_valid_objects_in_the_kfp_namespace(optuna_docs: list[dict[str, Any]]) -> None:
    kinds = sorted(d["kind"] for d in optuna_docs)
    assert kinds == sorted(
        ["ConfigMap", "Deployment", "Job", "PersistentVolumeClaim", "Role", "RoleBinding", "Service",
         "ServiceAccount"]
    )  # fmt: skip
    for doc in optuna_docs:
        assert doc["metadata"]["namespace"] == KFP_NAMESPACE, doc["kind"]
        assert core_errors(doc) == []
    binding = the_one(optuna_docs, "RoleBinding")
    assert binding["subjects"][0]["namespace"] == KFP_NAMESPACE
    bad = copy.deepcopy(the_one(optuna_docs, "Job"))
    bad["spec"]["backofLimit"] = 3
    assert core_errors(bad), "kubernetes-validate --strict accepted an unknown field"


def test_optuna_db_component_is_a_reusable_component() -> None:
    kust = yaml.safe_load((OPTUNA_COMPONENT / "kustomization.yaml").read_text())
    assert kust["kind"] == "Component" and "namespace" not in kust
    overlay = yaml.safe_load((OPTUNA_TARGET / "kustomization.yaml").read_text())
    assert overlay["namespace"] == KFP_NAMESPACE
    assert overlay["components"] == ["../../components/optuna-postgres"]


def test_optuna_db_commits_no_credentials(optuna_docs: list[dict[str, Any]]) -> None:
    import re

    assert not [d for d in optuna_docs if d["kind"] == "Secret"], "a Secret with fixed values is rendered"
    text = yaml.safe_dump_all(optuna_docs)
    # no database URL with a literal password (the script's f-string has {…} there)
    assert not re.search(r"postgres(ql)?(\+\w+)?://[^:/\s]+:[^@{\s]+@", text)
    deploy = the_one(optuna_docs, "Deployment")
    env = env_of(deploy["spec"]["template"]["spec"]["containers"][0])
    assert isinstance(env["POSTGRES_PASSWORD"], dict) and "secretKeyRef" in env["POSTGRES_PASSWORD"]
    for path in OPTUNA_COMPONENT.rglob("*"):
        for doc in yaml.safe_load_all(path.read_text()) if path.suffix == ".yaml" else []:
            assert not (doc or {}).get("secretGenerator"), f"{path}: credentials from a committed file"


def test_optuna_db_images_are_pinned(optuna_docs: list[dict[str, Any]]) -> None:
    import re

    images = {c["image"] for d in optuna_docs for c in containers(d)}
    assert len(images) == 2
    for image in images:
        assert re.fullmatch(r"[a-z0-9./-]+:[\w.-]+@sha256:[0-9a-f]{64}", image), image
        assert ":latest" not in image
    (pg,) = [i for i in images if i.startswith("postgres:")]
    assert re.match(r"postgres:\d+\.\d+-bookworm@", pg), pg


def test_optuna_db_secret_url_points_at_the_service(optuna_docs: list[dict[str, Any]]) -> None:
    from sqlalchemy.engine import make_url

    from components.tune import validate_storage_url
    from pipeline.pipeline import BuildOptions

    module, env = secrets_script(optuna_docs)
    api = FakeSecrets()
    module.ensure(api, env)
    opts = BuildOptions()
    assert env["NAMESPACE"] == KFP_NAMESPACE
    assert env["OPTUNA_SECRET"] == opts.optuna_secret and set(api.store[opts.optuna_secret]) == {
        opts.optuna_secret_key
    }
    url = api.store[opts.optuna_secret][opts.optuna_secret_key]
    assert validate_storage_url(url) == url
    parsed = make_url(url)
    svc = the_one(optuna_docs, "Service")
    (port,) = svc["spec"]["ports"]
    assert parsed.drivername == "postgresql+psycopg2"  # psycopg2-binary is the installed driver
    assert parsed.host == f"{svc['metadata']['name']}.{KFP_NAMESPACE}.svc.cluster.local"
    assert parsed.port == port["port"]
    # the server is initialised with the same credentials: its POSTGRES_* come from the generated Secret
    creds = api.store[env["PG_SECRET"]]
    assert (parsed.username, parsed.password, parsed.database) == (
        creds["username"],
        creds["password"],
        creds["database"],
    )
    assert len(creds["password"]) >= 32
    deploy = the_one(optuna_docs, "Deployment")
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    refs = {k: v["secretKeyRef"] for k, v in env_of(c).items() if isinstance(v, dict)}
    assert refs == {
        "POSTGRES_USER": {"name": env["PG_SECRET"], "key": "username"},
        "POSTGRES_PASSWORD": {"name": env["PG_SECRET"], "key": "password"},
        "POSTGRES_DB": {"name": env["PG_SECRET"], "key": "database"},
    }
    assert port["targetPort"] in {p["name"] for p in c["ports"]} and c["ports"][0]["containerPort"] == 5432
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()


def test_optuna_db_secrets_are_generated_once_and_kept(optuna_docs: list[dict[str, Any]]) -> None:
    module, env = secrets_script(optuna_docs)
    api = FakeSecrets()
    module.ensure(api, env)
    assert api.writes == [("create", "optuna-postgres"), ("create", "optuna-db")]
    first = copy.deepcopy(api.store)
    module.ensure(api, env)  # a second apply: the volume holds the first password, keep it
    assert api.store == first and len(api.writes) == 2
    api.store["optuna-db"]["url"] = "postgresql://stale"  # a URL that drifted is rewritten
    module.ensure(api, env)
    assert api.store == first and api.writes[-1] == ("patch", "optuna-db")
    other = FakeSecrets()
    module.ensure(other, env)  # another cluster: another random password
    assert other.store["optuna-postgres"]["password"] != first["optuna-postgres"]["password"]


def test_optuna_db_secrets_script_speaks_the_secrets_api(optuna_docs: list[dict[str, Any]]) -> None:
    """The script's REST client against a fake API server (create, 409, get, 404, merge patch)."""
    import base64
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    store: dict[str, dict[str, Any]] = {}
    seen: list[tuple[str, str, str, str]] = []
    prefix = f"/api/v1/namespaces/{KFP_NAMESPACE}/secrets"

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

        def body(self) -> Any:
            return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

        def handle_one(self) -> None:
            seen.append(
                (self.command, self.path, self.headers["Authorization"], self.headers["Content-Type"])
            )
            name = self.path.removeprefix(prefix).strip("/")
            if self.command == "POST" and not name:
                obj = self.body()
                if obj["metadata"]["name"] in store:
                    return self.reply(409, {"reason": "AlreadyExists"})
                store[obj["metadata"]["name"]] = obj
                return self.reply(201, obj)
            if name not in store:
                return self.reply(404, {"reason": "NotFound"})
            if self.command == "PATCH":
                store[name]["data"].update(self.body()["data"])
            return self.reply(200, store[name])

        do_GET = do_POST = do_PATCH = handle_one  # noqa: N815

    server = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        module, env = secrets_script(optuna_docs)
        api = module.KubeSecrets(f"http://127.0.0.1:{server.server_address[1]}{prefix}", "tok")
        module.ensure(api, env)
        assert api.create("optuna-db", {"url": "x"}) is False  # 409: already there
        store["optuna-db"]["data"]["url"] = base64.b64encode(b"postgresql://stale").decode()
        module.ensure(api, env)
    finally:
        server.shutdown()
        server.server_close()
    assert store["optuna-postgres"]["metadata"]["labels"]["app.kubernetes.io/component"] == "optuna-db"
    url = base64.b64decode(store["optuna-db"]["data"]["url"]).decode()
    password = base64.b64decode(store["optuna-postgres"]["data"]["password"]).decode()
    assert url.startswith("postgresql+psycopg2://optuna:") and f":{password}@" in url
    assert all(auth == "Bearer tok" for _, _, auth, _ in seen)
    assert ("PATCH", f"{prefix}/optuna-db", "Bearer tok", "application/merge-patch+json") in seen
    # the Role allows exactly these calls
    rules = the_one(optuna_docs, "Role")["rules"]
    assert {"create"} == {v for r in rules if "resourceNames" not in r for v in r["verbs"]}
    named = [r for r in rules if "resourceNames" in r]
    assert named == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["optuna-postgres", "optuna-db"],
         "verbs": ["get", "patch"]}
    ]  # fmt: skip


def test_optuna_postgres_pod_is_persistent_probed_and_unprivileged(optuna_docs: list[dict[str, Any]]) -> None:
    deploy = the_one(optuna_docs, "Deployment")
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"]["type"] == "Recreate"
    spec = deploy["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    pgdata = env_of(c)["PGDATA"]
    pvc = the_one(optuna_docs, "PersistentVolumeClaim")
    (data,) = [v for v in spec["volumes"] if v.get("persistentVolumeClaim")]
    assert data["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    # PGDATA is a subdirectory of the volume (initdb wants an empty directory; lost+found is not)
    assert str(Path(pgdata).parent) == mounts[data["name"]] and pgdata != mounts[data["name"]]
    empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    assert {n for n, p in mounts.items() if p in ("/var/run/postgresql", "/tmp")} <= empty_dirs
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "pg_isready" in " ".join(c[probe]["exec"]["command"]), probe
    res = c["resources"]
    assert res["requests"] and res["requests"] == res["limits"]
    psc = spec["securityContext"]
    assert (psc["runAsNonRoot"], psc["runAsUser"], psc["runAsGroup"], psc["fsGroup"]) == (True, 999, 999, 999)
    assert spec["automountServiceAccountToken"] is False
    job = the_one(optuna_docs, "Job")["spec"]["template"]["spec"]
    for pod in (spec, job):
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for cont in pod["containers"]:
            sc = cont["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert sc["readOnlyRootFilesystem"] is True
            assert cont["resources"]["requests"] == cont["resources"]["limits"]
