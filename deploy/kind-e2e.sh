#!/usr/bin/env bash
# End to end on a local kind cluster: build both images, install the operator, apply the
# examples, wait for them to be Ready, and send real requests through a port-forward.
#
#   deploy/kind-e2e.sh [--chat] [--skip-build] [--delete-cluster]
#
#   --chat            also apply examples/chat.yaml and ask it one question (the default
#                     Triton base of deploy/Dockerfile.triton installs torch 2.9.1, >= 2.6)
#   --skip-build      use the images already in the local Docker engine
#   --delete-cluster  delete the kind cluster at the end (by default it is kept and reused)
#
# Environment: KIND_CLUSTER (tritonop), E2E_NAMESPACE (default), E2E_PORT (8000, the local
# end of the port-forward), E2E_READY_TIMEOUT (seconds a resource may take to become
# Ready, 1800), TRITON_BASE_IMAGE (the Triton image to build on).
# Needs docker (with a running engine), kind, kubectl, curl and python3.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CLUSTER="${KIND_CLUSTER:-tritonop}"
CONTEXT="kind-${CLUSTER}"
NAMESPACE="${E2E_NAMESPACE:-default}"
PORT="${E2E_PORT:-8000}"
READY_TIMEOUT="${E2E_READY_TIMEOUT:-1800}"
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)"
# The operator's default images (tritonop.render.kubernetes.Images) carry the package
# version, so the images built here are the ones the operator asks for.
OPERATOR_IMAGE="ghcr.io/tritonop/operator:${VERSION}"
TRITON_IMAGE="ghcr.io/tritonop/triton:${VERSION}"

CHAT=0
BUILD=1
DELETE_CLUSTER=0
for arg in "$@"; do
  case "$arg" in
    --chat) CHAT=1 ;;
    --skip-build) BUILD=0 ;;
    --delete-cluster) DELETE_CLUSTER=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

step() { printf '\n==> %s\n' "$*"; }
run() { printf '+ %s\n' "$*"; "$@"; }
k() { run kubectl --context "$CONTEXT" "$@"; }
die() { echo "kind-e2e: $*" >&2; exit 1; }

PF_PID=""
cleanup() {
  if [[ -n "$PF_PID" ]]; then kill "$PF_PID" 2>/dev/null || true; fi
  if [[ "$DELETE_CLUSTER" == 1 ]]; then run kind delete cluster --name "$CLUSTER" || true; fi
}
trap cleanup EXIT

# What a person needs to see when something did not come up.
diagnose() {
  local kind="$1" name="$2"
  echo "---- diagnostics for $kind/$name ----" >&2
  kubectl --context "$CONTEXT" -n "$NAMESPACE" describe "$kind" "$name" >&2 || true
  kubectl --context "$CONTEXT" -n "$NAMESPACE" describe deployment "${name}-triton" >&2 || true
  kubectl --context "$CONTEXT" -n "$NAMESPACE" get pods -o wide >&2 || true
  kubectl --context "$CONTEXT" -n "$NAMESPACE" logs "deployment/${name}-triton" \
    --all-containers --tail=100 >&2 || true
  kubectl --context "$CONTEXT" -n tritonop-system logs deployment/tritonop --tail=100 >&2 || true
}

# Poll .status.phase until Ready; stop early on Failed.
wait_ready() {
  local kind="$1" name="$2" deadline=$((SECONDS + READY_TIMEOUT)) phase=""
  echo "+ waiting up to ${READY_TIMEOUT}s for $kind/$name to be Ready"
  while ((SECONDS < deadline)); do
    phase="$(kubectl --context "$CONTEXT" -n "$NAMESPACE" get "$kind" "$name" \
      -o jsonpath='{.status.phase}' 2>/dev/null || true)"
    case "$phase" in
      Ready) echo "  $kind/$name is Ready after ${SECONDS}s of this run"; return 0 ;;
      Failed) break ;;
    esac
    echo "  phase: ${phase:-<none yet>}"
    sleep 10
  done
  diagnose "$kind" "$name"
  die "$kind/$name did not become Ready (last phase: ${phase:-none})"
}

# Forward port 8000 of a pod of $1 to localhost:$PORT and wait until Triton answers
# through it. Triton's HTTP listens on the pod's loopback only (the Service publishes the
# gateway and metrics); a port-forward to the pod reaches it there.
port_forward() {
  local service="$1"
  if [[ -n "$PF_PID" ]]; then kill "$PF_PID" 2>/dev/null || true; wait "$PF_PID" 2>/dev/null || true; fi
  echo "+ kubectl --context $CONTEXT -n $NAMESPACE port-forward deployment/$service-triton $PORT:8000 &"
  kubectl --context "$CONTEXT" -n "$NAMESPACE" port-forward "deployment/$service-triton" \
    "$PORT:8000" >/dev/null &
  PF_PID=$!
  for _ in $(seq 30); do
    if curl -sf "http://localhost:$PORT/v2/health/ready" >/dev/null; then return 0; fi
    sleep 1
  done
  die "the port-forward to deployment/$service-triton did not answer on localhost:$PORT"
}

step "checking the tools"
for tool in docker kind kubectl curl python3; do
  command -v "$tool" >/dev/null || die "$tool is not installed (needed: docker, kind, kubectl, curl, python3)"
done
docker info >/dev/null 2>&1 || die "the Docker engine is not reachable ('docker info' failed): start it"
[[ -n "$VERSION" ]] || die "could not read the version from pyproject.toml"

step "kind cluster '$CLUSTER' from kind-config.yaml"
# The node mounts ./.kind-artifacts at /artifacts; pods write there as uid 1000.
run mkdir -p .kind-artifacts
run chmod 0777 .kind-artifacts
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  echo "+ reusing the existing cluster '$CLUSTER'"
else
  run kind create cluster --name "$CLUSTER" --config kind-config.yaml --wait 180s
fi

if [[ "$BUILD" == 1 ]]; then
  step "building the images"
  run docker build -f deploy/Dockerfile.operator -t "$OPERATOR_IMAGE" .
  build_args=()
  if [[ -n "${TRITON_BASE_IMAGE:-}" ]]; then build_args=(--build-arg "TRITON_IMAGE=$TRITON_BASE_IMAGE"); fi
  # (the ${a[@]+...} form: an empty array is "unbound" to bash 3.2's set -u, as on macOS)
  run docker build -f deploy/Dockerfile.triton ${build_args[@]+"${build_args[@]}"} -t "$TRITON_IMAGE" .
fi

step "loading the images into the cluster"
run kind load docker-image --name "$CLUSTER" "$OPERATOR_IMAGE" "$TRITON_IMAGE"

step "installing CRDs, RBAC and the operator"
# Start from clean examples: a Triton pod from an earlier run would keep its old image.
k -n "$NAMESPACE" delete -f examples/news-search.yaml -f examples/chat.yaml \
  --ignore-not-found --wait --timeout=180s 2>/dev/null || true
k apply -k deploy/
k wait --for=condition=Established --timeout=60s \
  crd/embeddingsearches.serving.tritonop.dev crd/llmservices.serving.tritonop.dev
# Same tag, new image: restart so that the operator runs what was just loaded.
k -n tritonop-system rollout restart deployment/tritonop
k -n tritonop-system rollout status deployment/tritonop --timeout=300s

step "EmbeddingSearch 'news' (examples/news-search.yaml)"
k -n "$NAMESPACE" apply -f examples/news-search.yaml
wait_ready esearch news
k -n "$NAMESPACE" get esearch news

step "the seed search request through a port-forward"
port_forward news
body='{"text": "europe climate change storm", "num_results": 5}'
echo "+ curl -X POST localhost:$PORT/v2/models/news/generate -d '$body'"
answer="$(curl -sS --fail-with-body -X POST -H 'Content-Type: application/json' \
  -d "$body" "http://localhost:$PORT/v2/models/news/generate")" \
  || { echo "$answer" >&2; diagnose esearch news; die "the search request failed"; }
echo "$answer"
ANSWER="$answer" python3 - <<'EOF' || { diagnose esearch news; die "unexpected search answer"; }
import json, os
answer = json.loads(os.environ["ANSWER"])
texts = answer["texts"]
assert len(texts) == 5, f"expected 5 texts, got {len(texts)}"
assert all(isinstance(t, str) and t for t in texts), "every text must be a non-empty string"
assert len(answer["ids"]) == len(answer["scores"]) == 5, "expected 5 ids and 5 scores"
print("search answered 5 texts; first:", texts[0])
EOF

if [[ "$CHAT" == 1 ]]; then
  step "LLMService 'chat' (examples/chat.yaml)"
  k -n "$NAMESPACE" apply -f examples/chat.yaml
  wait_ready llm chat
  port_forward chat
  body='{"text_input": "What is the capital of France?", "max_tokens": 16, "temperature": 0}'
  echo "+ curl -X POST localhost:$PORT/v2/models/chat/generate -d '$body'"
  answer="$(curl -sS --fail-with-body -X POST -H 'Content-Type: application/json' \
    -d "$body" "http://localhost:$PORT/v2/models/chat/generate")" \
    || { echo "$answer" >&2; diagnose llm chat; die "the chat request failed"; }
  echo "$answer"
  ANSWER="$answer" python3 - <<'EOF' || { diagnose llm chat; die "unexpected chat answer"; }
import json, os
text = json.loads(os.environ["ANSWER"])["text_output"]
assert isinstance(text, str) and text.strip(), "expected a non-empty text_output"
print("chat answered:", text.strip())
EOF
fi

step "kind-e2e passed"
