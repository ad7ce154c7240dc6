"""`spec.runPolicy.suspend` against the real operator and API server: the gate a person, a CI
step or a workflow engine holds. A suspended job has no pods and costs the namespace nothing;
resuming it places it (with a nodeSelector that may have changed meanwhile); suspending it again
stops its pods and keeps its restart counts.

Queueing with Kueue is not this gate: a job labelled `kueue.x-k8s.io/queue-name` waits for
Kueue to admit its Workload (tests/node/test_kueue.py, with the real Kueue). Under an operator
that does not queue with Kueue, such a job is held and says how to queue it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from tests.fixtures.jobs import JobBuilder
from tests.fixtures.kube import Kube, wait_for

pytestmark = pytest.mark.usefixtures("operator")

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
POOL_LABEL = "cloud.example.com/gpu-pool"
HOLD_SECONDS = 3.0


def suspended(builder: JobBuilder) -> dict[str, Any]:
    return builder.run_policy(suspend=True).build()


def hold_without_pods(kube: Kube, namespace: str, name: str) -> None:
    """For a few seconds the suspended job has no pod, not even a terminating one."""
    deadline = time.monotonic() + HOLD_SECONDS
    while time.monotonic() < deadline:
        assert kube.pods(namespace, name) == []
        time.sleep(0.25)


def assert_nothing_created(kube: Kube, namespace: str, name: str) -> None:
    """A job never resumed has no pod, and the (fresh) namespace no trainer identity either: a
    held job costs the cluster nothing."""
    assert kube.pods(namespace, name) == []
    with pytest.raises(ApiException) as missing:
        kube.core.read_namespaced_service_account("cotrain-trainer", namespace)
    assert missing.value.status == 404


def resume(
    kube: Kube, namespace: str, name: str, node_labels: dict[str, str] | None = None
) -> None:
    """Clear suspend, adding `node_labels` to the job's nodeSelector."""
    spec: dict[str, Any] = {"runPolicy": {"suspend": False}}
    if node_labels:
        spec["placement"] = {"nodeSelector": node_labels}
    kube.patch_job(namespace, name, {"spec": spec})


def hostnames(pod: dict[str, Any]) -> list[str]:
    affinity = pod["spec"]["affinity"]["nodeAffinity"]
    (term,) = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    (expression,) = term["matchExpressions"]
    assert expression["key"] == "kubernetes.io/hostname"
    return expression["values"]  # type: ignore[no-any-return]


def test_a_suspended_job_waits_without_pods_until_resumed(
    kube: Kube, namespace: str, make_node: Callable[..., str], job: Callable[[str], JobBuilder]
) -> None:
    make_node(sharing="time-slicing", replicas=4, renamed=True)
    kube.create_job(namespace, suspended(job("held")))

    status = kube.wait_phase(namespace, "held", "Suspended")
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Suspended"]["status"] == "True"
    assert conditions["Admitted"]["status"] == "False"
    assert "startTime" not in status
    hold_without_pods(kube, namespace, "held")
    assert_nothing_created(kube, namespace, "held")

    resume(kube, namespace, "held")
    names = wait_for("the pod", lambda: kube.pod_names(namespace, "held"))
    assert names == ["held-gpu-0"]
    status = kube.wait_phase(namespace, "held", "Pending")
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Admitted"]["status"] == "True"
    assert conditions["Suspended"]["status"] == "False"
    assert status["startTime"]
    (container,) = kube.pods(namespace, "held")[0]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu.shared"] == "1"


def test_a_selector_changed_while_suspended_pins_the_pod_to_those_nodes(
    kube: Kube, namespace: str, make_node: Callable[..., str], job: Callable[[str], JobBuilder]
) -> None:
    make_node(sharing="time-slicing", replicas=4)
    flavored = make_node(sharing="time-slicing", replicas=4, extra_labels={POOL_LABEL: "l4-shared"})
    kube.create_job(namespace, suspended(job("flavored")))
    kube.wait_phase(namespace, "flavored", "Suspended")
    hold_without_pods(kube, namespace, "flavored")
    assert_nothing_created(kube, namespace, "flavored")

    resume(kube, namespace, "flavored", {POOL_LABEL: "l4-shared"})
    wait_for("the pod", lambda: kube.pod_names(namespace, "flavored"))
    (pod,) = kube.pods(namespace, "flavored")
    assert hostnames(pod) == [flavored]
    # The label joined the test pool's selector; it did not replace it.
    selector = kube.job(namespace, "flavored")["spec"]["placement"]["nodeSelector"]
    assert selector == {"cotrain.test/pool": namespace, POOL_LABEL: "l4-shared"}


def test_suspending_again_stops_the_pods_and_resuming_moves_them_to_the_new_selector(
    kube: Kube, namespace: str, make_node: Callable[..., str], job: Callable[[str], JobBuilder]
) -> None:
    first = make_node(sharing="time-slicing", replicas=4, extra_labels={POOL_LABEL: "a"})
    second = make_node(sharing="time-slicing", replicas=4, extra_labels={POOL_LABEL: "b"})
    kube.create_job(namespace, suspended(job("moved")))
    kube.wait_phase(namespace, "moved", "Suspended")
    resume(kube, namespace, "moved", {POOL_LABEL: "a"})
    wait_for("the pod on flavor a", lambda: kube.pod_names(namespace, "moved"))
    kube.run_pod(namespace, "moved-gpu-0", first)
    kube.wait_phase(namespace, "moved", "Running")

    # Suspend again, and take the label back out of the selector.
    restore = {"nodeSelector": {POOL_LABEL: None}}
    kube.patch_job(
        namespace, "moved", {"spec": {"runPolicy": {"suspend": True}, "placement": restore}}
    )
    kube.wait_phase(namespace, "moved", "Suspended")
    wait_for("the pod gone", lambda: kube.pod_names(namespace, "moved") == [])
    kube.finish_deletions(namespace)  # the kubelet's part
    hold_without_pods(kube, namespace, "moved")

    resume(kube, namespace, "moved", {POOL_LABEL: "b"})
    wait_for("the pod on flavor b", lambda: kube.pod_names(namespace, "moved"))
    (pod,) = kube.pods(namespace, "moved")
    assert hostnames(pod) == [second]
    kube.wait_phase(namespace, "moved", "Pending")


def test_a_job_resumed_to_a_selector_no_node_has_waits_unschedulable(
    kube: Kube, namespace: str, make_node: Callable[..., str], job: Callable[[str], JobBuilder]
) -> None:
    """Resumed with a selector no node matches: visible, and nothing is created."""
    make_node(sharing="time-slicing", replicas=4)
    kube.create_job(namespace, suspended(job("nowhere")))
    kube.wait_phase(namespace, "nowhere", "Suspended")
    resume(kube, namespace, "nowhere", {POOL_LABEL: "missing"})
    condition = wait_for(
        "Schedulable=False",
        lambda: (
            (c := kube.condition(namespace, "nowhere", "Schedulable"))
            and c["status"] == "False"
            and c
        ),
    )
    assert POOL_LABEL in condition["message"]
    assert kube.pod_names(namespace, "nowhere") == []


def test_a_job_labelled_with_a_queue_is_held_by_an_operator_that_does_not_queue(
    kube: Kube, namespace: str, make_node: Callable[..., str], job: Callable[[str], JobBuilder]
) -> None:
    make_node(sharing="time-slicing", replicas=4)
    document = job("labelled").build()
    document["metadata"]["labels"] = {QUEUE_LABEL: "team-a"}
    kube.create_job(namespace, document)
    kube.wait_phase(namespace, "labelled", "Suspended")
    admitted = kube.condition(namespace, "labelled", "Admitted")
    assert admitted["status"] == "False"
    assert admitted["reason"] == "KueueNotEnabled"
    assert "deploy/components/kueue" in admitted["message"]
    hold_without_pods(kube, namespace, "labelled")
    assert_nothing_created(kube, namespace, "labelled")
