#!/usr/bin/env bash
# Build Kueue's manager (sigs.k8s.io/kueue/cmd/kueue, the version in go.mod's tool directive)
# from the Go module proxy, and copy its CRDs out of the module, into a cache dir keyed by a hash
# of go.mod, go.sum and this script. Kueue has a go.mod of its own: it pins k8s.io/* v0.35 and
# controller-runtime v0.23, which the control plane's k8s.io/kubernetes v1.37 module cannot share.
#
# Log lines go to stderr; the last line on stdout is the output dir (bin/kueue, crds/*.yaml and
# webhooks.yaml, Kueue's own manifests).
#
# `--check`: only say where an existing build is (exit 3 when there is none): what the tests do.
#
# Environment: COTRAIN_CACHE, GO, BUILD_PARALLEL as for ../build.sh.
set -euo pipefail
check=0
[[ "${1:-}" == "--check" ]] && check=1

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

log() { echo "controlplane/kueue-module/build.sh: $*" >&2; }

GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
[[ -x "$GO" ]] || { log "no go toolchain found (set GO=/path/to/go)"; exit 1; }
export GOTOOLCHAIN=local

hash="$(
  { for f in go.mod go.sum build.sh; do printf '%s\n' "$f"; cat "$f"; done
    "$GO" env GOVERSION GOOS GOARCH; } | sha256sum | cut -c1-16
)"
cache_root="${COTRAIN_CACHE:-$HOME/.cache/cotrain}/kueue"
out="$cache_root/$hash"

mkdir -p "$cache_root"
exec 9>"$cache_root/.lock"
flock 9

if [[ -f "$out/.complete" && -x "$out/bin/kueue" ]]; then
  log "reusing $out"
  echo "$out"
  exit 0
fi
if ((check)); then
  log "kueue is not built for these inputs ($out): run bash .ci/setup --tests"
  exit 3
fi

version="$("$GO" list -m -f '{{.Version}}' sigs.k8s.io/kueue)"
parallel="${BUILD_PARALLEL:-$(( $(nproc) < 2 ? $(nproc) : 2 ))}"
tmp="$out.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp/bin" "$tmp/crds"
trap 'rm -rf "$tmp"' EXIT

log "building kueue $version into $out with $("$GO" env GOVERSION), -p $parallel"
start=$(date +%s)
GOFLAGS="${GOFLAGS:-} -buildvcs=false" CGO_ENABLED=0 \
  "$GO" build -p "$parallel" -trimpath \
  -ldflags="-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$version" \
  -o "$tmp/bin/kueue" sigs.k8s.io/kueue/cmd/kueue
end=$(date +%s)
module="$("$GO" list -m -f '{{.Dir}}' sigs.k8s.io/kueue)"
cp "$module"/config/components/crd/bases/*.yaml "$tmp/crds/"
cp "$module"/config/components/webhook/manifests.yaml "$tmp/webhooks.yaml"
chmod u+w "$tmp"/crds/*.yaml "$tmp/webhooks.yaml"

rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
echo "$version" >"$out/.complete"
for old in "$cache_root"/*/; do
  old="${old%/}"
  [[ "$old" != "$out" && -f "$old/.complete" ]] && rm -rf "$old"
done
log "build took $((end - start))s: $(du -sh "$out/bin/kueue" | cut -f1)"
echo "$out"
