"""The operator under stress: killed mid-reconcile, API faults (500s, 409s), dropped watches.

Each test runs its own operator, as the deploy/ ServiceAccount, through a fault-injecting proxy
in front of the real API server, over namespaces starting with "r".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.controlplane.cluster import ControlPlane
from tests.fixtures.faultproxy import FaultProxy, running_proxy, write_proxy_kubeconfig
from tests.fixtures.jobs import JobBuilder
from tests.fixtures.kube import Kube, wait_for
from tests.fixtures.operator_process import OperatorProcess


@pytest.fixture
def namespace_prefix() -> str:
    return "r"


@pytest.fixture
def proxy(cluster: ControlPlane) -> Iterator[FaultProxy]:
    with running_proxy(cluster.server, cluster.ca_file) as running:
        yield running


@pytest.fixture
def proxied_operator(
    cluster: ControlPlane, proxy: FaultProxy, namespace: str, tmp_path: Path
) -> Iterator[OperatorProcess]:
    token = cluster.service_account_token(
        "cotrain-system", "cotrain-operator", create=False, duration="2h"
    )
    kubeconfig = write_proxy_kubeconfig(tmp_path / "operator.kubeconfig", proxy, token)
    with OperatorProcess(kubeconfig, tmp_path / "logs", namespace=namespace) as process:
        yield process


# Fault handling must hold every time, not once by luck: each fault test runs three times.
REPEAT = pytest.mark.parametrize("attempt", [1, 2, 3])


def _children(kube: Kube, namespace: str) -> dict[str, int]:
    """The pods, and the namespace's trainer ServiceAccounts and RoleBindings."""
    trainer = "metadata.name=cotrain-trainer"
    return {
        "pods": len(kube.core.list_namespaced_pod(namespace).items),
        "serviceaccounts": len(
            kube.core.list_namespaced_service_account(namespace, field_selector=trainer).items
        ),
        "rolebindings": len(
            kube.rbac.list_namespaced_role_binding(namespace, field_selector=trainer).items
        ),
    }


@REPEAT
def test_operator_killed_mid_reconcile_duplicates_nothing(
    attempt: int,
    kube: Kube,
    namespace: str,
    make_node: Callable[..., str],
    job: Callable[[str], JobBuilder],
    proxied_operator: OperatorProcess,
    proxy: FaultProxy,
) -> None:
    node = make_node(sharing="time-slicing", replicas=8)
    names = [f"j{i}" for i in range(6)]
    for name in names:
        kube.create_job(namespace, job(name).build())
    # Kill it as soon as it has begun creating children (the namespace's trainer identity comes
    # first), then start it again.
    wait_for(
        "first create",
        lambda: proxy.requests("POST", "/serviceaccounts$"),
        timeout=30,
        interval=0.01,
    )
    proxied_operator.kill()
    proxied_operator.start()
    for name in names:
        wait_for(
            f"{name} pending",
            lambda n=name: (
                kube.job_status(namespace, n).get("phase") == "Pending"
                and kube.pod_names(namespace, n)
            ),
        )
    assert _children(kube, namespace) == {"pods": 6, "serviceaccounts": 1, "rolebindings": 1}
    for name in names:
        assert kube.pod_names(namespace, name) == [f"{name}-gpu-0"]
    # And the second run carries on from the first: the jobs still run to the end.
    kube.run_pod(namespace, "j0-gpu-0", node)
    kube.wait_phase(namespace, "j0", "Running")
    proxied_operator.kill()
    proxied_operator.start()
    kube.set_pod_phase(namespace, "j0-gpu-0", "Succeeded", 0)
    status = kube.wait_phase(namespace, "j0", "Succeeded")
    assert status["startTime"]
    assert _children(kube, namespace) == {"pods": 6, "serviceaccounts": 1, "rolebindings": 1}


@REPEAT
def test_server_errors_and_conflicts_are_retried(
    attempt: int,
    kube: Kube,
    namespace: str,
    make_node: Callable[..., str],
    job: Callable[[str], JobBuilder],
    proxied_operator: OperatorProcess,
    proxy: FaultProxy,
) -> None:
    node = make_node(sharing="time-slicing", replicas=4)
    pod_500 = proxy.fail("POST", rf"/namespaces/{namespace}/pods$", 500, times=2)
    status_409 = proxy.fail("PATCH", r"/cotrainjobs/faulty/status$", 409, times=3)
    kube.create_job(namespace, job("faulty").build())
    wait_for(
        "pod despite 500s",
        lambda: kube.pod_names(namespace, "faulty") == ["faulty-gpu-0"],
        timeout=60,
    )
    kube.wait_phase(namespace, "faulty", "Pending", timeout=60)
    assert pod_500.hits == 2
    assert status_409.hits == 3
    kube.run_pod(namespace, "faulty-gpu-0", node)
    kube.set_pod_phase(namespace, "faulty-gpu-0", "Succeeded", 0)
    kube.wait_phase(namespace, "faulty", "Succeeded", timeout=60)
    metrics = proxied_operator.metrics()
    assert 'cotrain_reconcile_errors_total{kind="conflict"}' in metrics
    assert 'cotrain_reconcile_errors_total{kind="http500"}' in metrics
    assert kube.pod_names(namespace, "faulty") == ["faulty-gpu-0"]


@REPEAT
def test_dropped_watches_do_not_lose_events(
    attempt: int,
    kube: Kube,
    namespace: str,
    make_node: Callable[..., str],
    job: Callable[[str], JobBuilder],
    proxied_operator: OperatorProcess,
    proxy: FaultProxy,
) -> None:
    node = make_node(sharing="time-slicing", replicas=4)
    kube.create_job(namespace, job("watchy").build())
    wait_for("pod", lambda: kube.pod_names(namespace, "watchy"))
    for _ in range(3):
        # Cut the watches once the operator holds them again (it reconnects after a backoff).
        wait_for("open watches", proxy.open_watches, timeout=30)
        assert proxy.drop_watches() >= 1
    kube.run_pod(namespace, "watchy-gpu-0", node)
    kube.wait_phase(namespace, "watchy", "Running", timeout=60)
    proxy.drop_watches()
    kube.set_pod_phase(namespace, "watchy-gpu-0", "Succeeded", 0)
    kube.wait_phase(namespace, "watchy", "Succeeded", timeout=60)


def test_a_namespaces_trainer_identity_is_made_once_and_again_when_deleted(
    kube: Kube,
    namespace: str,
    make_node: Callable[..., str],
    job: Callable[[str], JobBuilder],
    proxied_operator: OperatorProcess,
    proxy: FaultProxy,
) -> None:
    make_node(sharing="time-slicing", replicas=16)
    names = [f"b{i}" for i in range(8)]
    for name in names:
        kube.create_job(namespace, job(name).build())
    for name in names:
        wait_for(f"{name}'s pod", lambda n=name: kube.pod_names(namespace, n))
    # A burst of jobs in a new namespace: one creation of its identity, which they all await.
    assert len(proxy.requests("POST", rf"/namespaces/{namespace}/serviceaccounts$")) == 1
    assert len(proxy.requests("POST", rf"/namespaces/{namespace}/rolebindings$")) == 1

    # Someone deletes the ServiceAccount: the next pod is refused by the API server, and the
    # operator makes the identity again instead of retrying the pod forever.
    kube.core.delete_namespaced_service_account("cotrain-trainer", namespace)
    kube.create_job(namespace, job("after").build())
    wait_for("the pod after", lambda: kube.pod_names(namespace, "after"), timeout=60)
    refused = [
        r for r in proxy.requests("POST", rf"/namespaces/{namespace}/pods$") if r.status >= 400
    ]
    assert [r.status for r in refused] == [403]
    assert len(proxy.requests("POST", rf"/namespaces/{namespace}/serviceaccounts$")) == 2
    assert _children(kube, namespace) == {"pods": 9, "serviceaccounts": 1, "rolebindings": 1}
