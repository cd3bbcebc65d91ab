#!/usr/bin/env bash
# make deploy: serve the trained model on a local kind/minikube cluster with KServe, or on SageMaker.
#
#   make deploy                       # kind (cluster "kind", context kind-kind)
#   make deploy CLUSTER=minikube      # minikube (profile "minikube")
#   make deploy PROFILE=sagemaker     # AWS SageMaker: SAGEMAKER_ROLE, IMAGE_URI (ECR), MODEL_DIR, AWS_REGION
#                                     # and SAGEMAKER_MAX_RPS or SAGEMAKER_TARGET_INVOCATIONS (below; all
#                                     # missing ones are listed at once)
#   bash k8s/deploy.sh --render s3://models/inventory-counter/V   # print the manifests, touch nothing
#
# Local path: check the tools and KServe -> build the serving image (tagged with the git sha) -> load
# it into the cluster -> start the in-cluster MinIO -> publish MODEL_DIR into it -> apply the
# InferenceService -> wait for Ready -> print the URL and a curl with a real bin image.
#
# Env: CLUSTER (kind|minikube), KIND_CLUSTER_NAME (kind), MINIKUBE_PROFILE (minikube), KUBE_CONTEXT
# (default: the context kind/minikube created), IMAGE_REPO (inventory-monitor), IMAGE_TAG (git sha),
# MODEL_DIR (runs/local/model), BASE_IMAGE / EXTRA_CA_CERTS (passed to docker build when set),
# WAIT_TIMEOUT (300s), PYTHON (.venv/bin/python), ABID_DIR (for the sample image), DOCKER_BUILDKIT (0).
# PROFILE=sagemaker maps SAGEMAKER_ROLE, IMAGE_URI, MODEL_DIR, AWS_REGION, SAGEMAKER_BUCKET,
# SAGEMAKER_ENDPOINT (inventory-counter), SAGEMAKER_INSTANCE_TYPE (ml.m5.large), SAGEMAKER_MIN (1),
# SAGEMAKER_MAX (3), SAGEMAKER_MAX_RPS, SAGEMAKER_TARGET_INVOCATIONS and SMOKE_IMAGE to the flags of
# `python -m sagemaker_tools.endpoint deploy`; SAGEMAKER_ARGS adds any other flags last (they win).
# Nothing is written into the repository: the manifests are rendered from a private temp copy that
# also holds the S3 credentials (random on the first deploy), and it is deleted on exit.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAMESPACE="inventory-monitor"
ISVC="inventory-counter"
BUCKET="models"

CLUSTER="${CLUSTER:-kind}"
IMAGE_REPO="${IMAGE_REPO:-inventory-monitor}"
IMAGE_TAG="${IMAGE_TAG:-$(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null || echo dev)}"
MODEL_DIR="${MODEL_DIR:-runs/local/model}"
WAIT_TIMEOUT="${WAIT_TIMEOUT:-300s}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
IMAGE="${IMAGE_REPO}/serving:${IMAGE_TAG}"

# KServe and the dependencies it needs, pinned; README.md and k8s/README.md give the same commands.
KSERVE_VERSION="v0.21.0"
CERT_MANAGER_VERSION="v1.17.2"
METRICS_SERVER_VERSION="v0.7.2"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 2; }

cd "$ROOT"
case "$MODEL_DIR" in /*) ;; *) MODEL_DIR="$ROOT/$MODEL_DIR" ;; esac

check_model_dir() {
  if [ ! -f "$MODEL_DIR/model.json" ] || [ ! -f "$MODEL_DIR/model.onnx" ]; then
    die "no exported model in $MODEL_DIR (model.json + model.onnx): train one with 'make run', or set MODEL_DIR"
  fi
}

check_python() {
  [ -x "$PY" ] || die "$PY not found: run 'make setup' (or set PYTHON)"
}

# ---------------------------------------------------------------------------------------------------
# SageMaker: the serving package does the work (model.tar.gz to S3, model, endpoint config, endpoint,
# autoscaling policy from the measured capacity).
# ---------------------------------------------------------------------------------------------------
if [ "${PROFILE:-}" = "sagemaker" ]; then
  # SAGEMAKER_ARGS: any other flags, e.g. "--no-autoscaling" or "--dry-run" (see --help); last, so they win.
  read -r -a extra <<< "${SAGEMAKER_ARGS:-}"
  has_flag() {  # FLAG...: one of them is in SAGEMAKER_ARGS (as --flag or --flag=value)
    local a f
    for a in ${extra[@]+"${extra[@]}"}; do
      for f in "$@"; do case "$a" in "$f" | "$f"=*) return 0 ;; esac; done
    done
    return 1
  }
  # Every missing setting at once, by the variable the user sets (make deploy PROFILE=sagemaker VAR=...).
  unset_vars=()
  [ -x "$PY" ] || unset_vars+=("PYTHON: $PY not found: run 'make setup'")
  if [ ! -f "$MODEL_DIR/model.json" ] || [ ! -f "$MODEL_DIR/model.onnx" ]; then
    unset_vars+=("MODEL_DIR: no exported model in $MODEL_DIR (model.json + model.onnx): train one with 'make run'")
  fi
  [ -n "${SAGEMAKER_ROLE:-}" ] || has_flag --role \
    || unset_vars+=("SAGEMAKER_ROLE: the SageMaker execution role's ARN (arn:aws:iam::<account>:role/<name>)")
  [ -n "${IMAGE_URI:-}" ] || has_flag --image-uri \
    || unset_vars+=("IMAGE_URI: the serving image pushed to ECR (<account>.dkr.ecr.<region>.amazonaws.com/…:<tag>)")
  [ -n "${AWS_REGION:-}${AWS_DEFAULT_REGION:-}" ] || has_flag --region \
    || unset_vars+=("AWS_REGION: the endpoint's region, e.g. us-east-1")
  [ -n "${SAGEMAKER_MAX_RPS:-}${SAGEMAKER_TARGET_INVOCATIONS:-}" ] \
    || has_flag --max-rps --target-invocations --no-autoscaling \
    || unset_vars+=("SAGEMAKER_MAX_RPS: requests/s one instance sustained in 'make bench-serve' (or \
SAGEMAKER_TARGET_INVOCATIONS per instance per minute, or SAGEMAKER_ARGS=--no-autoscaling)")
  if [ ${#unset_vars[@]} -gt 0 ]; then
    printf 'error: PROFILE=sagemaker needs these variables (make deploy PROFILE=sagemaker VAR=value ...):\n' >&2
    printf '  - %s\n' "${unset_vars[@]}" >&2
    exit 2
  fi
  sm_args=(
    --model-dir "$MODEL_DIR"
    --endpoint-name "${SAGEMAKER_ENDPOINT:-inventory-counter}"
    --instance-type "${SAGEMAKER_INSTANCE_TYPE:-ml.m5.large}"
    --min "${SAGEMAKER_MIN:-1}" --max "${SAGEMAKER_MAX:-3}"
  )
  if [ -n "${IMAGE_URI:-}" ]; then sm_args+=(--image-uri "$IMAGE_URI"); fi
  if [ -n "${SAGEMAKER_ROLE:-}" ]; then sm_args+=(--role "$SAGEMAKER_ROLE"); fi
  if [ -n "${AWS_REGION:-}" ]; then sm_args+=(--region "$AWS_REGION"); fi
  if [ -n "${SAGEMAKER_BUCKET:-}" ]; then sm_args+=(--bucket "$SAGEMAKER_BUCKET"); fi
  if [ -n "${SAGEMAKER_MAX_RPS:-}" ]; then sm_args+=(--max-rps "$SAGEMAKER_MAX_RPS"); fi
  if [ -n "${SAGEMAKER_TARGET_INVOCATIONS:-}" ]; then
    sm_args+=(--target-invocations "$SAGEMAKER_TARGET_INVOCATIONS")
  fi
  if [ -n "${SMOKE_IMAGE:-}" ]; then sm_args+=(--smoke-image "$SMOKE_IMAGE"); fi
  log "deploying $MODEL_DIR to SageMaker endpoint ${SAGEMAKER_ENDPOINT:-inventory-counter} with ${IMAGE_URI:-the image in SAGEMAKER_ARGS}"
  exec "$PY" -m sagemaker_tools.endpoint deploy "${sm_args[@]}" ${extra[@]+"${extra[@]}"}
fi

# ---------------------------------------------------------------------------------------------------
# Local cluster: preconditions, all reported at once.
# ---------------------------------------------------------------------------------------------------
case "$CLUSTER" in
  kind)
    KIND_CLUSTER_NAME="${KIND_CLUSTER_NAME:-kind}"
    CONTEXT="${KUBE_CONTEXT:-kind-$KIND_CLUSTER_NAME}"
    ;;
  minikube)
    MINIKUBE_PROFILE="${MINIKUBE_PROFILE:-minikube}"
    CONTEXT="${KUBE_CONTEXT:-$MINIKUBE_PROFILE}"
    ;;
  *) die "CLUSTER=$CLUSTER is not supported: use CLUSTER=kind, CLUSTER=minikube or PROFILE=sagemaker" ;;
esac

# ---------------------------------------------------------------------------------------------------
# Manifests are rendered from a private copy of k8s/ (mode 700, deleted on exit) that holds the S3
# credentials and a top kustomization with this deploy's image tag and model version.
# ---------------------------------------------------------------------------------------------------
work="$(mktemp -d)"
chmod 700 "$work"
pf_pid=""
cleanup() {
  if [ -n "$pf_pid" ]; then kill "$pf_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
cp -R "$ROOT/k8s" "$work/k8s"
rm -f "$work/k8s/base/s3.env"

write_credentials() {  # ACCESS_KEY SECRET_KEY -> the secretGenerator's env file (mode 600)
  ( umask 077; printf 'AWS_ACCESS_KEY_ID=%s\nAWS_SECRET_ACCESS_KEY=%s\n' "$1" "$2" > "$work/k8s/base/s3.env" )
}

write_deploy_kustomization() {  # STORAGE_URI -> $work/k8s/deploy: the overlay + image tag + model version
  mkdir -p "$work/k8s/deploy"
  cat > "$work/k8s/deploy/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../overlays/$CLUSTER
images:
  - name: inventory-monitor/serving
    newName: ${IMAGE_REPO}/serving
    newTag: "${IMAGE_TAG}"
patches:
  - target:
      group: serving.kserve.io
      kind: InferenceService
      name: $ISVC
    patch: |-
      - op: test
        path: /spec/predictor/containers/0/env/0/name
        value: STORAGE_URI
      - op: replace
        path: /spec/predictor/containers/0/env/0/value
        value: "$1"
EOF
}

if [ "${1:-}" = "--render" ]; then
  [ -n "${2:-}" ] || die "usage: k8s/deploy.sh --render STORAGE_URI (e.g. s3://models/inventory-counter/1)"
  command -v kubectl >/dev/null 2>&1 || die "missing tool: kubectl (https://kubernetes.io/docs/tasks/tools/)"
  write_credentials "${AWS_ACCESS_KEY_ID:-render-only}" "${AWS_SECRET_ACCESS_KEY:-render-only}"
  write_deploy_kustomization "$2"
  kubectl kustomize "$work/k8s/deploy"
  exit 0
fi

missing=()
command -v docker >/dev/null 2>&1 || missing+=("docker (https://docs.docker.com/engine/install/)")
command -v kubectl >/dev/null 2>&1 || missing+=("kubectl (https://kubernetes.io/docs/tasks/tools/)")
if [ "$CLUSTER" = kind ]; then
  command -v kind >/dev/null 2>&1 || missing+=("kind (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)")
else
  command -v minikube >/dev/null 2>&1 || missing+=("minikube (https://minikube.sigs.k8s.io/docs/start/)")
fi
command -v curl >/dev/null 2>&1 || missing+=("curl")
if [ ${#missing[@]} -gt 0 ]; then
  printf 'error: missing tools for CLUSTER=%s:\n' "$CLUSTER" >&2
  printf '  - %s\n' "${missing[@]}" >&2
  exit 2
fi
check_python
check_model_dir

if [ "$CLUSTER" = kind ]; then
  kind get clusters 2>/dev/null | grep -qx "$KIND_CLUSTER_NAME" \
    || die "no kind cluster named '$KIND_CLUSTER_NAME': create one with 'kind create cluster --name $KIND_CLUSTER_NAME'"
else
  minikube -p "$MINIKUBE_PROFILE" status >/dev/null 2>&1 \
    || die "minikube profile '$MINIKUBE_PROFILE' is not running: start it with 'minikube start -p $MINIKUBE_PROFILE --cpus 4 --memory 8g'"
fi
KUBECTL=(kubectl --context "$CONTEXT")
"${KUBECTL[@]}" version --request-timeout=10s >/dev/null 2>&1 \
  || die "the Kubernetes API of context '$CONTEXT' does not answer (kubectl config get-contexts; set KUBE_CONTEXT)"

if ! "${KUBECTL[@]}" get crd inferenceservices.serving.kserve.io >/dev/null 2>&1; then
  cat >&2 <<EOF
error: KServe is not installed in context '$CONTEXT' (no CRD inferenceservices.serving.kserve.io).
Install cert-manager, then KServe $KSERVE_VERSION in Standard mode (KServe's own install guide):
  kubectl apply -f https://github.com/cert-manager/cert-manager/releases/download/$CERT_MANAGER_VERSION/cert-manager.yaml
  kubectl -n cert-manager rollout status deploy/cert-manager-webhook --timeout=180s
  helm install kserve-crd oci://ghcr.io/kserve/charts/kserve-crd --version $KSERVE_VERSION -n kserve --create-namespace
  helm install kserve-resources oci://ghcr.io/kserve/charts/kserve-resources --version $KSERVE_VERSION -n kserve \\
    --set kserve.controller.deploymentMode=Standard --wait
EOF
  exit 2
fi
if ! "${KUBECTL[@]}" get apiservice v1beta1.metrics.k8s.io >/dev/null 2>&1; then
  log "warning: no metrics-server: the HPA cannot read CPU and will stay at minReplicas. Install it with"
  if [ "$CLUSTER" = kind ]; then
    log "  kubectl apply -f https://github.com/kubernetes-sigs/metrics-server/releases/download/$METRICS_SERVER_VERSION/components.yaml"
    log "  kubectl -n kube-system patch deploy metrics-server --type=json -p '[{\"op\":\"add\",\"path\":\"/spec/template/spec/containers/0/args/-\",\"value\":\"--kubelet-insecure-tls\"}]'"
  else
    log "  minikube -p $MINIKUBE_PROFILE addons enable metrics-server"
  fi
fi

# ---------------------------------------------------------------------------------------------------
# Image: build with the git sha tag and load it into the cluster's nodes (never pulled there).
# ---------------------------------------------------------------------------------------------------
build_args=()
[ -n "${BASE_IMAGE:-}" ] && build_args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
[ -n "${EXTRA_CA_CERTS:-}" ] && build_args+=(--build-arg "EXTRA_CA_CERTS=$EXTRA_CA_CERTS")
log "building $IMAGE"
# The classic builder by default, like `make images` (DOCKER_BUILDKIT=1 to use BuildKit).
DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}" docker build ${build_args[@]+"${build_args[@]}"} \
  -f docker/serving.Dockerfile -t "$IMAGE" .
log "loading $IMAGE into $CLUSTER"
if [ "$CLUSTER" = kind ]; then
  kind load docker-image "$IMAGE" --name "$KIND_CLUSTER_NAME"
else
  minikube -p "$MINIKUBE_PROFILE" image load "$IMAGE"
fi

# ---------------------------------------------------------------------------------------------------
# Model store, model, model server.
# ---------------------------------------------------------------------------------------------------

# Reuse the credentials of an earlier deploy (the MinIO volume was initialised with them).
secret_value() {
  "${KUBECTL[@]}" -n "$NAMESPACE" get secret s3-credentials -o "jsonpath={.data.$1}" 2>/dev/null | base64 -d 2>/dev/null || true
}
access_key="$(secret_value AWS_ACCESS_KEY_ID)"
secret_key="$(secret_value AWS_SECRET_ACCESS_KEY)"
if [ -z "$access_key" ] || [ -z "$secret_key" ]; then
  access_key="im-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
  secret_key="$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')"
fi
write_credentials "$access_key" "$secret_key"

# 1) namespace, service account, credentials and MinIO (everything but the model server).
log "applying the model store (MinIO) in namespace $NAMESPACE"
"${KUBECTL[@]}" apply -k "$work/k8s/overlays/$CLUSTER" -l 'app.kubernetes.io/component!=model-server'
"${KUBECTL[@]}" -n "$NAMESPACE" rollout status deploy/minio --timeout="$WAIT_TIMEOUT"

# 2) publish the model into MinIO through a port-forward on 127.0.0.1.
port="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"${KUBECTL[@]}" -n "$NAMESPACE" port-forward --address 127.0.0.1 svc/minio "$port:9000" >"$work/pf.log" 2>&1 &
pf_pid=$!
ready=0
for _ in $(seq 1 60); do
  if curl -fsS "http://127.0.0.1:$port/minio/health/ready" >/dev/null 2>&1; then ready=1; break; fi
  kill -0 "$pf_pid" 2>/dev/null || die "kubectl port-forward to MinIO failed: $(cat "$work/pf.log")"
  sleep 1
done
[ "$ready" = 1 ] || die "MinIO did not answer through the port-forward within 60s: $(cat "$work/pf.log")"
log "publishing $MODEL_DIR to s3://$BUCKET (in-cluster MinIO)"
storage_uri="$(
  AWS_ACCESS_KEY_ID="$access_key" AWS_SECRET_ACCESS_KEY="$secret_key" AWS_DEFAULT_REGION=us-east-1 \
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
  "$PY" - "$MODEL_DIR" "http://127.0.0.1:$port" "$BUCKET" "$ISVC" "$work/publish.yaml" <<'EOF'
import sys

import boto3
from botocore.exceptions import ClientError

from components.publish import publish

model_dir, endpoint, bucket, name, manifest = sys.argv[1:6]
s3 = boto3.client("s3", endpoint_url=endpoint)
try:
    s3.create_bucket(Bucket=bucket)
except ClientError as e:
    if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
        raise
print(publish(model_dir, f"s3://{bucket}", model_name=name, endpoint_url=endpoint, manifest_path=manifest).uri)
EOF
)"
[ -n "$storage_uri" ] || die "publishing the model printed no storage URI"
kill "$pf_pid" 2>/dev/null || true
pf_pid=""
log "published: $storage_uri"

# 3) the InferenceService with this build's image and this model version.
write_deploy_kustomization "$storage_uri"
log "applying InferenceService $ISVC (image $IMAGE)"
"${KUBECTL[@]}" apply -k "$work/k8s/deploy"
log "waiting up to $WAIT_TIMEOUT for $ISVC to be Ready"
if ! "${KUBECTL[@]}" -n "$NAMESPACE" wait --for=condition=Ready "inferenceservice/$ISVC" --timeout="$WAIT_TIMEOUT"; then
  "${KUBECTL[@]}" -n "$NAMESPACE" describe "inferenceservice/$ISVC" >&2 || true
  "${KUBECTL[@]}" -n "$NAMESPACE" get pods -o wide >&2 || true
  echo "error: $ISVC is not Ready; see 'kubectl --context $CONTEXT -n $NAMESPACE logs -l serving.kserve.io/inferenceservice=$ISVC --all-containers'" >&2
  exit 1
fi

# ---------------------------------------------------------------------------------------------------
# How to call it.
# ---------------------------------------------------------------------------------------------------
url="$("${KUBECTL[@]}" -n "$NAMESPACE" get "inferenceservice/$ISVC" -o 'jsonpath={.status.url}')"
abid="${ABID_DIR:-$ROOT/../shared/abid}"
sample="$(find "$abid/bin-images" -maxdepth 1 -name '*.jpg' 2>/dev/null | sort | head -n 1 || true)"
sample="${sample:-path/to/bin.jpg}"
cat <<EOF

$ISVC is Ready: $url
(in-cluster: http://$ISVC-predictor.$NAMESPACE.svc.cluster.local)

From this machine:
  kubectl --context $CONTEXT -n $NAMESPACE port-forward svc/$ISVC-predictor 8080:80 &
  curl -sS -H 'Content-Type: image/jpeg' --data-binary @$sample \\
    http://127.0.0.1:8080/v1/models/$ISVC:predict
Autoscaling: kubectl --context $CONTEXT -n $NAMESPACE get hpa     Remove: make undeploy
EOF
