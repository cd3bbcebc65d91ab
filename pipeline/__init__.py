"""The Kubeflow Pipelines v2 pipeline: components (pipeline.components), the DAG (pipeline.pipeline),
presets (pipeline.profiles) and the commands behind ``make run`` / ``make compile`` / ``make submit``."""
