"""Hyperparameter search with Optuna, one job per module.

:mod:`.config` (search space, worker settings, file names), :mod:`.storage` (the study's database),
:mod:`.params` (trials as TrainConfigs), :mod:`.search` (the shared budget, :func:`~.search.tune`),
:mod:`.reports` (best_params.json, trials.csv, plots), :mod:`.cli`. ``python -m components.tune`` is the
command line.
"""
