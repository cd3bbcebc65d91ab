"""The README is the front door and the reference lives in docs/: its size, its links and its flag tables.

- README.md stays short (at most 250 lines).
- Every relative link in README.md, docs/*.md and k8s/README.md resolves to a file (or folder) of the
  repository, and a ``#anchor`` to a heading of the target (GitHub's slugs).
- Every flag a doc's flag table (or flag list) names is in the ``--help`` of the CLI that doc names
  for that section, so a renamed or removed flag cannot leave the docs behind.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
LINKED_DOCS = [README, *DOCS, REPO / "k8s" / "README.md"]

LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
FLAG = re.compile(r"(?<![\w-])--[A-Za-z0-9][\w-]*")
COMMAND = re.compile(r"python -m ([A-Za-z_][\w.]*)((?: [a-z][\w-]*)?)")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    out, fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if not fence:
            out.append(line)
    return out


def _code_lines(text: str) -> list[str]:
    out, fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if fence:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _prose_lines(path.read_text()):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


def relative_links(path: Path) -> list[str]:
    links = []
    for line in _prose_lines(path.read_text()):
        for target in LINK.findall(line):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            links.append(target)
    return links


def sections(path: Path) -> dict[str, str]:
    """Each heading's text (without the '#'s) -> the section's text up to the next heading of any level."""
    out: dict[str, list[str]] = {}
    current = None
    fence = False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        m = None if fence else HEADING.match(line)
        if m:
            current = m.group(2)
            out[current] = []
        elif current is not None:
            out[current].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def test_readme_is_at_most_250_lines():
    n = len(README.read_text().splitlines())
    assert n <= 250, f"README.md has {n} lines: move reference material into docs/"


def test_readme_links_every_doc():
    links = {t.split("#")[0] for t in relative_links(README)}
    missing = [d.name for d in DOCS if f"docs/{d.name}" not in links]
    assert not missing, f"README.md does not link {missing}"


@pytest.mark.parametrize("doc", LINKED_DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc):
    problems = []
    for target in relative_links(doc):
        file_part, _, anchor = target.partition("#")
        dest = doc if not file_part else (doc.parent / file_part).resolve()
        if not dest.exists():
            problems.append(f"{target}: no such file")
            continue
        if REPO not in dest.parents and dest != REPO:
            problems.append(f"{target}: outside the repository")
            continue
        if anchor:
            if dest.suffix != ".md":
                problems.append(f"{target}: an anchor into a file that is not Markdown")
            elif anchor not in anchors(dest):
                problems.append(f"{target}: no heading '#{anchor}' in {dest.relative_to(REPO)}")
    assert not problems, f"{doc.relative_to(REPO)}: " + "; ".join(problems)


def test_anchor_slugs_follow_github():
    assert slug("Serving on Kubernetes (KServe)") == "serving-on-kubernetes-kserve"
    assert slug("Getting the data: `components.ingest`") == "getting-the-data-componentsingest"
    assert slug("Publishing only a better model (`components.champion`)") == (
        "publishing-only-a-better-model-componentschampion"
    )


# --- flag tables against --help ------------------------------------------------------------------


def _table_column(section: str, header: str) -> list[str]:
    """The cells of the column named ``header`` in the first Markdown table of a section."""
    rows = [ln for ln in _prose_lines(section) if ln.startswith("|")]
    assert len(rows) > 2, "no table in the section"
    cols = [c.strip() for c in rows[0].strip("|").split("|")]
    i = cols.index(header)
    cells = []
    for row in rows[2:]:
        parts = re.split(r"(?<!\\)\|", row.strip().strip("|"))
        cells.append(parts[i].strip() if i < len(parts) else "")
    return cells


def _cli_of(section: str) -> tuple[str, list[str]]:
    """The first ``python -m MODULE [subcommand]`` a section's code blocks (else its prose) name."""
    for text in ("\n".join(_code_lines(section)), section):
        m = COMMAND.search(text)
        if m:
            sub = m.group(2).split()
            return m.group(1), sub
    raise AssertionError("the section names no `python -m` command")


@cache
def help_flags(module: str, sub: tuple[str, ...]) -> frozenset[str]:
    if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
        pytest.skip(f"the docs name `python -m {module}`, which does not exist (moved?): fix the doc")
    proc = subprocess.run(
        [sys.executable, "-m", module, *sub, "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"python -m {module} {' '.join(sub)} --help failed:\n{proc.stderr[-2000:]}"
    return frozenset(FLAG.findall(proc.stdout))


def _flags_in_table(doc: str, heading: str, column: str, command_heading: str | None = None):
    secs = sections(REPO / "docs" / doc)
    flags = {f for cell in _table_column(secs[heading], column) for f in FLAG.findall(cell)}
    return flags, _cli_of(secs[command_heading or heading])


def _flags_in_prose(doc: str, headings: list[str], command_heading: str, start: str | None = None):
    secs = sections(REPO / "docs" / doc)
    flags = set()
    for h in headings:
        text = "\n".join(_prose_lines(secs[h]))
        if start is not None:
            text = text[text.index(start) :].split("\n\n")[0]
        flags |= set(FLAG.findall(text))
    return flags, _cli_of(secs[command_heading])


#: (doc, what lists the flags) -> how to read the flags and the CLI that doc names for them
FLAG_LISTS = {
    "data.md: ingest flag table": lambda: _flags_in_table(
        "data.md", "Getting the data: `components.ingest`", "flag"
    ),
    "data.md: split flag table": lambda: _flags_in_table("data.md", "Splitting: `components.split`", "flag"),
    "tuning.md: search space table": lambda: _flags_in_table("tuning.md", "Hyperparameter search", "flag"),
    "sagemaker.md: configuration table": lambda: _flags_in_table("sagemaker.md", "Configuration", "flag"),
    "pipeline.md: flags of pipeline.run_local": lambda: _flags_in_prose(
        "pipeline.md", ["Run it locally"], "Run it locally", start="Flags of `python -m"
    ),
    "serving.md: server flags": lambda: _flags_in_prose(
        "serving.md", ["Bad input", "Overload and hostile clients", "Speed"], "Serving the model"
    ),
}


@pytest.mark.parametrize("name", sorted(FLAG_LISTS))
def test_documented_flags_are_in_help(name):
    flags, (module, sub) = FLAG_LISTS[name]()
    assert len(flags) >= 4, f"{name}: found only {sorted(flags)}: the table or list moved?"
    known = help_flags(module, tuple(sub))
    missing = sorted(flags - known)
    assert not missing, f"{name}: {missing} not in `python -m {module} {' '.join(sub)} --help`"
