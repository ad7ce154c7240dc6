#!/usr/bin/env bash
# Build `kstatus` (main.go: sigs.k8s.io/cli-utils' kstatus over objects on stdin, the status
# Flux and other GitOps tools compute for a resource) from the Go module proxy into a cache dir
# keyed by a hash of this module's files. A module of its own: cli-utils pins k8s.io/* v0.30.
#
# The last line on stdout is the binary's path. `--check`: only say where an existing build is
# (exit 3 when there is none): what the tests do. Environment: COTRAIN_CACHE, GO.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
export GOTOOLCHAIN=local
hash="$({ cat go.mod go.sum main.go build.sh; "$GO" env GOVERSION GOARCH; } | sha256sum | cut -c1-16)"
bin="${COTRAIN_CACHE:-$HOME/.cache/cotrain}/kstatus/$hash/kstatus"
if [[ -x "$bin" ]]; then
  echo "$bin"
  exit 0
fi
if [[ "${1:-}" == "--check" ]]; then
  echo "controlplane/kstatus-module/build.sh: not built for these inputs: run bash .ci/setup --tests" >&2
  exit 3
fi
mkdir -p "$(dirname "$bin")"
CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -buildvcs=false" \
  "$GO" build -trimpath -ldflags="-s -w" -o "$bin.tmp.$$" .
mv "$bin.tmp.$$" "$bin"
for old in "$(dirname "$(dirname "$bin")")"/*/; do
  [[ "${old%/}" != "$(dirname "$bin")" ]] && rm -rf "$old"
done
echo "$bin"
