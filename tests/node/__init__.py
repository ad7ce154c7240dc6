"""Tests on a real node: kube-scheduler, a kubelet, containerd and runc (controlplane/node.py)."""
