#!/usr/bin/env bash
# Build Kubeflow's training operator v1 (github.com/kubeflow/training-operator, the version of
# go.mod's tool directive), the peer of bench/operator_bench.py's comparison, and copy its
# PyTorchJob CRD out of the module beside the binary. Its own go.mod: it pins k8s.io/* v0.29.
# Not part of `.ci/setup --tests` (no test needs it): the bench builds it when it is asked for.
# The last line on stdout is the binary's path; `--check` as in ../go-binary.sh.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin=$(bash "$here/../go-binary.sh" "$here" \
  github.com/kubeflow/training-operator/cmd/training-operator.v1 training-operator "$@")
crd="$(dirname "$bin")/kubeflow.org_pytorchjobs.yaml"
if [[ ! -f "$crd" ]]; then
  GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
  module=$(cd "$here" && GOTOOLCHAIN=local "$GO" list -m -f '{{.Dir}}' github.com/kubeflow/training-operator)
  cp "$module/manifests/base/crds/kubeflow.org_pytorchjobs.yaml" "$crd.tmp" && mv "$crd.tmp" "$crd"
fi
echo "$bin"
