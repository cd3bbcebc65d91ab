"""components.publish: KServe layout on a local store and on a real S3 API (moto server)."""

from __future__ import annotations

import io
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest
import yaml
from botocore.exceptions import ClientError

import components.publish as publish_module
from components.common import ConfigError
from components.modelspec import MODEL_JSON, ONNX_FILE, load_model_spec
from components.publish import LOCK_FILE, default_version, main, publish


def _predict(model_dir: Path, image: Path) -> int:
    import onnxruntime as ort

    from components.preprocess import preprocess_batch

    spec = load_model_spec(model_dir)
    sess = ort.InferenceSession(str(model_dir / spec.onnx_file), providers=["CPUExecutionProvider"])
    batch = preprocess_batch([image], spec.preprocess)
    _, count, _ = sess.run(list(spec.output_names), {spec.input_name: batch})
    assert count.shape == (1,)
    return int(count[0])


def _a_jpeg(abid_dir: Path) -> Path:
    return next(iter(sorted((abid_dir / "bin-images").glob("*.jpg"))))


def test_local_publish_layout_manifest_and_prediction(random_model_dir: Path, tmp_path: Path, abid_dir: Path):
    store = tmp_path / "store"
    result = publish(random_model_dir, str(store), version="v1")

    dest = store / "inventory-counter" / "v1"
    assert result.uri == str(dest)
    assert sorted(p.name for p in dest.iterdir()) == sorted(result.files)
    assert result.files[-1] == MODEL_JSON and ONNX_FILE in result.files
    hidden = [p.name for p in (store / "inventory-counter").iterdir() if p.name.startswith(".")]
    assert hidden == [LOCK_FILE], "staging left"

    spec = load_model_spec(dest)
    assert spec.version == "v1" and spec.name == "inventory-counter"
    assert _predict(dest, _a_jpeg(abid_dir)) in spec.classes

    index = json.loads((store / "inventory-counter" / "versions.json").read_text())
    assert index["latest"] == "v1" and [v["version"] for v in index["versions"]] == ["v1"]
    assert index["versions"][0]["sha256"] == result.sha256

    isvc = yaml.safe_load(result.manifest_path.read_text())
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    assert isvc["metadata"]["name"] == "inventory-counter"
    container = isvc["spec"]["predictor"]["containers"][0]
    assert {"name": "STORAGE_URI", "value": str(dest)} in container["env"]
    assert "--model_dir=/mnt/models" in container["args"]


def test_version_index_records_the_models_metrics(random_model_dir: Path, tmp_path: Path):
    model = tmp_path / "model"
    shutil.copytree(random_model_dir, model)
    spec = load_model_spec(model)
    spec.metrics = {
        "val": {"accuracy": 0.42, "rmse": 1.05, "per_class": [0.1, 0.2]},
        "int8_gate": {"accepted": True},
    }
    spec.save(model)
    publish(model, str(tmp_path / "store"), version="v1")
    index = json.loads((tmp_path / "store" / "inventory-counter" / "versions.json").read_text())
    assert index["versions"][0]["metrics"] == {
        "val_accuracy": 0.42,
        "val_rmse": 1.05,
        "int8_gate_accepted": True,
    }


def test_an_evaluated_copy_carries_its_test_figures_into_the_index(random_model_dir: Path, tmp_path: Path):
    from components.test_figures import evaluated_copy

    evaluation = {
        "accuracy": 0.4,
        "rmse": 1.1,
        "mae": 0.8,
        "n": 50,
        "per_class_accuracy": {"1": 0.5},
        "intervals": {"level": 0.95, "accuracy": [0.3, 0.5], "rmse": [1.0, 1.2], "mae": [0.7, 0.9]},
    }
    before = (random_model_dir / MODEL_JSON).read_text()
    model = evaluated_copy(random_model_dir, evaluation, tmp_path / "evaluated")
    assert (random_model_dir / MODEL_JSON).read_text() == before  # the input stays as trained
    spec = load_model_spec(model)
    assert spec.metrics["test"] == {k: evaluation[k] for k in ("accuracy", "rmse", "mae", "n", "intervals")}
    assert json.loads((model / "metrics.json").read_text())["test"]["per_class_accuracy"] == {"1": 0.5}
    assert "| test | 50 | " in (model / "MODEL_CARD.md").read_text()
    publish(model, str(tmp_path / "store"), version="v1")
    index = json.loads((tmp_path / "store" / "inventory-counter" / "versions.json").read_text())
    figures = index["versions"][0]["metrics"]
    assert [figures[f"test_accuracy{end}"] for end in ("", "_low", "_high")] == [0.4, 0.3, 0.5]
    assert figures["test_n"] == 50 and "test_level" not in figures


def test_versions_are_immutable_unless_forced(random_model_dir: Path, tmp_path: Path):
    store = str(tmp_path / "store")
    first = publish(random_model_dir, store, version="v1")
    with pytest.raises(ConfigError, match="already exists"):
        publish(random_model_dir, store, version="v1")
    forced = publish(random_model_dir, store, version="v1", force=True)
    assert forced.uri == first.uri and load_model_spec(forced.uri).version == "v1"
    publish(random_model_dir, store, version="v2")
    index = json.loads((tmp_path / "store" / "inventory-counter" / "versions.json").read_text())
    assert [v["version"] for v in index["versions"]] == ["v1", "v2"] and index["latest"] == "v2"
    leftovers = [
        p.name
        for p in (tmp_path / "store" / "inventory-counter").iterdir()
        if p.name.startswith(".") and p.name != LOCK_FILE
    ]
    assert leftovers == []


def _widen_merge_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every read-merge-write of versions.json slow, so racing publishes surely overlap."""
    real = publish_module._merge_index

    def slow(index, name, entry):
        time.sleep(0.05)
        return real(index, name, entry)

    monkeypatch.setattr(publish_module, "_merge_index", slow)


def _publish_concurrently(model_dir: Path, store: str, tmp_path: Path, versions: list[str], **kw) -> None:
    def one(v: str) -> None:
        publish(model_dir, store, version=v, manifest_path=tmp_path / f"{v}.yaml", **kw)

    with ThreadPoolExecutor(len(versions)) as pool:
        list(pool.map(one, versions))


def test_concurrent_local_publishes_all_reach_the_index(
    random_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    _widen_merge_window(monkeypatch)
    versions = [f"v{i}" for i in range(6)]
    _publish_concurrently(random_model_dir, str(tmp_path / "store"), tmp_path, versions)
    index = json.loads((tmp_path / "store" / "inventory-counter" / "versions.json").read_text())
    assert sorted(v["version"] for v in index["versions"]) == versions
    assert all(load_model_spec(tmp_path / "store" / "inventory-counter" / v).version == v for v in versions)


def test_concurrent_s3_publishes_all_reach_the_index(
    random_model_dir: Path, tmp_path: Path, aws_env: str, monkeypatch: pytest.MonkeyPatch
):
    boto3.client("s3", endpoint_url=aws_env).create_bucket(Bucket="race")
    _widen_merge_window(monkeypatch)
    versions = [f"v{i}" for i in range(5)]
    _publish_concurrently(random_model_dir, "s3://race/m", tmp_path, versions, endpoint_url=aws_env)
    body = boto3.client("s3", endpoint_url=aws_env).get_object(
        Bucket="race", Key="m/inventory-counter/versions.json"
    )
    index = json.loads(body["Body"].read())
    assert sorted(v["version"] for v in index["versions"]) == versions


class _FakeS3:
    """get/put of one object; conditional puts answer with ``conditional_error`` (a store's reply)."""

    def __init__(self, conditional_error: str | None) -> None:
        self.body: bytes | None = None
        self.conditional_error = conditional_error
        self.puts = 0

    def get_object(self, Bucket: str, Key: str) -> dict:  # noqa: N803 - boto3's names
        if self.body is None:
            raise ClientError({"Error": {"Code": "NoSuchKey"}}, "GetObject")
        return {"Body": io.BytesIO(self.body), "ETag": '"e1"'}

    def put_object(self, Bucket: str, Key: str, Body: bytes, **condition: str) -> dict:  # noqa: N803
        self.puts += 1
        if condition and self.conditional_error:
            raise ClientError({"Error": {"Code": self.conditional_error}}, "PutObject")
        self.body = Body
        return {}


def test_s3_store_without_conditional_writes_still_gets_the_index() -> None:
    s3 = _FakeS3("NotImplemented")
    publish_module._update_s3_index(s3, "b", "k", "inventory-counter", {"version": "v1"})
    assert json.loads(s3.body)["latest"] == "v1" and s3.puts == 2


def test_s3_index_that_keeps_changing_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(publish_module.time, "sleep", lambda s: None)
    s3 = _FakeS3("PreconditionFailed")
    with pytest.raises(ConfigError, match="publish again with --force"):
        publish_module._update_s3_index(s3, "b", "k", "inventory-counter", {"version": "v1"})
    assert s3.puts == publish_module.INDEX_ATTEMPTS and s3.body is None


def test_default_version_is_timestamp_plus_content_hash(random_model_dir: Path, tmp_path: Path):
    result = publish(random_model_dir, str(tmp_path / "store"))
    assert result.version.endswith("-" + result.sha256[:8])
    assert len(result.version) == len(default_version(result.sha256))
    # the same bytes give the same hash: a second default publish differs only by its timestamp
    assert publish(random_model_dir, str(tmp_path / "store2")).sha256 == result.sha256


def test_s3_publish_is_downloadable_like_the_storage_initializer(
    random_model_dir: Path, tmp_path: Path, aws_env: str, abid_dir: Path
):
    s3 = boto3.client("s3", endpoint_url=aws_env)
    s3.create_bucket(Bucket="models")
    result = publish(
        random_model_dir,
        "s3://models/prod",
        version="v7",
        endpoint_url=aws_env,
        manifest_path=tmp_path / "isvc.yaml",
    )
    assert result.uri == "s3://models/prod/inventory-counter/v7"
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="models")["Contents"])
    assert "prod/inventory-counter/versions.json" in keys
    assert f"prod/inventory-counter/v7/{ONNX_FILE}" in keys

    # what KServe's storage initializer does: copy the prefix into /mnt/models
    mnt = tmp_path / "mnt" / "models"
    mnt.mkdir(parents=True)
    for key in keys:
        if key.startswith("prod/inventory-counter/v7/"):
            s3.download_file("models", key, str(mnt / key.rsplit("/", 1)[1]))
    assert load_model_spec(mnt).version == "v7"
    assert _predict(mnt, _a_jpeg(abid_dir)) in (1, 2, 3, 4, 5)

    with pytest.raises(ConfigError, match="already exists"):
        publish(random_model_dir, "s3://models/prod", version="v7", endpoint_url=aws_env)
    isvc = yaml.safe_load((tmp_path / "isvc.yaml").read_text())
    env = isvc["spec"]["predictor"]["containers"][0]["env"]
    assert {"name": "STORAGE_URI", "value": "s3://models/prod/inventory-counter/v7"} in env


def test_s3_forced_replacement_hides_the_old_model_json_first(
    random_model_dir: Path, tmp_path: Path, aws_env: str, monkeypatch: pytest.MonkeyPatch
):
    boto3.client("s3", endpoint_url=aws_env).create_bucket(Bucket="force")
    publish(random_model_dir, "s3://force", version="v1", endpoint_url=aws_env, manifest_path=tmp_path / "a")
    calls: list[tuple[str, str]] = []
    real_client = publish_module.signed_client

    def recording_client(endpoint_url, store):
        client = real_client(endpoint_url, store)

        def record(params, model, **kw):
            calls.append((model.name, params.get("Key", "")))

        client.meta.events.register("before-parameter-build.s3", record)
        return client

    monkeypatch.setattr(publish_module, "signed_client", recording_client)
    publish(
        random_model_dir,
        "s3://force",
        version="v1",
        endpoint_url=aws_env,
        force=True,
        manifest_path=tmp_path / "b",
    )
    # Objects change on DeleteObject, PutObject and (for the large ONNX file) CompleteMultipartUpload.
    changes = ("DeleteObject", "PutObject", "CompleteMultipartUpload")
    writes = [(op, key.rsplit("/", 1)[-1]) for op, key in calls if op in changes]
    assert writes[0] == ("DeleteObject", MODEL_JSON)
    model_writes = [f for op, f in writes[1:] if f != "versions.json"]
    assert model_writes[-1] == MODEL_JSON and ONNX_FILE in model_writes[:-1]


def test_s3_missing_bucket_is_a_config_error(random_model_dir: Path, aws_env: str, tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        publish(random_model_dir, "s3://no-such-bucket/x", endpoint_url=aws_env, manifest_path=tmp_path / "m")


def test_s3_without_credentials_is_a_config_error(
    random_model_dir: Path, aws_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ConfigError, match="no AWS credentials"):
        publish(random_model_dir, "s3://models/x", endpoint_url=aws_env, manifest_path=tmp_path / "m")


@pytest.mark.parametrize(
    ("argv_extra", "message"),
    [
        (["--store", "gs://bucket/x"], "only s3://"),
        (["--store", "s3:///x"], "no bucket"),
        (["--model-name", "Inventory_Counter"], "--model-name"),
        (["--version", "../evil"], "--version"),
    ],
)
def test_cli_rejects_bad_settings(
    random_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv_extra, message
):
    argv = ["--model", str(random_model_dir), "--store", str(tmp_path / "s"), *argv_extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "s").exists()


def test_cli_incomplete_model_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / MODEL_JSON).write_text(
        json.dumps({"classes": [1, 2], "head": "classification", "preprocess": {"image_size": 32}})
    )
    assert main(["--model", str(tmp_path / "m"), "--store", str(tmp_path / "s")]) == 2
    assert "model.onnx is missing" in capsys.readouterr().err


def test_cli_prints_a_summary(random_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["--model", str(random_model_dir), "--store", str(tmp_path / "s"), "--version", "1.0"]) == 0
    out = capsys.readouterr().out
    assert "storageUri" in out and str(tmp_path / "s" / "inventory-counter" / "1.0") in out


def test_manifest_has_the_shape_of_the_k8s_base(random_model_dir: Path, tmp_path: Path):
    """Same spec as k8s/base/inferenceservice.yaml except the image and the model version's URI."""
    base_path = Path(__file__).resolve().parents[1] / "k8s" / "base" / "inferenceservice.yaml"
    result = publish(random_model_dir, str(tmp_path / "store"), version="v3", image="registry/serving:abc")
    rendered = yaml.safe_load(result.manifest_path.read_text())
    base = yaml.safe_load(base_path.read_text())
    container = rendered["spec"]["predictor"]["containers"][0]
    assert container["image"] == "registry/serving:abc"
    assert container["env"][0] == {"name": "STORAGE_URI", "value": result.uri}, "STORAGE_URI stays first"
    assert rendered["spec"]["predictor"]["serviceAccountName"] == "inventory-counter"
    base["spec"]["predictor"]["containers"][0]["image"] = container["image"]
    base["spec"]["predictor"]["containers"][0]["env"][0]["value"] = result.uri
    assert rendered["spec"] == base["spec"], "k8s/base/inferenceservice.yaml changed: update the template"
    assert rendered["metadata"]["annotations"] == base["metadata"]["annotations"]
    assert rendered["metadata"]["labels"]["app.kubernetes.io/version"] == "v3"


def test_shipped_template_is_the_k8s_base() -> None:
    """The components image renders from its copy of k8s/base/inferenceservice.yaml: both stay identical."""
    from components.publish import INFERENCE_SERVICE_TEMPLATE

    base_path = Path(__file__).resolve().parents[1] / "k8s" / "base" / "inferenceservice.yaml"
    assert INFERENCE_SERVICE_TEMPLATE.read_bytes() == base_path.read_bytes(), (
        f"edit k8s/base/inferenceservice.yaml, then copy it to {INFERENCE_SERVICE_TEMPLATE}"
    )


def test_manifest_names_the_version_its_namespace_and_account() -> None:
    from components.publish import render_inference_service

    text = render_inference_service(
        name="counter-b", storage_uri="s3://m/counter-b/1.0", version="1.0", image="r/s:1", namespace="ns"
    )
    isvc = yaml.safe_load(text)
    assert isvc["metadata"]["name"] == "counter-b" and isvc["metadata"]["namespace"] == "ns"
    assert isvc["metadata"]["labels"]["app.kubernetes.io/version"] == "1.0"
    assert isvc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "inventory-monitor"
    assert "serviceAccountName" not in isvc["spec"]["predictor"]
    container = isvc["spec"]["predictor"]["containers"][0]
    assert "--model_name=counter-b" in container["args"] and container["image"] == "r/s:1"
    assert container["env"][0] == {"name": "STORAGE_URI", "value": "s3://m/counter-b/1.0"}


def test_local_store_is_readable_by_other_users(random_model_dir: Path, tmp_path: Path):
    """A containerized server (another uid) reads the store: nothing may stay private like mkstemp's 0600."""
    import shutil

    model = Path(shutil.copytree(random_model_dir, tmp_path / "model"))
    (model / "metrics.json").write_text("{}")
    (model / "metrics.json").chmod(0o600)  # a private file must still publish readable
    result = publish(model, str(tmp_path / "store"), version="v1")
    assert "metrics.json" in result.files
    paths = [Path(result.uri), *Path(result.uri).iterdir(), Path(result.index_uri), result.manifest_path]
    for path in paths:
        assert path.stat().st_mode & 0o004, f"{path} is not world-readable"
