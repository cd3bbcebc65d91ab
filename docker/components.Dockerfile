# Image of every Kubeflow Pipelines step (`python -m components.<step>`): torch + the project.
#
#   DOCKER_BUILDKIT=0 docker build -f docker/components.Dockerfile -t inventory-monitor/components:<git-sha> .
#
# TORCH_INDEX_URL picks the torch build. The default is PyTorch's CPU wheel index: KFP steps on a
# kind/minikube cluster or CPU node pools need no CUDA, and the image is ~1 GB instead of ~6 GB.
# For GPU node pools build with --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
# (the CUDA 13 build that constraints.txt pins on PyPI; torch==2.14.1 matches 2.14.1+cpu/+cu130), or
# with --build-arg TORCH_INDEX_URL= to take torch from PIP_INDEX_URL alone (PyPI's build is the CUDA one).
# BASE_IMAGE and EXTRA_CA_CERTS: as in serving.Dockerfile.
#
# The venv is installed once, in the stage the runtime builds on: torch's ~5 GB are one layer, never
# copied into a second one (a COPY --from of the venv doubles the disk and the build time).
ARG BASE_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

# --- dependencies: changes only with pyproject.toml / constraints.txt --------------------------------
FROM ${BASE_IMAGE} AS deps
ARG EXTRA_CA_CERTS=""
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /tmp/build
COPY pyproject.toml constraints.txt ./
# Core + `train` + `pipeline` extras (kfp is in the image, so KFP never pip-installs at step start),
# at the versions in constraints.txt; pip itself is removed afterwards (steps install nothing).
RUN export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_DEFAULT_TIMEOUT=120 \
 && python3 -m venv /opt/venv \
 && if [ -n "$EXTRA_CA_CERTS" ]; then \
      cat /etc/ssl/certs/ca-certificates.crt > /tmp/ca.pem && printf '%s\n' "$EXTRA_CA_CERTS" >> /tmp/ca.pem \
      && export PIP_CERT=/tmp/ca.pem; \
    fi \
 && python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
x = p['optional-dependencies']; print('\n'.join(p['dependencies'] + x['train'] + x['pipeline']))" \
    > requirements.txt \
 && /opt/venv/bin/pip install --index-url "$PIP_INDEX_URL" ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
      -c constraints.txt -r requirements.txt \
 && /opt/venv/bin/python -m pip uninstall --yes --quiet pip \
 && rm -rf /tmp/ca.pem /tmp/build/* \
 && groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin app

# --- source, byte-compiled: exactly the modules the steps import (tests/test_docker.py checks it) ----
FROM ${BASE_IMAGE} AS app
COPY components/ /opt/app/components/
COPY pipeline/__init__.py pipeline/steps.py /opt/app/pipeline/
RUN python3 -m compileall -q /opt/app

# --- runtime ------------------------------------------------------------------------------------------
FROM deps AS runtime
LABEL org.opencontainers.image.title="inventory-monitor components" \
      org.opencontainers.image.description="Kubeflow Pipelines steps of the inventory counter (ingest, split, tune, train, quantize, evaluate, publish)" \
      org.opencontainers.image.licenses="Apache-2.0"
# HOME, MPLCONFIGDIR and TORCH_HOME in /tmp: steps write only to /tmp and their KFP output paths.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCH_HOME=/tmp/torch
# KFP container components pass the step as arguments: `components.train --train-csv ...`; KFP's
# lightweight components (pipeline/components.py) replace the entrypoint with their own command.
ENTRYPOINT ["/opt/venv/bin/python", "-m"]
CMD ["components.ingest", "--help"]
WORKDIR /opt/app
USER 10001:10001
COPY --from=app /opt/app /opt/app
