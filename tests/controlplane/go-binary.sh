#!/usr/bin/env bash
# Build one Go binary of a small module of ours (kstatus-module, helm-module) from the Go module
# proxy into a cache dir keyed by a hash of the module's files, and print its path as the last
# line on stdout. A module of its own per tool: each pins the k8s.io/* its upstream needs, which
# the control plane's module cannot share.
#
# Usage: go-binary.sh MODULE_DIR PACKAGE NAME [--check]
#   PACKAGE: "." for the module's own main.go, or a package named by a `tool` directive.
#   --check: only say where an existing build is (exit 3 when there is none): what tests do.
# Environment: COTRAIN_CACHE, GO; LDFLAGS_X: more -X flags, part of the cache key.
set -euo pipefail
dir="$(cd "$1" && pwd)" package="$2" name="$3" check="${4:-}"
cd "$dir"
GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
export GOTOOLCHAIN=local
hash="$({ for f in $(ls go.mod go.sum ./*.go 2>/dev/null | sort) ../go-binary.sh; do
            printf '%s\n' "$f"; cat "$f"; done
          echo "$package ${LDFLAGS_X:-}"; "$GO" env GOVERSION GOARCH; } | sha256sum | cut -c1-16)"
root="${COTRAIN_CACHE:-$HOME/.cache/cotrain}/$name"
bin="$root/$hash/$name"
if [[ -x "$bin" ]]; then
  echo "$bin"
  exit 0
fi
if [[ "$check" == "--check" ]]; then
  echo "controlplane/$(basename "$dir"): $name not built for these inputs: run bash .ci/setup --tests" >&2
  exit 3
fi
mkdir -p "$(dirname "$bin")"
CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -buildvcs=false" \
  "$GO" build -trimpath -ldflags="-s -w ${LDFLAGS_X:-}" -o "$bin.tmp.$$" "$package"
mv "$bin.tmp.$$" "$bin"
for old in "$root"/*/; do
  [[ "${old%/}" != "$(dirname "$bin")" ]] && rm -rf "$old"
done
echo "$bin"
