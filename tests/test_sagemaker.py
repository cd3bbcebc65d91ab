"""SageMaker deploy tooling against moto's standalone server over HTTP, with real boto3 clients.

moto 5.2.5 implements CreateModel/EndpointConfig/Endpoint, Application Auto Scaling and S3, but not
UpdateEndpoint, and its InvokeEndpoint cannot take a binary (JPEG) body. So this file runs its own moto
server with UpdateEndpoint added (switch the endpoint to the new config, InService), and sends the
runtime API (``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME``) to a small HTTP stand-in for the container that
checks it received a real JPEG. Everything else goes to moto via ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import sys
import tarfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest

from components.common import ConfigError
from components.modelspec import ModelSpec
from sagemaker_tools import endpoint as smd
from sagemaker_tools.config import make_deploy_config, target_from_max_rps
from sagemaker_tools.package import package_model
from tests.fixtures.aws import FAKE_CREDENTIALS, free_port, running_moto_server

ROLE = "arn:aws:iam::123456789012:role/SageMakerExecution"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/inventory-monitor/serving:abc123"
BUCKET = "sagemaker-us-east-1-123456789012"
EP = "inventory-counter"
RID = f"endpoint/{EP}/variant/AllTraffic"


def serve_moto_with_update_endpoint() -> None:
    """Run moto's server with UpdateEndpoint, which moto 5.2.5 lacks (used as ``python -c``)."""
    from moto.core.responses import ActionResult
    from moto.core.utils import utcnow
    from moto.sagemaker.exceptions import ValidationError
    from moto.sagemaker.models import FakeEndpoint, SageMakerModelBackend
    from moto.sagemaker.responses import SageMakerResponse
    from moto.server import main

    def backend_update(self: Any, endpoint_name: str, endpoint_config_name: str) -> Any:
        endpoint = self.endpoints.get(endpoint_name)
        if endpoint is None:
            arn = FakeEndpoint.arn_formatter(endpoint_name, self.account_id, self.region_name)
            raise ValidationError(message=f"Could not find endpoint '{arn}'.")
        config = self.describe_endpoint_config(endpoint_config_name)
        endpoint.endpoint_config_name = endpoint_config_name
        endpoint.production_variants = endpoint._process_production_variants(config["ProductionVariants"])
        endpoint.last_modified_time = utcnow()
        return endpoint

    def response_update(self: Any) -> Any:
        endpoint = self.sagemaker_backend.update_endpoint(
            self._get_param("EndpointName"), self._get_param("EndpointConfigName")
        )
        return ActionResult({"EndpointArn": endpoint.arn})

    SageMakerModelBackend.update_endpoint = backend_update
    SageMakerResponse.update_endpoint = response_update
    main(sys.argv[1:])


@pytest.fixture(scope="module")
def sm_moto() -> Iterator[str]:
    """moto server (S3, SageMaker + UpdateEndpoint, Application Auto Scaling) on 127.0.0.1."""
    code = "from tests.test_sagemaker import serve_moto_with_update_endpoint as f; f()"
    with running_moto_server(["-c", code], cwd=Path(__file__).resolve().parents[1]) as url:
        yield url


class Runtime:
    """Stand-in for SageMaker's runtime API: records InvokeEndpoint requests and answers like the container.

    With ``upstream`` set it forwards the body to that server's ``/invocations`` (the real model server);
    otherwise it checks the body is a real image and answers in the server's V1 shape.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.fail = False
        self.upstream: str | None = None
        runtime = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                runtime.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                code, out = runtime.answer(body, self.headers.get("Content-Type", ""))
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                if code != 200:
                    self.send_header("x-amzn-ErrorType", "ModelError")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, body: bytes, content_type: str) -> tuple[int, bytes]:
        if self.fail:
            return 424, json.dumps({"message": "model failed to load"}).encode()
        if self.upstream:
            req = urllib.request.Request(
                f"{self.upstream}/invocations", data=body, headers={"Content-Type": content_type}
            )
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as e:
                return e.code, e.read()
        from PIL import Image

        Image.open(io.BytesIO(body)).verify()  # a real image, or the request fails
        return 200, json.dumps({"predictions": [{"count": 3, "expected": 2.8}]}).encode()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def runtime() -> Iterator[Runtime]:
    rt = Runtime()
    try:
        yield rt
    finally:
        rt.close()


@pytest.fixture
def aws(sm_moto: str, runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> str:
    """Clean moto state; AWS APIs reach moto via boto3's endpoint env vars, the runtime the stand-in."""
    for key, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_REGION", "SAGEMAKER_ROLE", "SAGEMAKER_BUCKET"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", sm_moto)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", runtime.url)
    req = urllib.request.Request(f"{sm_moto}/moto-api/reset", method="POST")
    urllib.request.urlopen(req, timeout=10)
    return sm_moto


@pytest.fixture
def clients(aws: str) -> dict[str, Any]:
    session = boto3.session.Session(region_name="us-east-1")
    return {n: session.client(n, endpoint_url=aws) for n in ("sagemaker", "s3", "application-autoscaling")}


def make_model_dir(path: Path, version: str = "1", payload: bytes = b"onnx-bytes-v1") -> Path:
    """A model dir in the serving contract (load_model_spec only checks model.json and the ONNX file)."""
    path.mkdir(parents=True)
    ModelSpec(version=version, onnx_int8_file="model.int8.onnx").save(path)
    (path / "model.onnx").write_bytes(payload * 100)
    (path / "model.int8.onnx").write_bytes(payload[::-1] * 50)
    (path / "model.pt").write_bytes(b"torch weights the serving image never loads")
    return path


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return make_model_dir(tmp_path / "model")


@pytest.fixture
def smoke_image(abid_dir: Path) -> Path:
    images = sorted((abid_dir / "bin-images").glob("*.jpg"))
    if not images:
        pytest.skip(f"no bin images under {abid_dir}")
    return images[0]


def deploy_args(model_dir: Path, *extra: str) -> list[str]:
    return [
        "deploy",
        "--model-dir",
        str(model_dir),
        "--image-uri",
        IMAGE,
        "--role",
        ROLE,
        "--wait-delay",
        "0",
        "--wait-attempts",
        "3",
        *extra,
    ]


def tags_of(sm: Any, arn: str) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in sm.list_tags(ResourceArn=arn)["Tags"]}


# ---------------------------------------------------------------------------------------------------


def test_target_comes_from_measured_capacity() -> None:
    assert target_from_max_rps(12.8) == 384
    # the reference project's instance served 770/minute: half of that, not 50, is the target
    assert target_from_max_rps(770 / 60) == 385
    # bench/results/serve.json: 10,304/min (~171 req/s) is the highest level with p99 <= 300 ms
    assert target_from_max_rps(171) == 5130
    assert target_from_max_rps(52) == 1560
    with pytest.raises(ConfigError, match="positive"):
        target_from_max_rps(0)


def test_package_is_deterministic_and_holds_only_serving_files(model_dir: Path, tmp_path: Path) -> None:
    a = package_model(model_dir, tmp_path / "a.tar.gz")
    os.utime(model_dir / "model.onnx", (1, 1))  # mtimes must not change the archive
    b = package_model(model_dir, tmp_path / "b.tar.gz")
    assert a.sha256 == b.sha256
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.version == f"1-{a.sha256[:12]}"
    with tarfile.open(a.path) as tar:
        assert tar.getnames() == ["model.int8.onnx", "model.json", "model.onnx"]  # at the root, no model.pt
        assert {m.mtime for m in tar.getmembers()} == {0}
        assert tar.extractfile("model.onnx").read() == (model_dir / "model.onnx").read_bytes()  # type: ignore[union-attr]


def test_deploy_creates_exactly_the_expected_resources(
    aws: str, clients: dict[str, Any], runtime: Runtime, model_dir: Path, smoke_image: Path, capsys: Any
) -> None:
    rc = smd.main(deploy_args(model_dir, "--max-rps", "12.8", "--smoke-image", str(smoke_image)))
    assert rc == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["action"] == "created"
    sm, s3, aas = clients["sagemaker"], clients["s3"], clients["application-autoscaling"]

    # S3: one content-addressed archive with the serving files at the root
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert len(keys) == 1 and keys[0].startswith("inventory-counter/1-") and keys[0].endswith("/model.tar.gz")
    body = s3.get_object(Bucket=BUCKET, Key=keys[0])["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(body))) as tar:
        assert tar.getnames() == ["model.int8.onnx", "model.json", "model.onnx"]

    # Model, EndpointConfig, Endpoint
    models = sm.list_models()["Models"]
    assert [m["ModelName"] for m in models] == [result["model_name"]]
    model = sm.describe_model(ModelName=result["model_name"])
    assert model["ExecutionRoleArn"] == ROLE
    assert model["PrimaryContainer"]["Image"] == IMAGE
    assert model["PrimaryContainer"]["ModelDataUrl"] == f"s3://{BUCKET}/{keys[0]}"
    assert model["PrimaryContainer"]["Environment"]["MODEL_NAME"] == "inventory-counter"
    assert tags_of(sm, model["ModelArn"]) == {
        "project": "inventory-monitor",
        "inventory-monitor:endpoint": EP,
    }
    configs = sm.list_endpoint_configs()["EndpointConfigs"]
    assert [c["EndpointConfigName"] for c in configs] == [result["endpoint_config_name"]]
    (variant,) = sm.describe_endpoint_config(EndpointConfigName=result["endpoint_config_name"])[
        "ProductionVariants"
    ]
    assert variant["InstanceType"] == "ml.m5.large"
    assert variant["InitialInstanceCount"] == 1
    assert variant["ModelName"] == result["model_name"]
    endpoint = sm.describe_endpoint(EndpointName=EP)
    assert endpoint["EndpointStatus"] == "InService"
    assert endpoint["EndpointConfigName"] == result["endpoint_config_name"]

    # Autoscaling: min/max and a target derived from the measured 12.8 req/s
    (target,) = aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert (target["ResourceId"], target["MinCapacity"], target["MaxCapacity"]) == (RID, 1, 3)
    assert target["ScalableDimension"] == "sagemaker:variant:DesiredInstanceCount"
    (policy,) = aas.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    tt = policy["TargetTrackingScalingPolicyConfiguration"]
    assert policy["PolicyType"] == "TargetTrackingScaling"
    assert tt["TargetValue"] == 384.0
    assert (
        tt["PredefinedMetricSpecification"]["PredefinedMetricType"]
        == "SageMakerVariantInvocationsPerInstance"
    )
    assert (tt["ScaleInCooldown"], tt["ScaleOutCooldown"]) == (300, 60)

    # Smoke test: the runtime API received the real JPEG
    (req,) = runtime.requests
    assert req["path"] == f"/endpoints/{EP}/invocations"
    assert req["headers"]["Content-Type"] == "image/jpeg"
    assert req["body"] == smoke_image.read_bytes()
    assert result["smoke"]["count"] == 3


def test_second_deploy_updates_in_place(
    aws: str, clients: dict[str, Any], model_dir: Path, tmp_path: Path, capsys: Any
) -> None:
    sm, aas = clients["sagemaker"], clients["application-autoscaling"]
    assert smd.main(deploy_args(model_dir, "--max-rps", "12.8")) == 0
    first = json.loads(capsys.readouterr().out)
    arn = sm.describe_endpoint(EndpointName=EP)["EndpointArn"]
    created = sm.describe_endpoint(EndpointName=EP)["CreationTime"]

    # the same inputs again: nothing to change
    assert smd.main(deploy_args(model_dir, "--max-rps", "12.8")) == 0
    assert json.loads(capsys.readouterr().out)["action"] == "unchanged"

    new_dir = make_model_dir(tmp_path / "model2", version="2", payload=b"onnx-bytes-v2")
    rc = smd.main(deploy_args(new_dir, "--target-invocations", "500", "--min", "2", "--max", "4"))
    assert rc == 0, capsys.readouterr().err
    second = json.loads(capsys.readouterr().out)
    assert second["action"] == "updated"
    assert second["endpoint_config_name"] != first["endpoint_config_name"]
    endpoint = sm.describe_endpoint(EndpointName=EP)
    assert endpoint["EndpointArn"] == arn and endpoint["CreationTime"] == created  # not recreated
    assert endpoint["EndpointConfigName"] == second["endpoint_config_name"]
    assert endpoint["EndpointStatus"] == "InService"
    # the previous version is gone once the new one is serving
    assert [c["EndpointConfigName"] for c in sm.list_endpoint_configs()["EndpointConfigs"]] == [
        second["endpoint_config_name"]
    ]
    assert [m["ModelName"] for m in sm.list_models()["Models"]] == [second["model_name"]]
    assert sorted(second["deleted"]) == sorted(
        [f"endpoint-config/{first['endpoint_config_name']}", f"model/{first['model_name']}"]
    )
    # the new fleet starts at the new minimum; the policy was replaced, not duplicated
    (variant,) = sm.describe_endpoint_config(EndpointConfigName=second["endpoint_config_name"])[
        "ProductionVariants"
    ]
    assert variant["InitialInstanceCount"] == 2
    (target,) = aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert (target["MinCapacity"], target["MaxCapacity"]) == (2, 4)
    (policy,) = aas.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    assert policy["TargetTrackingScalingPolicyConfiguration"]["TargetValue"] == 500.0
    assert len(clients["s3"].list_objects_v2(Bucket=BUCKET)["Contents"]) == 2  # both versions kept


def test_instance_type_change_keeps_autoscaling_and_no_autoscaling_removes_it(
    aws: str, clients: dict[str, Any], model_dir: Path, capsys: Any
) -> None:
    sm, aas = clients["sagemaker"], clients["application-autoscaling"]
    assert smd.main(deploy_args(model_dir, "--max-rps", "12.8")) == 0
    capsys.readouterr()
    assert smd.main(deploy_args(model_dir, "--max-rps", "12.8", "--instance-type", "ml.c5.xlarge")) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["action"] == "updated"
    (variant,) = sm.describe_endpoint_config(EndpointConfigName=result["endpoint_config_name"])[
        "ProductionVariants"
    ]
    assert variant["InstanceType"] == "ml.c5.xlarge"
    (deleted,) = result["deleted"]  # only the old config: the model did not change
    assert deleted.startswith("endpoint-config/")
    assert [m["ModelName"] for m in sm.list_models()["Models"]] == [result["model_name"]]
    (target,) = aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert (target["MinCapacity"], target["MaxCapacity"]) == (1, 3)  # registered again after the update
    assert len(aas.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]) == 1

    argv = deploy_args(model_dir, "--no-autoscaling", "--instance-type", "ml.c5.xlarge")
    assert smd.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["action"] == "unchanged"
    assert aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []
    assert aas.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"] == []


def test_failed_smoke_test_rolls_back_to_the_previous_version(
    aws: str,
    clients: dict[str, Any],
    runtime: Runtime,
    model_dir: Path,
    tmp_path: Path,
    smoke_image: Path,
    capsys: Any,
) -> None:
    sm = clients["sagemaker"]
    assert smd.main(deploy_args(model_dir, "--max-rps", "10", "--smoke-image", str(smoke_image))) == 0
    first = json.loads(capsys.readouterr().out)
    runtime.fail = True
    new_dir = make_model_dir(tmp_path / "broken", version="2", payload=b"broken")
    assert smd.main(deploy_args(new_dir, "--max-rps", "20", "--smoke-image", str(smoke_image))) == 1
    err = capsys.readouterr().err
    assert f"rolled {EP} back to {first['endpoint_config_name']}" in err
    assert sm.describe_endpoint(EndpointName=EP)["EndpointConfigName"] == first["endpoint_config_name"]
    assert [c["EndpointConfigName"] for c in sm.list_endpoint_configs()["EndpointConfigs"]] == [
        first["endpoint_config_name"]
    ]
    assert [m["ModelName"] for m in sm.list_models()["Models"]] == [first["model_name"]]
    # the failed version never reached the scaling policy: still 10 req/s x 0.5 x 60
    (policy,) = clients["application-autoscaling"].describe_scaling_policies(ServiceNamespace="sagemaker")[
        "ScalingPolicies"
    ]
    assert policy["TargetTrackingScalingPolicyConfiguration"]["TargetValue"] == 300.0


def test_instance_type_change_with_a_failed_smoke_test_keeps_the_old_autoscaling(
    aws: str,
    clients: dict[str, Any],
    runtime: Runtime,
    model_dir: Path,
    smoke_image: Path,
    capsys: Any,
) -> None:
    sm, aas = clients["sagemaker"], clients["application-autoscaling"]
    argv = deploy_args(
        model_dir, "--max-rps", "10", "--min", "1", "--max", "3", "--scale-in-cooldown", "120",
        "--smoke-image", str(smoke_image),
    )  # fmt: skip
    assert smd.main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    runtime.fail = True
    # a new instance type removes the variant's autoscaling before UpdateEndpoint; the smoke test fails
    argv = deploy_args(
        model_dir, "--max-rps", "20", "--min", "2", "--max", "4", "--instance-type", "ml.c5.xlarge",
        "--smoke-image", str(smoke_image),
    )  # fmt: skip
    assert smd.main(argv) == 1
    err = capsys.readouterr().err
    assert f"rolled {EP} back to {first['endpoint_config_name']}" in err
    assert "could not restore" not in err
    endpoint = sm.describe_endpoint(EndpointName=EP)
    assert endpoint["EndpointConfigName"] == first["endpoint_config_name"]
    (variant,) = sm.describe_endpoint_config(EndpointConfigName=first["endpoint_config_name"])[
        "ProductionVariants"
    ]
    assert variant["InstanceType"] == "ml.m5.large"
    assert [c["EndpointConfigName"] for c in sm.list_endpoint_configs()["EndpointConfigs"]] == [
        first["endpoint_config_name"]
    ]
    # the old scalable target and policy are registered again, with the old values
    (target,) = aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert (target["ResourceId"], target["MinCapacity"], target["MaxCapacity"]) == (RID, 1, 3)
    (policy,) = aas.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    assert policy["PolicyName"] == f"{EP}-invocations-per-instance"
    assert policy["PolicyType"] == "TargetTrackingScaling"
    tt = policy["TargetTrackingScalingPolicyConfiguration"]
    assert tt["TargetValue"] == 300.0  # 10 req/s x 0.5 x 60, not the failed version's 600
    assert (
        tt["PredefinedMetricSpecification"]["PredefinedMetricType"]
        == "SageMakerVariantInvocationsPerInstance"
    )
    assert (tt["ScaleInCooldown"], tt["ScaleOutCooldown"]) == (120, 60)


def test_teardown_leaves_nothing_and_is_idempotent(
    aws: str, clients: dict[str, Any], model_dir: Path, capsys: Any
) -> None:
    sm, aas = clients["sagemaker"], clients["application-autoscaling"]
    assert smd.main(deploy_args(model_dir, "--max-rps", "12.8")) == 0
    # a model this tool did not create must survive
    sm.create_model(ModelName=f"{EP}-someone-else", ExecutionRoleArn=ROLE, PrimaryContainer={"Image": IMAGE})
    capsys.readouterr()
    assert smd.main(["status", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["status"] == "InService"
    expected = {"instance_type": "ml.m5.large", "desired_instances": 1, "min": 1, "max": 3}
    assert {k: info["variants"][0][k] for k in expected} == expected
    assert info["variants"][0]["target_invocations"] == 384.0

    assert smd.main(["teardown", "--wait-delay", "0", "--wait-attempts", "3"]) == 0
    out = capsys.readouterr().out
    assert f"deleted endpoint/{EP}" in out and f"deleted scalable-target/{RID}" in out
    assert sm.list_endpoints()["Endpoints"] == []
    assert sm.list_endpoint_configs()["EndpointConfigs"] == []
    assert [m["ModelName"] for m in sm.list_models()["Models"]] == [f"{EP}-someone-else"]
    assert aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []
    assert aas.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"] == []

    assert smd.main(["teardown"]) == 0
    assert capsys.readouterr().out.strip() == f"nothing to delete for endpoint {EP}"
    assert smd.main(["status"]) == 1


def test_an_endpoint_this_tool_did_not_create_is_never_touched(
    aws: str, clients: dict[str, Any], model_dir: Path, capsys: Any
) -> None:
    sm = clients["sagemaker"]
    sm.create_model(ModelName="foreign", ExecutionRoleArn=ROLE, PrimaryContainer={"Image": IMAGE})
    sm.create_endpoint_config(
        EndpointConfigName="foreign",
        ProductionVariants=[
            {"VariantName": "AllTraffic", "ModelName": "foreign", "InstanceType": "ml.m5.large",
             "InitialInstanceCount": 1}
        ],
    )  # fmt: skip
    sm.create_endpoint(EndpointName=EP, EndpointConfigName="foreign")
    assert smd.main(deploy_args(model_dir, "--max-rps", "12.8")) == 1
    assert "was not created by this tool" in capsys.readouterr().err
    assert smd.main(["teardown"]) == 1
    assert "refusing to delete it" in capsys.readouterr().err
    assert sm.describe_endpoint(EndpointName=EP)["EndpointConfigName"] == "foreign"
    assert [m["ModelName"] for m in sm.list_models()["Models"]] == ["foreign"]  # refused before any change
    assert clients["s3"].list_buckets()["Buckets"] == []
    assert (
        clients["application-autoscaling"].describe_scalable_targets(ServiceNamespace="sagemaker")[
            "ScalableTargets"
        ]
        == []
    )


def test_dry_run_prints_every_call_and_makes_none(model_dir: Path, capsys: Any) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # any real call would fail to connect
    argv = deploy_args(
        model_dir, "--max-rps", "12.8", "--dry-run", "--region", "eu-west-1", "--endpoint-url", dead
    )
    assert smd.main(argv) == 0
    calls = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ops = [(c["service"], c["operation"]) for c in calls]
    expected_order = [
        ("s3", "create_bucket"),
        ("s3", "upload_file"),
        ("sagemaker", "create_model"),
        ("sagemaker", "create_endpoint_config"),
        ("sagemaker", "create_endpoint"),
        ("sagemaker", "update_endpoint"),
        ("application-autoscaling", "register_scalable_target"),
        ("application-autoscaling", "put_scaling_policy"),
        ("sagemaker", "delete_endpoint_config"),
    ]
    assert [op for op in ops if op in expected_order] == expected_order
    by_op = {c["operation"]: c["params"] for c in calls}
    assert by_op["create_bucket"] == {
        "Bucket": "sagemaker-eu-west-1-123456789012",
        "CreateBucketConfiguration": {"LocationConstraint": "eu-west-1"},
    }
    assert by_op["put_scaling_policy"]["TargetTrackingScalingPolicyConfiguration"]["TargetValue"] == 384.0
    assert by_op["create_endpoint_config"]["ProductionVariants"][0]["InstanceType"] == "ml.m5.large"


@pytest.mark.parametrize(
    ("extra", "env", "message"),
    [
        (["--role", "SageMakerExecution"], {}, "must be an IAM role ARN"),
        (["--role", "arn:aws:iam::123456789012:user/alice"], {}, "must be an IAM role ARN"),
        (["--role", ""], {}, "no execution role"),
        (["--instance-type", "ml.m5.larg"], {}, "did you mean ml.m5.large"),
        (["--instance-type", "m5.large"], {}, "unknown SageMaker hosting instance type"),
        (["--model-dir", "/nonexistent/model"], {}, "does not exist: train a model first"),
        (["--min", "3", "--max", "2"], {}, "--min 3 is greater than --max 2"),
        (["--min", "0"], {}, "must be >= 1"),
        (["--image-uri", "docker.io/library/serving:1"], {}, "must be an Amazon ECR image"),
        ([], {"AWS_DEFAULT_REGION": ""}, "no AWS region"),
        (["--max-rps", "-1"], {}, "positive"),
    ],
)
def test_invalid_input_fails_before_any_call(
    model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
    extra: list[str],
    env: dict[str, str],
    message: str,
) -> None:
    for key, value in {**FAKE_CREDENTIALS, **env}.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_REGION", "SAGEMAKER_ROLE"):
        monkeypatch.delenv(key, raising=False)
    # Every API goes to a closed port: a call made before validation would fail with exit 1, not 2.
    dead = f"http://127.0.0.1:{free_port()}"
    argv = deploy_args(model_dir, "--endpoint-url", dead)
    if "--max-rps" not in extra:
        argv += ["--max-rps", "12.8"]
    assert smd.main(argv + extra) == 2  # a later flag wins, so each case overrides one good value
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err


def test_missing_scaling_target_and_conflicting_flags(model_dir: Path, capsys: Any) -> None:
    with pytest.raises(ConfigError, match="no scaling target"):
        make_deploy_config(model_dir=model_dir, image_uri=IMAGE, role_arn=ROLE, region="us-east-1")
    with pytest.raises(ConfigError, match="not both"):
        make_deploy_config(
            model_dir=model_dir,
            image_uri=IMAGE,
            role_arn=ROLE,
            region="us-east-1",
            target_invocations=100,
            max_rps=5.0,
        )
    cfg = make_deploy_config(
        model_dir=model_dir,
        image_uri=IMAGE,
        region="us-east-1",
        role_arn=None,
        max_rps=5.0,
        env={"SAGEMAKER_ROLE": ROLE, "SAGEMAKER_BUCKET": "my-models"},
    )
    assert (cfg.role_arn, cfg.bucket, cfg.target_invocations) == (ROLE, "my-models", 150)


@pytest.mark.slow  # exports a model (torch) and starts the model server: ~10-30 s
def test_archive_served_by_the_real_server_answers_through_invoke_endpoint(
    aws: str,
    clients: dict[str, Any],
    runtime: Runtime,
    random_model_dir: Path,
    smoke_image: Path,
    tmp_path: Path,
    capsys: Any,
) -> None:
    """The SageMaker path end to end: the archive, extracted as /opt/ml/model, runs in ``serving serve``."""
    from tests.fixtures.serving import start_server, stop_server

    package = package_model(random_model_dir, tmp_path / "model.tar.gz")
    opt_ml_model = tmp_path / "opt-ml-model"
    with tarfile.open(package.path) as tar:
        tar.extractall(opt_ml_model, filter="data")
    server = start_server(opt_ml_model, tmp_path / "server.log", sagemaker=True)
    try:
        runtime.upstream = server.url
        rc = smd.main(deploy_args(random_model_dir, "--max-rps", "8", "--smoke-image", str(smoke_image)))
        assert rc == 0, capsys.readouterr().err
    finally:
        stop_server(server)
    result = json.loads(capsys.readouterr().out)
    assert result["smoke"]["count"] in (1, 2, 3, 4, 5)
    assert set(result["smoke"]["response"]["predictions"][0]) >= {"count", "probabilities", "expected"}
    # what the server ran is byte for byte what the endpoint's model points at
    bucket, key = result["model_data_url"].removeprefix("s3://").split("/", 1)
    uploaded = clients["s3"].get_object(Bucket=bucket, Key=key)["Body"].read()
    assert hashlib.sha256(uploaded).hexdigest() == package.sha256


# --------------------------------------------------------------------------- training job (optional path)

TRAIN_IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/inventory-monitor/components:abc123"


def train_args(*extra: str) -> list[str]:
    return [
        "--image-uri",
        TRAIN_IMAGE,
        "--role",
        ROLE,
        "--data",
        "s3://inventory-data/runs/1/ingest",
        "--split",
        "s3://inventory-data/runs/1/split/",
        "--output",
        "s3://inventory-data/runs/1/training/",
        "--job-name",
        "inventory-counter-train-1",
        *extra,
    ]


def test_training_job_runs_components_train_with_the_pipeline_flags(
    aws: str, clients: dict[str, Any], capsys: Any
) -> None:
    from sagemaker_tools import train as smt

    rc = smt.main(train_args("--hp", "epochs=20", "--hp", "lr=0.1", "--hp", "head=ordinal"))
    assert rc == 0, capsys.readouterr().err
    job = clients["sagemaker"].describe_training_job(TrainingJobName="inventory-counter-train-1")
    algo = job["AlgorithmSpecification"]
    assert algo["TrainingImage"] == TRAIN_IMAGE
    assert algo["ContainerEntrypoint"] == ["python", "-m", "components.train"]
    assert algo["ContainerArguments"] == [
        "--train", "/opt/ml/input/data/split/train.csv",
        "--val", "/opt/ml/input/data/split/val.csv",
        "--data-root", "/opt/ml/input/data/data",
        "--out", "/opt/ml/model",
        "--no-progress",
        "--epochs", "20", "--head", "ordinal", "--lr", "0.1",
    ]  # fmt: skip
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in job["InputDataConfig"]}
    assert channels == {
        "data": "s3://inventory-data/runs/1/ingest/",
        "split": "s3://inventory-data/runs/1/split/",
    }
    assert job["OutputDataConfig"]["S3OutputPath"] == "s3://inventory-data/runs/1/training/"
    assert job["ResourceConfig"]["InstanceType"] == "ml.g4dn.xlarge"
    assert job["HyperParameters"] == {"epochs": "20", "head": "ordinal", "lr": "0.1"}
    assert json.loads(capsys.readouterr().out)["model_artifacts"].endswith("model.tar.gz")


def test_training_hyperparameters_are_real_train_flags() -> None:
    """A job setting every hyperparameter passes arguments ``components.train``'s own parser takes, and
    each value lands in the TrainConfig setting of that name (both read from the one declaration)."""
    from components.training.cli import build_parser
    from sagemaker_tools.train import TrainingJobConfig, hyperparameter_types

    samples = {int: "3", float: "0.25", str: None}
    choices = {
        "head": "classification",
        "optimizer": "adamw",
        "selection-metric": "val_rmse",
        "classes": "1,2,3",
    }
    hps = {
        name: choices.get(name) or samples[kind] or f"v-{name}"
        for name, kind in hyperparameter_types().items()
    }
    assert {"epochs", "lr", "head", "image-size", "batch-size"} <= set(hps)
    job = TrainingJobConfig(
        job_name="j", image_uri="i", role_arn="r", region="us-east-1", data_uri="s3://b/d/",
        split_uri="s3://b/s/", output_uri="s3://b/o/", hyperparameters=hps,
    )  # fmt: skip
    args = build_parser().parse_args(job.container_arguments())
    for name, text in hps.items():
        value = getattr(args, name.replace("-", "_"))
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        assert shown == text, (name, value)
    assert str(args.train_csv).endswith("split/train.csv") and args.progress is False


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--hp", "epoch=3"], "did you mean epochs"),
        (["--hp", "lr=fast"], "expected float"),
        (["--data", "/local/dir"], "--data must be an S3 prefix"),
        (["--instance-type", "ml.g4dn.xlarg"], "did you mean ml.g4dn.xlarge"),
        (["--role", "nope"], "must be an IAM role ARN"),
    ],
)
def test_training_job_invalid_input_fails_before_any_call(
    monkeypatch: pytest.MonkeyPatch, capsys: Any, extra: list[str], message: str
) -> None:
    from sagemaker_tools import train as smt

    for key, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    dead = f"http://127.0.0.1:{free_port()}"
    assert smt.main([*train_args(*extra), "--endpoint-url", dead]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_training_job_dry_run_prints_the_request(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    from sagemaker_tools import train as smt

    for key, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    dead = f"http://127.0.0.1:{free_port()}"
    assert smt.main([*train_args("--hp", "batch_size=64", "--dry-run"), "--endpoint-url", dead]) == 0
    call = json.loads(capsys.readouterr().out)
    assert call["operation"] == "create_training_job"
    assert call["params"]["AlgorithmSpecification"]["ContainerArguments"][-2:] == ["--batch-size", "64"]
    assert call["params"]["StoppingCondition"] == {"MaxRuntimeInSeconds": 86400}
