"""SageMaker tooling run from a workstation or CI (never inside an image): deploy the serving image to an
autoscaled endpoint (``python -m sagemaker_tools.endpoint``) and train in the components image as a
SageMaker training job (``python -m sagemaker_tools.train``)."""
