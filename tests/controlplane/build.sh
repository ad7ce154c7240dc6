#!/usr/bin/env bash
# Build the test control plane binaries (etcd, kube-apiserver,
# kube-controller-manager, kubectl; the node's kube-scheduler, kubelet and
# helpers; CoreDNS) from the Go module proxy into a cache dir
# outside the repository, keyed by a hash of go.mod, go.sum, the cmd/ sources
# and this script. Reuses an existing build when the hash is unchanged.
#
# Log lines go to stderr; the last line on stdout is the bin dir.
#
# Environment:
#   COTRAIN_CACHE   cache root (default: $HOME/.cache/cotrain)
#   GO              go binary (default: `go` on PATH, else /usr/local/go/bin/go)
#   BUILD_PARALLEL  go build -p (default: number of CPUs, at most 2)
#
# Other builds in the cache root are removed after a successful build.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

log() { echo "controlplane/build.sh: $*" >&2; }

GO="${GO:-}"
if [[ -z "$GO" ]]; then
  if command -v go >/dev/null 2>&1; then
    GO="$(command -v go)"
  elif [[ -x /usr/local/go/bin/go ]]; then
    GO=/usr/local/go/bin/go
  else
    log "no go toolchain found (set GO=/path/to/go)"
    exit 1
  fi
fi

# Hash the inputs: go.mod, go.sum, every file under cmd/, and this script.
hash="$(
  {
    for f in go.mod go.sum build.sh; do printf '%s\n' "$f"; cat "$f"; done
    find cmd -type f | LC_ALL=C sort | while read -r f; do printf '%s\n' "$f"; cat "$f"; done
    "$GO" env GOVERSION GOOS GOARCH
  } | sha256sum | cut -c1-16
)"

cache_root="${COTRAIN_CACHE:-$HOME/.cache/cotrain}/controlplane"
out="$cache_root/$hash"
bin="$out/bin"
want=(etcd kube-apiserver kube-controller-manager kubectl kube-scheduler kubelet pause cri-reset fake-gpu-plugin coredns)

complete() {
  [[ -f "$out/.complete" ]] || return 1
  for b in "${want[@]}"; do [[ -x "$bin/$b" ]] || return 1; done
}

mkdir -p "$cache_root"
# Serialise concurrent builds (e.g. several pytest sessions) on one lock.
exec 9>"$cache_root/.lock"
flock 9

if complete; then
  log "reusing $bin"
  echo "$bin"
  exit 0
fi

k8s_version="$("$GO" list -m -f '{{.Version}}' k8s.io/kubernetes)"
major="${k8s_version#v}"; major="${major%%.*}"
minor="${k8s_version#v*.}"; minor="${minor%%.*}"
ver_flags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ver_flags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  ver_flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

parallel="${BUILD_PARALLEL:-$(( $(nproc) < 2 ? $(nproc) : 2 ))}"
tmp="$out.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp/bin"
trap 'rm -rf "$tmp"' EXIT

log "building ${want[*]} ($k8s_version) into $bin with $("$GO" env GOVERSION), -p $parallel"
start=$(date +%s)
GOTOOLCHAIN=local GOFLAGS="${GOFLAGS:-} -buildvcs=false" CGO_ENABLED=0 \
  "$GO" build -p "$parallel" -trimpath -ldflags="-s -w$ver_flags" -o "$tmp/bin/" ./cmd/...
end=$(date +%s)

rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
echo "$k8s_version" >"$out/.complete"
# Drop builds for older inputs (~300 MB each); running processes are unaffected.
for old in "$cache_root"/*/; do
  old="${old%/}"
  [[ "$old" != "$out" && -f "$old/.complete" ]] && rm -rf "$old"
done
log "build took $((end - start))s; sizes:"
du -sh "$bin"/* >&2
echo "$bin"
