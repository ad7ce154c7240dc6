"""End-to-end fixtures: the real operator (through a fault proxy), the real API server, and a
local kubelet that runs the trainer pods as processes training real PyTorch and TensorFlow."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.controlplane.cluster import ControlPlane
from tests.e2e.kubelet import LocalKubelet
from tests.fixtures.faultproxy import FaultProxy, running_proxy, write_proxy_kubeconfig
from tests.fixtures.jobs import JobBuilder, a_job
from tests.fixtures.operator_process import OperatorProcess

POOL = {"cotrain.test/pool": "e2e"}


@pytest.fixture(scope="session")
def gc_ready(cluster: ControlPlane) -> ControlPlane:
    """The garbage collector knows CoTrainJobs (it rescans new kinds only every ~30 s)."""
    cluster.wait_for_garbage_collector("cotrain.dev/v1alpha1", "CoTrainJob")
    return cluster


@pytest.fixture(scope="module")
def proxy(cluster: ControlPlane) -> Iterator[FaultProxy]:
    with running_proxy(cluster.server, cluster.ca_file) as running:
        yield running


@pytest.fixture(scope="module")
def e2e_operator(
    cluster: ControlPlane, proxy: FaultProxy, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    token = cluster.service_account_token(
        "cotrain-system", "cotrain-operator", create=False, duration="4h"
    )
    work = tmp_path_factory.mktemp("e2e-operator")
    kubeconfig = write_proxy_kubeconfig(work / "operator.kubeconfig", proxy, token)
    with OperatorProcess(kubeconfig, work, namespace="e*") as process:
        yield process


@pytest.fixture(scope="module")
def kubelet(
    cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalKubelet]:
    node = LocalKubelet(
        cluster,
        "e2e-gpu",
        tmp_path_factory.mktemp("kubelet"),
        # An A100 80GB time-sliced four ways: a 20Gi replica holds the mixed example.
        node_kwargs={
            "sharing": "time-slicing",
            "replicas": 4,
            "memory_mib": 81920,
            "product": "NVIDIA-A100-SXM4-80GB",
            "extra_labels": POOL,
        },
    )
    node.start()
    try:
        yield node
    finally:
        node.stop()


DP_POOL = {"cotrain.test/pool": "e2e-dp"}


@pytest.fixture(scope="module")
def dp_kubelet(
    cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalKubelet]:
    """A node with eight whole GPUs, for data-parallel members' replica pods."""
    node = LocalKubelet(
        cluster,
        "e2e-dp",
        tmp_path_factory.mktemp("dp-kubelet"),
        node_kwargs={
            "count": 8,
            "memory_mib": 81920,
            "product": "NVIDIA-A100-SXM4-80GB",
            "extra_labels": DP_POOL,
        },
    )
    node.start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
def namespace_prefix() -> str:
    return "e"


@pytest.fixture
def e2e_job() -> Callable[..., JobBuilder]:
    """A small mixed job for the local node: real training, few steps."""

    def build(name: str, steps: int = 40) -> JobBuilder:
        builder = a_job(name).placement(nodeSelector=POOL).sharing(mode="TimeSlicing")
        builder.member(0, steps=steps, batchSize=64).member(1, steps=steps, batchSize=64)
        return builder

    return build


@pytest.fixture
def examples_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "examples"
