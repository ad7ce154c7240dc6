"""Component fixtures: our CRD and RBAC in the real API server, the real operator, test nodes."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.controlplane.cluster import ControlPlane
from tests.fixtures.jobs import JobBuilder, a_job
from tests.fixtures.kube import Kube
from tests.fixtures.nodes import gpu_node
from tests.fixtures.operator_process import OperatorProcess

ROOT = Path(__file__).resolve().parents[2]
_names = itertools.count()


@pytest.fixture(scope="session")
def cluster(control_plane: ControlPlane) -> ControlPlane:
    """The control plane with our CRD established and deploy/'s RBAC applied."""
    control_plane.kubectl("apply", "--server-side", "-k", str(ROOT / "crds"))
    control_plane.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/cotrainjobs.cotrain.dev",
    )
    control_plane.kubectl(
        "apply",
        "--server-side",
        "-f",
        str(ROOT / "deploy" / "base" / "namespace.yaml"),
        "-f",
        str(ROOT / "deploy" / "base" / "rbac.yaml"),
    )
    return control_plane


@pytest.fixture(scope="session")
def kube(cluster: ControlPlane) -> Iterator[Kube]:
    api = cluster.api_client()
    try:
        yield Kube(api)
    finally:
        api.close()


@pytest.fixture(scope="session")
def operator_kubeconfig(cluster: ControlPlane) -> Path:
    """Credentials of the operator's own ServiceAccount (deploy/base/rbac.yaml)."""
    return cluster.service_account_kubeconfig(
        "cotrain-system", "cotrain-operator", create=False, duration="24h"
    )


@pytest.fixture(scope="session")
def operator(
    operator_kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    # Namespaces of the lifecycle tests start with "t"; resilience tests run operators of their
    # own over namespaces starting with "r", so no two operators ever reconcile one job.
    process = OperatorProcess(
        operator_kubeconfig, tmp_path_factory.mktemp("operator"), namespace="t*"
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()


NAMESPACE_PREFIX = "t"


@pytest.fixture
def namespace_prefix() -> str:
    return NAMESPACE_PREFIX


@pytest.fixture
def namespace(cluster: ControlPlane, namespace_prefix: str) -> Iterator[str]:
    name = f"{namespace_prefix}{next(_names)}-{id(cluster) % 10000}"
    cluster.kubectl("create", "namespace", name)
    # The API server's PodSecurity admission then refuses any pod of ours that is not
    # "restricted": every test that makes pods checks the profile for real.
    cluster.kubectl(
        "label",
        "namespace",
        name,
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/enforce-version=latest",
    )
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def make_node(kube: Kube, namespace: str) -> Iterator[Callable[..., str]]:
    """Create GPU nodes in this test's own pool (jobs select it), deleted afterwards."""
    created: list[str] = []

    def make(**kwargs: Any) -> str:
        name = f"{namespace}-gpu-{len(created)}"
        labels = {"cotrain.test/pool": namespace, **kwargs.pop("extra_labels", {})}
        kube.create_node(gpu_node(name, extra_labels=labels, **kwargs))
        created.append(name)
        return name

    yield make
    for name in created:
        kube.delete_node(name)


@pytest.fixture
def job(namespace: str) -> Callable[[str], JobBuilder]:
    """A job builder already pointed at this test's node pool."""

    def build(name: str = "demo") -> JobBuilder:
        return a_job(name).placement(nodeSelector={"cotrain.test/pool": namespace})

    return build
