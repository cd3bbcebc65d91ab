"""Publish an exported model to a model store in the layout KServe's storage initializer expects.

``<store>/<model-name>/<version>/`` receives ``model.json``, ``model.onnx`` (plus the int8 variant, the
model card and ``metrics.json`` when present). The storage initializer downloads that prefix into
``/mnt/models`` and the model server reads it with ``--model_dir=/mnt/models``. Next to the versions,
``<store>/<model-name>/versions.json`` lists every published version (newest last) so a deploy script
or a person can find the latest one without listing the bucket.

A store is ``s3://bucket/prefix`` (any S3 API: AWS, MinIO, moto; ``--endpoint-url`` for non-AWS) or
a local directory. Versions are immutable: publishing an existing version fails unless ``force``.
Local publishes are atomic (staged in a temp dir, then renamed); S3 publishes upload ``model.json``
last (and a forced replacement deletes the old one first), so a reader that finds ``model.json``
finds a complete model.

Also renders ``inferenceservice.yaml`` (``serving.kserve.io/v1beta1``) pointing at the version.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from components import __version__
from components.common import (
    ConfigError,
    atomic_write_dir,
    atomic_write_json,
    atomic_write_text,
    format_table,
    read_json,
    run_cli,
)
from components.modelspec import MODEL_JSON, load_model_spec
from components.s3 import download_prefix, make_s3_client, read_json_object, signed_client, store_error

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "inventory-counter"
DEFAULT_SERVING_IMAGE = f"inventory-monitor/serving:{__version__}"
#: The predictor's service account in k8s/base: its Secret holds the storage initializer's S3 keys.
DEFAULT_SERVICE_ACCOUNT = "inventory-counter"
MANIFEST_FILE = "inferenceservice.yaml"
#: The InferenceService every version is rendered from: a copy of ``k8s/base/inferenceservice.yaml``
#: shipped as package data (the components image has no ``k8s/``); tests/test_publish.py keeps them identical.
INFERENCE_SERVICE_TEMPLATE = Path(__file__).resolve().parent / "resources" / MANIFEST_FILE
VERSIONS_FILE = "versions.json"
#: Lock file beside the versions of a local store (see :func:`_store_lock`).
LOCK_FILE = ".publish.lock"
#: Read-merge-write rounds of an S3 versions.json before giving up (each loses to another publish).
INDEX_ATTEMPTS = 10
#: Files copied besides the ONNX model(s) when the model directory has them (small, useful to humans).
EXTRA_FILES: tuple[str, ...] = ("MODEL_CARD.md", "metrics.json")
# The model name becomes the InferenceService name: a DNS-1035 label.
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
# A version is a path segment and a label value: conservative characters, at most 63.
_VERSION_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")


@dataclass(frozen=True)
class PublishResult:
    """Where the model went: ``uri`` is the storageUri for KServe (``s3://…`` or a local path)."""

    uri: str
    version: str
    manifest_path: Path
    model_name: str = DEFAULT_MODEL_NAME
    files: tuple[str, ...] = ()
    index_uri: str = ""
    sha256: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Store:
    kind: str  # "s3" | "local"
    bucket: str = ""
    prefix: str = ""
    root: Path | None = None


def parse_store(store: str) -> _Store:
    """``s3://bucket[/prefix]`` or a local directory (``file://`` accepted); anything else is an error."""
    if not store or not store.strip():
        raise ConfigError("--store is empty: pass s3://bucket/prefix or a local directory")
    if store.startswith("s3://"):
        rest = store[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ConfigError(f"--store {store!r} has no bucket: use s3://bucket/prefix")
        return _Store(kind="s3", bucket=bucket, prefix=prefix.strip("/"))
    if "://" in store and not store.startswith("file://"):
        raise ConfigError(f"--store {store!r}: only s3://bucket/prefix or a local directory are supported")
    path = store[len("file://") :] if store.startswith("file://") else store
    return _Store(kind="local", root=Path(path).expanduser().resolve())


def validate_model_name(name: str) -> str:
    """The model name is also the InferenceService name, so it must be a DNS-1035 label."""
    if not _NAME_RE.match(name or ""):
        raise ConfigError(
            f"--model-name {name!r} is not valid: use lowercase letters, digits and '-', starting with a "
            "letter, at most 63 characters (it becomes the InferenceService name)"
        )
    return name


def validate_version(version: str) -> str:
    """A version is a path segment and a Kubernetes label value."""
    if not _VERSION_RE.match(version or ""):
        raise ConfigError(
            f"--version {version!r} is not valid: use letters, digits, '.', '_' or '-', at most 63 "
            "characters, starting and ending with a letter or digit"
        )
    return version


def model_files(model_dir: Path) -> list[str]:
    """The files of ``model_dir`` that make up the served model (``model.json`` last)."""
    spec = load_model_spec(model_dir)
    files = [spec.onnx_file]
    if spec.onnx_int8_file:
        if not (model_dir / spec.onnx_int8_file).is_file():
            raise ConfigError(
                f"model.json names {spec.onnx_int8_file} but {model_dir / spec.onnx_int8_file} is missing"
            )
        files.append(spec.onnx_int8_file)
    files += [f for f in EXTRA_FILES if (model_dir / f).is_file()]
    files.append(MODEL_JSON)
    return files


def content_hash(model_dir: Path, files: Sequence[str]) -> str:
    """SHA-256 over the model's files (names and bytes), so equal models get equal hashes."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0")
        with open(model_dir / name, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def default_version(digest: str, now: datetime | None = None) -> str:
    """``YYYYmmddTHHMMSSZ-<hash8>``: sorts by time, and the hash says which bytes it holds."""
    now = now or datetime.now(UTC)
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{digest[:8]}"


def render_inference_service(
    *,
    name: str,
    storage_uri: str,
    version: str,
    image: str = DEFAULT_SERVING_IMAGE,
    namespace: str | None = None,
    service_account: str | None = None,
) -> str:
    """The InferenceService for a published version: ``k8s/base/inferenceservice.yaml`` (shipped as
    :data:`INFERENCE_SERVICE_TEMPLATE`) with this version's name, namespace, image and model location.

    A custom predictor container: KServe reads the model location from its ``STORAGE_URI`` env var, the
    storage initializer downloads it into ``/mnt/models`` (with the S3 credentials of the predictor's
    service account) and the server loads it from there.
    """
    import yaml

    doc = yaml.safe_load(INFERENCE_SERVICE_TEMPLATE.read_text(encoding="utf-8"))
    template_meta = doc["metadata"]
    labels = {
        **template_meta["labels"],
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/part-of": "inventory-monitor",
        "app.kubernetes.io/version": version,
    }
    doc["metadata"] = {
        "name": name,
        **({"namespace": namespace} if namespace else {}),
        "labels": labels,
        "annotations": template_meta["annotations"],
    }
    predictor = doc["spec"]["predictor"]
    if service_account:
        predictor["serviceAccountName"] = service_account
    else:
        predictor.pop("serviceAccountName", None)
    container = predictor["containers"][0]
    container["image"] = image
    container["args"] = [
        f"--model_name={name}" if a.startswith("--model_name=") else a for a in container["args"]
    ]
    storage = container["env"][0]
    if storage["name"] != "STORAGE_URI":
        raise ValueError(f"{INFERENCE_SERVICE_TEMPLATE}: STORAGE_URI must be the container's first env var")
    storage["value"] = storage_uri
    header = f"# {name} version {version}, rendered by components.publish; apply with kubectl apply -f.\n"
    return header + yaml.safe_dump(doc, sort_keys=False, width=1000)


def _spec_with_version(model_dir: Path, version: str, name: str) -> str:
    """The published ``model.json``: the source spec with the published name and version filled in."""
    import json

    data = read_json(model_dir / MODEL_JSON)
    data["version"] = version
    data["name"] = name
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _index_entry(version: str, uri: str, digest: str, metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": version,
        "uri": uri,
        "sha256": digest,
        "published_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "metrics": flatten_metrics(metrics),
    }


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"val": {"accuracy": 0.4}}`` -> ``{"val_accuracy": 0.4}``: scalars only, for the version index;
    95 % intervals (``{"test": {"intervals": {"accuracy": [lo, hi]}}}``) as ``test_accuracy_low`` and
    ``test_accuracy_high``."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if key == "intervals" and isinstance(value, dict):
            for figure, bounds in value.items():
                if isinstance(bounds, list | tuple) and len(bounds) == 2:
                    flat[f"{prefix}{figure}_low"], flat[f"{prefix}{figure}_high"] = bounds
        elif isinstance(value, dict):
            flat.update(flatten_metrics(value, f"{name}_"))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
    return flat


def _merge_index(index: dict[str, Any] | None, name: str, entry: dict[str, Any]) -> dict[str, Any]:
    index = index or {"model_name": name, "versions": []}
    versions = [v for v in index.get("versions", []) if v.get("version") != entry["version"]]
    versions.append(entry)
    return {"model_name": name, "latest": entry["version"], "versions": versions}


def _publish_local(
    model_dir: Path, root: Path, name: str, version: str, files: list[str], force: bool, model_json: str
) -> Path:
    parent = root / name
    dest = parent / version
    if dest.exists() and not force:
        raise ConfigError(f"{dest} already exists: versions are immutable; pick another --version or --force")

    def fill(stage: Path) -> None:
        for f in files:
            if f == MODEL_JSON:
                (stage / f).write_text(model_json, encoding="utf-8")
            else:
                shutil.copyfile(model_dir / f, stage / f)

    return atomic_write_dir(dest, fill)


def _publish_s3(
    model_dir: Path,
    store: _Store,
    store_text: str,
    name: str,
    version: str,
    files: list[str],
    force: bool,
    model_json: str,
    endpoint_url: str | None,
) -> tuple[str, Any]:
    base = "/".join(p for p in (store.prefix, name, version) if p)
    try:
        s3 = signed_client(endpoint_url, store_text)
        existing = s3.list_objects_v2(Bucket=store.bucket, Prefix=base + "/")
        old_keys = [o["Key"] for o in existing.get("Contents", [])]
        if old_keys and not force:
            raise ConfigError(
                f"s3://{store.bucket}/{base}/ already exists: versions are immutable; pick another "
                "--version or --force"
            )
        if old_keys:
            # Replacing a version: take its model.json away first, so while the new files upload a
            # reader finds an incomplete version (and fails clearly) rather than the old model.json
            # beside the new weights.
            s3.delete_object(Bucket=store.bucket, Key=f"{base}/{MODEL_JSON}")
        new_keys = set()
        for f in files:  # model.json is last in ``files``: it marks the version complete
            key = f"{base}/{f}"
            new_keys.add(key)
            if f == MODEL_JSON:
                s3.put_object(Bucket=store.bucket, Key=key, Body=model_json.encode("utf-8"))
            else:
                s3.upload_file(str(model_dir / f), store.bucket, key)
        stale = [{"Key": k} for k in old_keys if k not in new_keys]
        if stale:
            s3.delete_objects(Bucket=store.bucket, Delete={"Objects": stale})
    except ConfigError:
        raise
    except Exception as e:
        raise store_error(e, store_text) from e
    return f"s3://{store.bucket}/{base}", s3


@contextmanager
def _store_lock(parent: Path) -> Iterator[None]:
    """Serialize publishes into one local model folder: the version check, the copy, versions.json.

    Pipeline runs may publish at the same time; without the lock two read-merge-write cycles of
    versions.json interleave and one version drops out of the index. ``flock`` is released by the
    kernel when a holder dies, so a killed publish never leaves the store locked.
    """
    parent.mkdir(parents=True, exist_ok=True)
    with open(parent / LOCK_FILE, "a+b") as fh:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock between processes
            fcntl = None
        if fcntl is not None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _update_s3_index(s3: Any, bucket: str, key: str, name: str, entry: dict[str, Any]) -> None:
    """Read-merge-write versions.json as an S3 conditional write, again whenever another publish won.

    The write carries ``If-Match: <ETag read>`` (or ``If-None-Match: *`` for a new index), so a
    concurrent publish that wrote in between makes it fail with 412 instead of being overwritten.
    A store without conditional writes (``NotImplemented``) gets a plain write and a warning.
    """
    import json

    from botocore.exceptions import ClientError

    for attempt in range(INDEX_ATTEMPTS):
        index, etag = read_json_object(s3, bucket, key)
        merged = _merge_index(index, name, entry)
        body = (json.dumps(merged, indent=2, sort_keys=True) + "\n").encode("utf-8")
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            s3.put_object(Bucket=bucket, Key=key, Body=body, **condition)
            return
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                time.sleep(random.uniform(0.02, 0.1) * (attempt + 1))  # another publish won: merge again
                continue
            if code == "NotImplemented":
                log.warning("s3://%s has no conditional writes; concurrent publishes may race", bucket)
                s3.put_object(Bucket=bucket, Key=key, Body=body)
                return
            raise
    raise ConfigError(
        f"s3://{bucket}/{key} changed {INDEX_ATTEMPTS} times while this publish merged into it; "
        "the model files are in place, publish again with --force to record the version"
    )


def latest_published(store: str, model_name: str, endpoint_url: str | None = None) -> dict[str, Any] | None:
    """The ``versions.json`` entry of the latest published version of ``model_name`` in ``store``
    (version, uri, sha256, metrics); None when nothing is published under that name yet."""
    parsed = parse_store(store)
    if parsed.kind == "local":
        assert parsed.root is not None
        path = parsed.root / model_name / VERSIONS_FILE
        if not path.is_file():
            return None
        index = read_json(path)
        where = str(path)
    else:
        key = "/".join(p for p in (parsed.prefix, model_name, VERSIONS_FILE) if p)
        where = f"s3://{parsed.bucket}/{key}"
        try:
            s3, _ = make_s3_client(endpoint_url=endpoint_url, workers=4)
            index, etag = read_json_object(s3, parsed.bucket, key)
        except Exception as e:
            raise store_error(e, store) from e
        if index is None:
            if etag is not None:
                raise ConfigError(f"{where} is not valid JSON: mend it or publish with a fresh --model-name")
            return None
    latest = index.get("latest")
    for entry in index.get("versions", []):
        if entry.get("version") == latest and entry.get("uri"):
            return entry
    raise ConfigError(f"{where} names no usable latest version ({latest!r}): mend it or publish again")


def fetch_published(uri: str, dest: Path, endpoint_url: str | None = None) -> Path:
    """A local folder holding the published model at ``uri``: the folder itself for a local store,
    else ``dest`` with the version's objects downloaded into it (what KServe's storage initializer
    does with ``/mnt/models``). Reading needs no credentials on a public bucket."""
    if not uri.startswith("s3://"):
        folder = Path(uri)
        if not (folder / MODEL_JSON).is_file():
            raise ConfigError(f"the published model {uri} is missing its {MODEL_JSON}: publish it again")
        return folder
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        s3, _ = make_s3_client(endpoint_url=endpoint_url, workers=4)
        download_prefix(s3, bucket, prefix, dest)
    except Exception as e:
        raise store_error(e, uri) from e
    if not (dest / MODEL_JSON).is_file():
        raise ConfigError(f"the published model {uri} has no {MODEL_JSON}: publish it again")
    return dest


def publish(
    model_dir: str | os.PathLike[str],
    store: str,
    *,
    model_name: str = DEFAULT_MODEL_NAME,
    version: str | None = None,
    endpoint_url: str | None = None,
    force: bool = False,
    manifest_path: str | os.PathLike[str] | None = None,
    image: str = DEFAULT_SERVING_IMAGE,
    namespace: str | None = None,
    service_account: str | None = DEFAULT_SERVICE_ACCOUNT,
) -> PublishResult:
    """Copy the exported model in ``model_dir`` to ``<store>/<model_name>/<version>/``.

    Returns where it went and the rendered InferenceService manifest (``manifest_path``, default
    ``<store>/<model_name>/<version>.inferenceservice.yaml`` for a local store, else
    ``./<model_name>-<version>.inferenceservice.yaml``).
    """
    model_dir = Path(model_dir)
    validate_model_name(model_name)
    parsed = parse_store(store)
    files = model_files(model_dir)  # validates model.json + ONNX presence
    spec = load_model_spec(model_dir)
    digest = content_hash(model_dir, files)
    version = validate_version(version) if version else default_version(digest)
    model_json = _spec_with_version(model_dir, version, model_name)

    if parsed.kind == "local":
        assert parsed.root is not None
        with _store_lock(parsed.root / model_name):
            dest = _publish_local(model_dir, parsed.root, model_name, version, files, force, model_json)
            uri = str(dest)
            index_path = parsed.root / model_name / VERSIONS_FILE
            index = read_json(index_path) if index_path.is_file() else None
            entry = _index_entry(version, uri, digest, spec.metrics)
            atomic_write_json(index_path, _merge_index(index, model_name, entry))
        index_uri = str(index_path)
        default_manifest = parsed.root / model_name / f"{version}.{MANIFEST_FILE}"
    else:
        uri, s3 = _publish_s3(
            model_dir, parsed, store, model_name, version, files, force, model_json, endpoint_url
        )
        key = "/".join(p for p in (parsed.prefix, model_name, VERSIONS_FILE) if p)
        try:
            entry = _index_entry(version, uri, digest, spec.metrics)
            _update_s3_index(s3, parsed.bucket, key, model_name, entry)
        except ConfigError:
            raise
        except Exception as e:
            raise store_error(e, store) from e
        index_uri = f"s3://{parsed.bucket}/{key}"
        default_manifest = Path.cwd() / f"{model_name}-{version}.{MANIFEST_FILE}"

    manifest = Path(manifest_path) if manifest_path else default_manifest
    atomic_write_text(
        manifest,
        render_inference_service(
            name=model_name,
            storage_uri=uri,
            version=version,
            image=image,
            namespace=namespace,
            service_account=service_account,
        ),
    )
    log.info("published %s version %s to %s", model_name, version, uri)
    return PublishResult(
        uri=uri,
        version=version,
        manifest_path=manifest,
        model_name=model_name,
        files=tuple(files),
        index_uri=index_uri,
        sha256=digest,
        metrics=dict(spec.metrics),
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m components.publish",
        description="Copy an exported model to a model store (s3://… or a directory) and render its "
        "KServe InferenceService manifest.",
    )
    p.add_argument("--model", required=True, type=Path, help="exported model dir (model.json + model.onnx)")
    p.add_argument("--store", required=True, help="s3://bucket/prefix or a local directory")
    p.add_argument("--endpoint-url", default=None, help="S3 API endpoint for MinIO/moto (default: AWS)")
    p.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help="model and InferenceService name")
    p.add_argument("--version", default=None, help="version (default: UTC timestamp + content hash)")
    p.add_argument("--force", action="store_true", help="replace an existing version")
    p.add_argument("--manifest", type=Path, default=None, help="where to write inferenceservice.yaml")
    p.add_argument("--image", default=DEFAULT_SERVING_IMAGE, help="serving image in the manifest")
    p.add_argument("--namespace", default=None, help="namespace in the manifest (default: none)")
    p.add_argument(
        "--service-account",
        default=DEFAULT_SERVICE_ACCOUNT,
        help="predictor service account whose Secret has the S3 keys ('' for none)",
    )
    return p


def _run(args: argparse.Namespace) -> int:
    result = publish(
        args.model,
        args.store,
        model_name=args.model_name,
        version=args.version,
        endpoint_url=args.endpoint_url,
        force=args.force,
        manifest_path=args.manifest,
        image=args.image,
        namespace=args.namespace,
        service_account=args.service_account or None,
    )
    rows = [
        ("model", result.model_name),
        ("version", result.version),
        ("storageUri", result.uri),
        ("files", ", ".join(result.files)),
        ("versions index", result.index_uri),
        ("manifest", result.manifest_path),
    ]
    print(format_table(rows, headers=("published", "value")))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
