"""Fixtures for the real-node tests: a control plane of their own, started with the flags a node
needs (the API server's kubelet client certificate, the node lifecycle controller), and one Node
(containerd + runc + CNI bridge, kube-scheduler, kubelet) joined to it, for the whole session.

Without root, Debian's container packages or a Go toolchain the tests fail; with
``COTRAIN_ALLOW_NO_NODE=1`` they skip instead (never in CI).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.controlplane.cluster import ControlPlane, start_control_plane
from tests.controlplane.images import LocalImage, busybox_image
from tests.controlplane.kueue import Kueue, running_kueue
from tests.controlplane.node import (
    SETUP_SCRIPT,
    FakeGpus,
    Node,
    NodePKI,
    missing_prerequisites,
    node_control_plane_args,
)
from tests.controlplane.project_images import ImageMissingError, project_image


@dataclass(frozen=True)
class RealNode:
    node: Node
    control_plane: ControlPlane
    test_image: LocalImage  # imported into the node's containerd; pods use imagePullPolicy Never


def _unavailable(msg: str) -> None:
    # A skipped test must never pass for a run that was meant to test: skipping is opt-in.
    if os.environ.get("COTRAIN_ALLOW_NO_NODE") == "1":
        pytest.skip(msg)
    pytest.fail(msg)


@pytest.fixture(scope="session")
def node_bin_dir(control_plane_bin_dir: Path) -> Path:
    """The kubelet, kube-scheduler, pause and cri-reset, built with the control plane."""
    missing = missing_prerequisites()
    if missing:
        _unavailable(f"no real node here, missing {', '.join(missing)} (run {SETUP_SCRIPT})")
    return control_plane_bin_dir


@pytest.fixture(scope="session")
def real_node(
    control_plane_bin_dir: Path, node_bin_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RealNode]:
    work = tmp_path_factory.mktemp("real-node")
    pki = NodePKI.create(work / "node-pki")
    cp = start_control_plane(work / "cp", control_plane_bin_dir, **node_control_plane_args(pki))
    try:
        image = busybox_image()
        node = Node.start(cp, node_bin_dir, work / "node", pki, images=[image])
        try:
            yield RealNode(node, cp, image)
        finally:
            node.stop()
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def node_kueue(real_node: RealNode, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kueue]:
    """The real Kueue (built by setup from sigs.k8s.io/kueue) against the node's control plane."""
    work = tmp_path_factory.mktemp("node-kueue")
    with running_kueue(real_node.control_plane, work) as running:
        yield running


def _imported(real_node: RealNode, name: str) -> LocalImage:
    try:
        image = project_image(name)
    except ImageMissingError as e:
        pytest.fail(str(e))
    seconds = real_node.node.import_image(image)
    print(f"\n{name} image {image.ref} imported in {seconds:.0f} s")
    return image


@pytest.fixture(scope="session")
def trainer_image(real_node: RealNode) -> LocalImage:
    """The trainer image built from trainer_image/Dockerfile by setup, imported into the node."""
    return _imported(real_node, "trainer")


@pytest.fixture(scope="session")
def operator_image(real_node: RealNode) -> LocalImage:
    """The operator image built from operator/Dockerfile by setup, imported into the node."""
    return _imported(real_node, "operator")


# What GPU Feature Discovery would label an MPS node with (it stays a label: no GFD runs here).
GFD_MPS_LABELS = {
    "nvidia.com/gpu.present": "true",
    "nvidia.com/gpu.count": "1",
    "nvidia.com/gpu.product": "NVIDIA-L4",
    "nvidia.com/gpu.memory": "24576",
    "nvidia.com/gpu.sharing-strategy": "mps",
    "nvidia.com/gpu.replicas": "2",
    "nvidia.com/mig.strategy": "none",
}
MPS_GPUS = FakeGpus("nvidia.com/gpu", devices=2, mps=True)
# One A100 80GB time-sliced four ways, as NVIDIA's plugin advertises it (renameByDefault off):
# a 20Gi replica holds the mixed example's two 6Gi members.
GFD_TIME_SLICING_LABELS = {
    **GFD_MPS_LABELS,
    "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB",
    "nvidia.com/gpu.memory": "81920",
    "nvidia.com/gpu.sharing-strategy": "time-slicing",
    "nvidia.com/gpu.replicas": "4",
}
TIME_SLICING_GPUS = FakeGpus("nvidia.com/gpu", devices=4)
# Four whole A100s, not shared: what the distributed example's data-parallel members take.
GFD_EXCLUSIVE_LABELS = {
    **GFD_TIME_SLICING_LABELS,
    "nvidia.com/gpu.count": "4",
    "nvidia.com/gpu.sharing-strategy": "none",
    "nvidia.com/gpu.replicas": "1",
}
EXCLUSIVE_GPUS = FakeGpus("nvidia.com/gpu", devices=4)
# One A100 80GB cut into seven 1g.10gb MIG slices, GFD's mixed strategy: each slice its own
# resource, as NVIDIA's plugin advertises it.
GFD_MIG_LABELS = {
    key: value
    for key, value in GFD_TIME_SLICING_LABELS.items()
    if key not in ("nvidia.com/gpu.sharing-strategy", "nvidia.com/gpu.replicas")
} | {
    "nvidia.com/mig.strategy": "mixed",
    "nvidia.com/mig-1g.10gb.count": "7",
    "nvidia.com/mig-1g.10gb.memory": "9856",
}
MIG_GPUS = FakeGpus("nvidia.com/mig-1g.10gb", devices=7)


# One L4 under MPS not split (replicas 1): the daemon's default active thread percentage is
# 100, so a member may ask for any computePercent.
GFD_WHOLE_MPS_LABELS = {**GFD_MPS_LABELS, "nvidia.com/gpu.replicas": "1"}
WHOLE_MPS_GPUS = FakeGpus("nvidia.com/gpu", devices=1, mps=True)


def as_mps_node(real_node: RealNode, gpus: FakeGpus, labels: dict[str, str]) -> RealNode:
    """The real node as an MPS node of ``gpus`` and GFD ``labels``, its daemon's files made."""
    node = real_node.node
    node.use_gpus(gpus, labels)
    # What the plugin's MPS daemon would have made: its control pipe and its shared memory.
    (node.mps_root / "nvidia.com" / "gpu" / "pipe" / "control").write_text("")
    (node.mps_root / "shm" / "cuda.shm.daemon").write_text("")
    return real_node


@pytest.fixture
def mps_node(real_node: RealNode) -> RealNode:
    """The real node with two fake MPS replicas from fake-gpu-plugin and GFD's labels."""
    return as_mps_node(real_node, MPS_GPUS, GFD_MPS_LABELS)


@pytest.fixture
def whole_mps_node(real_node: RealNode) -> RealNode:
    """The real node with one fake GPU under MPS, not split (one replica)."""
    return as_mps_node(real_node, WHOLE_MPS_GPUS, GFD_WHOLE_MPS_LABELS)


@pytest.fixture
def time_slicing_node(real_node: RealNode) -> RealNode:
    """The real node as one GPU time-sliced four ways."""
    real_node.node.use_gpus(TIME_SLICING_GPUS, GFD_TIME_SLICING_LABELS)
    return real_node


@pytest.fixture
def exclusive_node(real_node: RealNode) -> RealNode:
    """The real node as four whole GPUs."""
    real_node.node.use_gpus(EXCLUSIVE_GPUS, GFD_EXCLUSIVE_LABELS)
    return real_node


@pytest.fixture
def mig_node(real_node: RealNode) -> RealNode:
    """The real node as one GPU in seven 1g.10gb MIG slices."""
    real_node.node.use_gpus(MIG_GPUS, GFD_MIG_LABELS)
    return real_node


@pytest.fixture
def restricted_namespace(real_node: RealNode) -> Iterator[str]:
    """A namespace of the test's own that enforces Pod Security restricted."""
    cp = real_node.control_plane
    ns = f"t-{uuid.uuid4().hex[:8]}"
    cp.kubectl("create", "namespace", ns)
    cp.kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted")
    cp.wait_for_service_account(ns)
    try:
        yield ns
    finally:
        cp.kubectl("delete", "namespace", ns, "--wait=false", check=False)
