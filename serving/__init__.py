"""Model serving for inventory-monitor: the KServe/SageMaker server the serving image runs.

``python -m serving`` starts the server (see :mod:`serving.__main__`). Importing this package is
cheap and imports neither KServe nor torch; each submodule imports what it needs.
"""
