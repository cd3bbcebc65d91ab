#!/usr/bin/env bash
# make undeploy: remove everything `make deploy` created.
#
#   make undeploy                     # kind: the InferenceService (and with it its Deployment, Service,
#                                     # HPA), the MinIO with its volume, the credentials, the namespace,
#                                     # and the serving images loaded into the nodes
#   make undeploy CLUSTER=minikube
#   make undeploy PROFILE=sagemaker   # the SageMaker endpoint, its config, model and scaling policy
#
# Env: as k8s/deploy.sh (CLUSTER, KIND_CLUSTER_NAME, MINIKUBE_PROFILE, KUBE_CONTEXT, IMAGE_REPO,
# WAIT_TIMEOUT, PYTHON); PROFILE=sagemaker: SAGEMAKER_ENDPOINT (inventory-counter), AWS_REGION, and
# SAGEMAKER_ARGS for more `teardown` flags. Safe to run twice: what is already gone is skipped.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAMESPACE="inventory-monitor"
ISVC="inventory-counter"
CLUSTER="${CLUSTER:-kind}"
IMAGE_REPO="${IMAGE_REPO:-inventory-monitor}"
WAIT_TIMEOUT="${WAIT_TIMEOUT:-300s}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 2; }

if [ "${PROFILE:-}" = "sagemaker" ]; then
  [ -x "$PY" ] || die "$PY not found: run 'make setup' (or set PYTHON)"
  cd "$ROOT"
  sm_args=(--endpoint-name "${SAGEMAKER_ENDPOINT:-inventory-counter}")
  if [ -n "${AWS_REGION:-}" ]; then sm_args+=(--region "$AWS_REGION"); fi
  read -r -a extra <<< "${SAGEMAKER_ARGS:-}"
  log "tearing down SageMaker endpoint ${SAGEMAKER_ENDPOINT:-inventory-counter}"
  exec "$PY" -m sagemaker_tools.endpoint teardown "${sm_args[@]}" ${extra[@]+"${extra[@]}"}
fi

case "$CLUSTER" in
  kind) KIND_CLUSTER_NAME="${KIND_CLUSTER_NAME:-kind}"; CONTEXT="${KUBE_CONTEXT:-kind-$KIND_CLUSTER_NAME}" ;;
  minikube) MINIKUBE_PROFILE="${MINIKUBE_PROFILE:-minikube}"; CONTEXT="${KUBE_CONTEXT:-$MINIKUBE_PROFILE}" ;;
  *) die "CLUSTER=$CLUSTER is not supported: use CLUSTER=kind, CLUSTER=minikube or PROFILE=sagemaker" ;;
esac
command -v kubectl >/dev/null 2>&1 || die "missing tool: kubectl (https://kubernetes.io/docs/tasks/tools/)"
KUBECTL=(kubectl --context "$CONTEXT")
"${KUBECTL[@]}" version --request-timeout=10s >/dev/null 2>&1 \
  || die "the Kubernetes API of context '$CONTEXT' does not answer (kubectl config get-contexts; set KUBE_CONTEXT)"

# The InferenceService first, so KServe's controller removes the Deployment, Service and HPA it owns
# while it still can; then the namespace takes MinIO, its volume, the Secret and the ServiceAccount.
if "${KUBECTL[@]}" get crd inferenceservices.serving.kserve.io >/dev/null 2>&1; then
  log "deleting InferenceService $ISVC"
  "${KUBECTL[@]}" -n "$NAMESPACE" delete inferenceservice "$ISVC" --ignore-not-found --wait --timeout="$WAIT_TIMEOUT"
fi
log "deleting namespace $NAMESPACE"
"${KUBECTL[@]}" delete namespace "$NAMESPACE" --ignore-not-found --wait --timeout="$WAIT_TIMEOUT"

# The serving images loaded into the nodes by deploy (any tag of this repository's serving image).
if [ "$CLUSTER" = kind ] && command -v kind >/dev/null 2>&1 && command -v docker >/dev/null 2>&1; then
  for node in $(kind get nodes --name "$KIND_CLUSTER_NAME" 2>/dev/null); do
    for ref in $(docker exec "$node" crictl images -o json 2>/dev/null \
      | "$PY" -c 'import json, sys; print("\n".join(t for i in json.load(sys.stdin)["images"] for t in i.get("repoTags") or []))' 2>/dev/null \
      | grep -E "(^|/)${IMAGE_REPO}/serving:" || true); do
      log "removing $ref from node $node"
      docker exec "$node" crictl rmi "$ref" >/dev/null 2>&1 || true
    done
  done
elif [ "$CLUSTER" = minikube ] && command -v minikube >/dev/null 2>&1; then
  for ref in $(minikube -p "$MINIKUBE_PROFILE" image ls 2>/dev/null | grep -E "(^|/)${IMAGE_REPO}/serving:" || true); do
    log "removing $ref from minikube"
    minikube -p "$MINIKUBE_PROFILE" image rm "$ref" >/dev/null 2>&1 || true
  done
fi
log "undeployed"
