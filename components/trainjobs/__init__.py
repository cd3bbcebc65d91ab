"""The final fit as a Kubeflow Trainer TrainJob, one job per module: :mod:`.spec` (checks, render),
:mod:`.api` (create and wait), :mod:`.staging` (the shared volume). :mod:`components.trainjob` drives them."""
