"""Static reading of a module's imports (ast: nothing is imported, no torch needed), shared by the
import-cycle check and the images' import-closure checks."""

from __future__ import annotations

import ast


def imported_names(source: str, package: str) -> set[str]:
    """Every module an ``import`` anywhere in ``source`` names (relative imports resolved against
    ``package``), plus ``module.name`` for each ``from module import name`` (it may be a submodule)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out
