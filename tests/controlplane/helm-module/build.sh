#!/usr/bin/env bash
# Build `helm` (helm.sh/helm/v3/cmd/helm at the version go.mod's tool directive pins) for the
# chart's tests: lint, template, install, upgrade and uninstall on the test cluster. The -X flags
# are those of Helm's Makefile: its version, and the Kubernetes version `helm template` and
# `helm lint` assume without a cluster (client-go's minor, as a release build has it).
# The last line on stdout is the binary's path; `--check` as in ../go-binary.sh.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
# go.mod is the source of both versions: no network needed to read them (no `go list`).
helm=$(awk '$1 == "helm.sh/helm/v3" { print $2 }' go.mod)
minor=$(awk '$1 == "k8s.io/client-go" { split($2, v, "."); print v[2] }' go.mod)
[[ -n "$helm" && -n "$minor" ]] || { echo "helm-module/build.sh: versions not found in go.mod" >&2; exit 1; }
LDFLAGS_X=""
for pkg in pkg/lint/rules pkg/chartutil; do
  LDFLAGS_X+=" -X helm.sh/helm/v3/$pkg.k8sVersionMajor=1 -X helm.sh/helm/v3/$pkg.k8sVersionMinor=$minor"
done
LDFLAGS_X+=" -X helm.sh/helm/v3/internal/version.version=$helm"
export LDFLAGS_X
exec bash "$here/../go-binary.sh" "$here" helm.sh/helm/v3/cmd/helm helm "$@"
