#!/usr/bin/env bash
# Prepare this host to run the test node (node.py): install Debian's containerd,
# runc, CNI plugins, iptables (the kubernetes Service's one DNAT rule), static
# busybox (the test image's only program), and buildah and mmdebstrap, which build
# the project's own images (project_images.py). The
# kubelet, kube-scheduler and the node's helpers are built by build.sh with the
# control plane. Idempotent: installed packages are left as they are. Needs root
# to install anything.
set -euo pipefail

log() { echo "controlplane/node-setup.sh: $*" >&2; }

# containerd 1.6 and runc 1.1 on Debian 12; crun is no alternative (it refuses
# this host's hybrid cgroup v1 hierarchy). iproute2 makes the node's bridge,
# openssl its certificates.
packages=(containerd runc containernetworking-plugins busybox-static iproute2 iptables openssl
  buildah mmdebstrap)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    log "need root to install: ${missing[*]}"
    exit 1
  fi
  log "installing ${missing[*]}"
  apt-get update -q >&2
  # No recommends: nothing else is needed, and on a host with systemd the
  # package's own containerd service stays the only extra (node.py never uses it).
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
else
  log "packages present: ${packages[*]}"
fi
