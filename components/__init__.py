"""Pipeline steps of inventory-monitor: each runs as ``python -m components.<step>``.

Importing this package (or ``components.preprocess``) never imports torch, so the serving image can
reuse the shared preprocessing without the training stack.
"""

__version__ = "0.1.0"
