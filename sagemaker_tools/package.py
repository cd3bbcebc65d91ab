"""The model archive SageMaker extracts into ``/opt/ml/model``: a deterministic ``model.tar.gz``."""

from __future__ import annotations

import gzip
import hashlib
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from components.modelspec import MODEL_JSON, ModelSpec, load_model_spec


@dataclass(frozen=True)
class PackagedModel:
    """A ``model.tar.gz`` on local disk and what identifies it."""

    path: Path
    sha256: str
    members: tuple[str, ...]
    spec: ModelSpec

    @property
    def version(self) -> str:
        """``model.json`` version plus a content hash: the same files always map to the same S3 key."""
        return f"{self.spec.version}-{self.sha256[:12]}"


def model_files(model_dir: Path, spec: ModelSpec) -> list[str]:
    """What the serving container needs at ``/opt/ml/model`` (no ``model.pt``: serving is torch-free)."""
    names = {MODEL_JSON, spec.onnx_file}
    if spec.onnx_int8_file and (model_dir / spec.onnx_int8_file).is_file():
        names.add(spec.onnx_int8_file)
    return sorted(names)


def package_model(model_dir: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> PackagedModel:
    """Write a deterministic ``model.tar.gz`` (sorted, mtime 0, no owners) so equal models hash equal."""
    model_dir = Path(model_dir)
    spec = load_model_spec(model_dir)
    members = model_files(model_dir, spec)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(out_path, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for name in members:
            src = model_dir / name
            info = tarfile.TarInfo(name)
            info.size = src.stat().st_size
            info.mode = 0o644
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(src, "rb") as fh:
                tar.addfile(info, fh)
    digest = hashlib.sha256()
    with open(out_path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return PackagedModel(path=out_path, sha256=digest.hexdigest(), members=tuple(members), spec=spec)
