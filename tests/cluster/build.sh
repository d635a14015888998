#!/usr/bin/env bash
# Builds the test control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
# kubectl, kwok) from the Go modules pinned in tests/cluster/{k8s,etcd,kwok}/go.{mod,sum}, and
# helm from tests/cluster/helm/go.{mod,sum}.
#
# The binaries go to a cache outside the repository, keyed by the hash of the go.mod/go.sum
# files, so that a second run (or a second clone) reuses them and a version change rebuilds.
# helm has a cache entry of its own (~/.cache/tritonop/helm/<hash>/bin), so that adding or
# changing it never rebuilds the control plane; it is linked into the control plane's bin
# directory. Prints that bin directory on the last line of stdout. Nothing downloaded is
# committed.
#
#   TRITONOP_CLUSTER_BIN  overrides the bin directory (used as is, built when incomplete).
#   TRITONOP_HELM_BIN     overrides helm's bin directory (likewise).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
k8s_version="v1.37.2"

cache="${XDG_CACHE_HOME:-$HOME/.cache}/tritonop"
key="$(cat "$here"/k8s/go.mod "$here"/k8s/go.sum "$here"/etcd/go.mod "$here"/etcd/go.sum \
  "$here"/kwok/go.mod "$here"/kwok/go.sum | sha256sum | cut -c1-16)"
bin="${TRITONOP_CLUSTER_BIN:-$cache/cluster/$key/bin}"
binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok)
helm_key="$(cat "$here"/helm/go.mod "$here"/helm/go.sum | sha256sum | cut -c1-16)"
helm_bin="${TRITONOP_HELM_BIN:-$cache/helm/$helm_key/bin}"
helm_version="$(awk '$1 == "require" && $2 == "helm.sh/helm/v4" {print $3}' "$here"/helm/go.mod)"

complete() {
  local b
  for b in "${binaries[@]}"; do [ -x "$bin/$b" ] || return 1; done
}

link_helm() {  # the control plane's bin directory holds every binary the tier runs
  [ "$(readlink "$bin/helm" 2>/dev/null)" = "$helm_bin/helm" ] || ln -sfn "$helm_bin/helm" "$bin/helm"
}

if complete && [ -x "$helm_bin/helm" ]; then
  link_helm
  echo "$bin"
  exit 0
fi

command -v go >/dev/null || { echo "build.sh: 'go' is not on PATH (need Go >= 1.26)" >&2; exit 1; }
mkdir -p "$bin" "$helm_bin"
start=$(date +%s)
# -mod=readonly: go.sum must already be complete, so every machine builds the same versions.
export GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0
build() {  # build <module dir> <ldflags> <output> <package>...
  local dir="$1" ldflags="$2" out="$3"
  shift 3
  (cd "$here/$dir" && nice -n 19 go build -trimpath -ldflags="-s -w $ldflags" -o "$out" "$@")
}

version_flags=""
major="${k8s_version#v}"; major="${major%%.*}"
minor="${k8s_version#v*.}"; minor="${minor%%.*}"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  version_flags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=$major"
  version_flags+=" -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
done

[ -x "$bin/etcd" ] || build etcd "" "$bin/etcd" go.etcd.io/etcd/server/v3
[ -x "$bin/kwok" ] || build kwok "" "$bin/kwok" sigs.k8s.io/kwok/cmd/kwok
if ! complete; then
  build k8s "$version_flags" "$bin/" k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubectl
fi
[ -x "$helm_bin/helm" ] || build helm "-X helm.sh/helm/v4/internal/version.version=$helm_version \
  -X helm.sh/helm/v4/internal/version.metadata= \
  -X helm.sh/helm/v4/internal/version.gitTreeState=clean" "$helm_bin/helm" helm.sh/helm/v4/cmd/helm

complete || { echo "build.sh: missing binaries in $bin" >&2; exit 1; }
[ -x "$helm_bin/helm" ] || { echo "build.sh: missing helm in $helm_bin" >&2; exit 1; }
link_helm
echo "build.sh: built the control plane and helm in $(( $(date +%s) - start )) s" >&2
echo "$bin"
