"""The generated tables in ``docs/``: ``python -m pipeline.docgen`` rewrites them (``make docs``),
``--check`` fails when one is stale (the tests run it), so no table can drift from the declarations.

A generated block sits between ``<!-- generated: NAME -->`` and ``<!-- end generated -->``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _training_settings() -> str:
    from components.settings import settings_table
    from components.training.config import TrainConfig

    return settings_table(TrainConfig)


def _pipeline_parameters() -> str:
    from pipeline.profiles import parameter_table

    return parameter_table()


#: block name -> (the doc that holds it, what writes it)
BLOCKS: dict[str, tuple[str, Callable[[], str]]] = {
    "training-settings": ("training.md", _training_settings),
    "pipeline-parameters": ("pipeline.md", _pipeline_parameters),
}


def _block(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- generated: {re.escape(name)} -->\n)(.*?)(<!-- end generated -->)", re.S)


def render(text: str, name: str, table: str) -> str:
    """``text`` with block ``name`` holding ``table``; a doc without the block is an error."""
    pattern = _block(name)
    if not pattern.search(text):
        raise ValueError(f"no '<!-- generated: {name} -->' block: add one where the table belongs")
    return pattern.sub(lambda m: f"{m[1]}{table}\n{m[3]}", text, count=1)


def stale(docs: Path = DOCS) -> list[str]:
    """The blocks whose text differs from what their declarations give now."""
    out = []
    for name, (doc, make) in BLOCKS.items():
        text = (docs / doc).read_text(encoding="utf-8")
        if render(text, name, make()) != text:
            out.append(f"{doc}: {name}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.docgen", description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="only report stale blocks (exit 1 if any)")
    args = p.parse_args(argv)
    if args.check:
        found = stale()
        for item in found:
            print(f"stale: {item} (run make docs)", file=sys.stderr)
        return 1 if found else 0
    for name, (doc, make) in BLOCKS.items():
        path = DOCS / doc
        text = path.read_text(encoding="utf-8")
        new = render(text, name, make())
        if new != text:
            path.write_text(new, encoding="utf-8")
            print(f"rewrote {doc}: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
