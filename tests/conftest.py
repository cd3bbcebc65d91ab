"""Shared pytest configuration; fixtures live in tests/fixtures/ (one module per real service)."""

import logging
from collections.abc import Iterator

import pytest

pytest_plugins = [
    "tests.fixtures.data",
    "tests.fixtures.aws",
    "tests.fixtures.s3data",
    "tests.fixtures.models",
    "tests.fixtures.postgres",
    "tests.fixtures.docker",
    "tests.fixtures.images",
]


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Iterator[None]:
    """CLI mains configure root logging on the test's captured stream; undo that after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
