# inventory-monitor: every target creates or refreshes the virtual environment it needs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev
EXTRAS ?= dev

# make run
PROFILE ?= quick
# the pipeline profiles (pipeline/profiles.py; tests/test_pipeline_compile.py keeps the two in step)
PIPELINE_PROFILES := quick full scratch
DATA_SOURCE ?= s3://aft-vbi-pds
RUN_DIR ?= runs/local
# subprocess: tasks in this venv; docker: every task in the components image (make images first)
RUNNER ?= subprocess
# more flags of python -m pipeline.run_local, e.g. RUN_ARGS="--epochs 3 --param head=classification"
RUN_ARGS ?=
PIPELINE_YAML ?= build/inventory_pipeline.yaml
KFP_HOST ?=
SUBMIT_ARGS ?=
# make test
PYTEST_ARGS ?=
# make images / deploy
IMAGE_REPO ?= inventory-monitor
IMAGE_TAG ?= $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo dev)
CLUSTER ?= kind
CLUSTERS := kind minikube
COMPONENTS_IMAGE ?= $(IMAGE_REPO)/components:$(IMAGE_TAG)
# extra `docker build` arguments, e.g. IMAGE_BUILD_ARGS="--build-arg BASE_IMAGE=$(bash docker/base/build-base.sh)" without a registry
IMAGE_BUILD_ARGS ?=
MODEL_DIR ?= $(RUN_DIR)/model
# make gpu-prep: what a GPU machine without PyPI or the raw images needs (bench/gpu_session.sh)
GPU_PYTHON ?= 3.12
GPU_WHEELS := optuna alembic SQLAlchemy colorlog Mako

# A misspelt value stops make before anything runs (a misspelt variable name cannot be caught).
or_list = $(subst $() ,$(comma) ,$(strip $(filter-out $(lastword $(1)),$(1)))) or $(lastword $(1))
comma := ,
ifneq ($(filter run compile submit,$(MAKECMDGOALS)),)
  ifneq ($(words $(filter $(PIPELINE_PROFILES),$(PROFILE))) $(words $(PROFILE)),1 1)
    $(error PROFILE=$(PROFILE): use PROFILE=$(call or_list,$(PIPELINE_PROFILES)))
  endif
endif
ifneq ($(filter deploy undeploy,$(MAKECMDGOALS)),)
  ifneq ($(PROFILE),sagemaker)
    ifneq ($(words $(filter $(CLUSTERS),$(CLUSTER))) $(words $(CLUSTER)),1 1)
      $(error CLUSTER=$(CLUSTER): use CLUSTER=$(call or_list,$(CLUSTERS)) (or PROFILE=sagemaker))
    endif
  endif
endif

.PHONY: help setup run test lint docs fmt compile submit bench-ingest bench-train bench-serve gpu-prep \
	images deploy undeploy k8s-check clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	@touch $@

setup: $(STAMP) ## create or refresh .venv with every extra (dev)

run: $(STAMP) ## the whole pipeline locally with kfp.local (PROFILE=quick|full|scratch, DATA_SOURCE=s3://…|DIR, RUNNER=subprocess|docker, RUN_ARGS="--epochs 3")
	@case "$(RUNNER)" in subprocess|docker) ;; \
	  *) echo "RUNNER=$(RUNNER): use RUNNER=subprocess (tasks in this venv) or RUNNER=docker (in the components image)"; exit 2;; esac
	$(PY) -m pipeline.run_local --profile $(PROFILE) --source $(DATA_SOURCE) --out $(RUN_DIR) \
		--runner $(RUNNER) --image $(COMPONENTS_IMAGE) $(RUN_ARGS)

test: $(STAMP) ## the test suite (starts its own S3, PostgreSQL, KServe and Docker servers)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP) ## ruff check + format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

docs: $(STAMP) ## rewrite the generated tables in docs/ (settings, pipeline parameters)
	$(PY) -m pipeline.docgen

fmt: $(STAMP) ## ruff fix + format
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

compile: $(STAMP) ## write the pipeline YAML for the KFP UI
	$(PY) -m pipeline.compile --profile $(PROFILE) --image $(COMPONENTS_IMAGE) --out $(PIPELINE_YAML)

submit: $(STAMP) ## upload and start a run on a cluster: make submit KFP_HOST=http://…
	@test -n "$(KFP_HOST)" || { echo "set KFP_HOST, e.g. make submit KFP_HOST=http://localhost:8080"; exit 2; }
	SUBMIT_VIA_MAKE=1 $(PY) -m pipeline.submit --host $(KFP_HOST) --profile $(PROFILE) --image $(COMPONENTS_IMAGE) $(SUBMIT_ARGS)

bench-ingest: $(STAMP) ## objects/s from a local S3 server -> bench/results/ingest.json
	$(PY) bench/ingest.py

bench-train: $(STAMP) ## training throughput and accuracy -> bench/results/train*.json
	$(PY) bench/train.py

bench-serve: $(STAMP) ## load test of the model server vs a naive baseline -> bench/results/serve.json
	$(PY) bench/serve.py

gpu-prep: $(STAMP) ## data packs (.gpu/) + Optuna wheels (.whl/) for bench/gpu_session.sh on a GPU machine
	$(PY) bench/train.py pack --out .gpu/abid_224_q90.npz
	$(PY) bench/train.py pack --all-counts --quality 75 --out .gpu/abid_all_224_q75.npz
	$(PY) bench/train.py pack --image-size 288 --quality 75 --out .gpu/abid_288_q75.npz
	@for name in $(GPU_WHEELS); do \
	  pin=$$(grep -i "^$$name==" constraints.txt) || { echo "$$name is not pinned in constraints.txt"; exit 2; }; \
	  $(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) \
	    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	    --platform manylinux2014_x86_64 -d .whl "$$pin" || exit; \
	done
	@du -sh .gpu/* .whl

k8s-check: $(STAMP) ## offline checks of the kustomize overlays and Dockerfiles
	$(PY) -m pytest tests/test_k8s.py tests/test_docker.py -m "not docker"

images: ## build the components and serving images tagged with the git sha
	DOCKER_BUILDKIT=$${DOCKER_BUILDKIT:-0} docker build $(IMAGE_BUILD_ARGS) -f docker/components.Dockerfile -t $(IMAGE_REPO)/components:$(IMAGE_TAG) .
	DOCKER_BUILDKIT=$${DOCKER_BUILDKIT:-0} docker build $(IMAGE_BUILD_ARGS) -f docker/serving.Dockerfile -t $(IMAGE_REPO)/serving:$(IMAGE_TAG) .

deploy: $(STAMP) ## deploy the model to kind/minikube (CLUSTER=kind|minikube) or PROFILE=sagemaker
	CLUSTER=$(CLUSTER) PROFILE=$(PROFILE) IMAGE_REPO=$(IMAGE_REPO) IMAGE_TAG=$(IMAGE_TAG) MODEL_DIR=$(MODEL_DIR) \
		PYTHON=$(PY) bash k8s/deploy.sh

undeploy: ## remove everything deploy created
	CLUSTER=$(CLUSTER) PROFILE=$(PROFILE) bash k8s/undeploy.sh

clean: ## remove build outputs (keeps .venv)
	rm -rf build .pytest_cache .ruff_cache
