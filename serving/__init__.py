"""Model serving for inventory-monitor: KServe/SageMaker server, naive baseline and load-test tool.

``python -m serving`` starts the server (see :mod:`serving.__main__`). Importing this package is
cheap and imports neither KServe nor torch; each submodule imports what it needs.
"""
