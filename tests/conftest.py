"""Shared pytest configuration; fixtures live in tests/fixtures/ (one module per real service)."""

pytest_plugins = [
    "tests.fixtures.data",
    "tests.fixtures.aws",
    "tests.fixtures.s3data",
    "tests.fixtures.models",
    "tests.fixtures.postgres",
    "tests.fixtures.docker",
]
