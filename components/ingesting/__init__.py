"""Fetching labelled bin images into a verified, resumable dataset directory, one job per module.

:mod:`.config` (layout, file names), :mod:`.sources` (local directory or S3), :mod:`.select` (which
images), :mod:`.fetch` (one object, verified), :mod:`.journal` (resume), :mod:`.run` (the run, shards,
manifest and report), :mod:`.cli`. ``python -m components.ingest`` is the command line.
"""
