#!/usr/bin/env bash
# Build `kstatus` (main.go: sigs.k8s.io/cli-utils' kstatus over objects on stdin, the status
# Flux and other GitOps tools compute for a resource); cli-utils pins k8s.io/* v0.30.
# The last line on stdout is the binary's path; `--check` as in ../go-binary.sh.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec bash "$here/../go-binary.sh" "$here" . kstatus "$@"
