"""The project's own modules import each other without cycles, and the training package stays in
small modules. Read statically (ast), so nothing is imported and no torch is needed."""

from __future__ import annotations

import graphlib
from pathlib import Path

from tests.imports import imported_names

REPO = Path(__file__).resolve().parents[1]
#: the project's top-level packages (``bench`` holds scripts, named here as ``bench.<script>``)
PACKAGES = ("components", "pipeline", "sagemaker_tools", "serving", "bench")
#: the most lines a module of ``components/training`` (and the ``components/train.py`` entry point) may
#: have. Only the training package is held to it for now: ``components/tune.py`` and
#: ``components/ingest.py`` are over a thousand lines each and have not been split yet.
MAX_TRAINING_MODULE_LINES = 450


def project_modules() -> dict[str, Path]:
    """``dotted.name -> file`` for every Python module of :data:`PACKAGES` (a package is its ``__init__``)."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in it (module level, functions, ``TYPE_CHECKING``),
    with each imported module's parent packages, whose ``__init__`` runs first."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    named = imported_names(path.read_text(encoding="utf-8"), package)
    out: set[str] = set()
    for target in named:
        parts = target.split(".")
        out |= {m for n in range(1, len(parts) + 1) if (m := ".".join(parts[:n])) in modules}
    # A KFP component's body imports its own module's helpers when it runs alone in the image: not a
    # cycle between modules.
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_the_graph_sees_the_training_package() -> None:
    graph = import_graph()
    assert "components.training.stages" in graph["components.train"] | graph["components.training.cli"]
    assert {"components.training.fit", "components.training.contrastive"} <= graph[
        "components.training.stages"
    ]
    assert "components.training.config" in graph["pipeline.components"]  # function-level imports count


def test_no_import_cycles() -> None:
    graph = import_graph()
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        cycle = e.args[1]
        raise AssertionError(f"import cycle: {' -> '.join(reversed(cycle))}") from None


def test_training_modules_are_small() -> None:
    files = [*sorted((REPO / "components" / "training").glob("*.py")), REPO / "components" / "train.py"]
    lines = {f.relative_to(REPO).as_posix(): len(f.read_text(encoding="utf-8").splitlines()) for f in files}
    too_long = {f: n for f, n in lines.items() if n > MAX_TRAINING_MODULE_LINES}
    assert not too_long, f"split these (at most {MAX_TRAINING_MODULE_LINES} lines): {too_long}"
