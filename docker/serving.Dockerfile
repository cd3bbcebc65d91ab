# Model server image: onnxruntime + KServe + the `serving` package; no torch (the model is ONNX).
#
#   DOCKER_BUILDKIT=0 docker build -f docker/serving.Dockerfile -t inventory-monitor/serving:<git-sha> .
#
# BASE_IMAGE: a Debian-based image with Python 3.11 and its venv module. The default is the official
# slim image pinned by digest; where no registry is reachable, docker/base/build-base.sh makes an
# equivalent one from a debootstrap rootfs (python3 in /usr/bin instead of /usr/local/bin: both work
# because every stage uses the same base, so the venv's interpreter link stays valid).
# EXTRA_CA_CERTS: PEM of extra CAs for pip behind a TLS-intercepting proxy; used by the builder
# stage only and never part of the runtime image.
#
# Steps are ordered for cheap rebuilds on any storage driver (vfs copies a whole layer per step):
# metadata first, the large venv copied once, the small source layer last.
ARG BASE_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

# --- dependencies: changes only with pyproject.toml / constraints.txt --------------------------------
FROM ${BASE_IMAGE} AS deps
ARG EXTRA_CA_CERTS=""
ARG PIP_INDEX_URL=https://pypi.org/simple
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_DEFAULT_TIMEOUT=120
WORKDIR /src
COPY pyproject.toml constraints.txt ./
# Core + `serving` extra requirements, read from pyproject.toml, at the versions in constraints.txt;
# pip itself is removed afterwards (nothing installs packages into a running server).
RUN python3 -m venv /opt/venv \
 && if [ -n "$EXTRA_CA_CERTS" ]; then \
      cat /etc/ssl/certs/ca-certificates.crt > /tmp/ca.pem && printf '%s\n' "$EXTRA_CA_CERTS" >> /tmp/ca.pem \
      && export PIP_CERT=/tmp/ca.pem; \
    fi \
 && python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['serving']))" > /tmp/requirements.txt \
 && /opt/venv/bin/pip install --index-url "$PIP_INDEX_URL" -c constraints.txt -r /tmp/requirements.txt \
 && /opt/venv/bin/python -m pip uninstall --yes --quiet pip \
 && rm -rf /tmp/ca.pem /tmp/requirements.txt

# --- source: only the torch-free modules the server imports, byte-compiled ---------------------------
FROM ${BASE_IMAGE} AS app
COPY components/__init__.py components/answers.py components/common.py components/preprocess.py components/modelspec.py \
     /opt/app/components/
COPY serving/ /opt/app/serving/
RUN python3 -m compileall -q /opt/app

# --- runtime ------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="inventory-monitor serving" \
      org.opencontainers.image.description="KServe V1/V2 and SageMaker model server for the inventory counter (ONNX)" \
      org.opencontainers.image.licenses="Apache-2.0"
# HOME and MPLCONFIGDIR point at /tmp so the server runs with a read-only root filesystem.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib
# 8080: KServe REST (V1/V2) or SageMaker (/ping, /invocations). gRPC is off by default; with
# --enable_grpc, publish --grpc_port at run time (docker run -p, a containerPort).
EXPOSE 8080
# KServe: args `--model_dir /mnt/models --model_name inventory-counter`; SageMaker: `serve`.
ENTRYPOINT ["/opt/venv/bin/python", "-m", "serving"]
WORKDIR /opt/app
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin app
USER 10001:10001
# Owned by root and read-only for the server's user.
COPY --from=deps /opt/venv /opt/venv
COPY --from=app /opt/app /opt/app
