"""Kueue-style admission against the real operator and API server: `spec.runPolicy.suspend` is the
gate (docs/kueue.md).

There is no Kueue here: the tests do what its job integration does to a workload it manages.
A queued job is created suspended with a `kueue.x-k8s.io/queue-name` label; admission clears
suspend and injects the ResourceFlavor's node labels into the node selector; preemption sets
suspend again and takes the injected labels back out.
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
FLAVOR_LABEL = "cloud.example.com/gpu-flavor"
HOLD_SECONDS = 3.0


def queued(builder: JobBuilder, queue: str = "team-a") -> dict[str, Any]:
    """A job as a user submits it to a Kueue LocalQueue: labelled and suspended."""
    document = builder.run_policy(suspend=True).build()
    document["metadata"]["labels"] = {QUEUE_LABEL: queue}
    return document


def hold_without_pods(kube: Kube, namespace: str, name: str) -> None:
    """For a few seconds the suspended job has no pod, not even a terminating one."""
    deadline = time.monotonic() + HOLD_SECONDS
    while time.monotonic() < deadline:
        assert kube.pods(namespace, name) == []
        time.sleep(0.25)


def assert_nothing_created(kube: Kube, namespace: str, name: str) -> None:
    """A job never admitted has no pod, and the (fresh) namespace no trainer identity either: a
    queue costs the cluster nothing."""
    assert kube.pods(namespace, name) == []
    with pytest.raises(ApiException) as missing:
        kube.core.read_namespaced_service_account("cotrain-trainer", namespace)
    assert missing.value.status == 404


def admit(kube: Kube, namespace: str, name: str, node_labels: dict[str, str] | None = None) -> None:
    """What Kueue does on admission: clear suspend, add the flavor's nodeLabels to the selector."""
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


def test_a_queued_job_waits_without_pods_until_admitted(
    kube: Kube, namespace: str, make_node: Callable[..., str], job: Callable[[str], JobBuilder]
) -> None:
    make_node(sharing="time-slicing", replicas=4, renamed=True)
    kube.create_job(namespace, queued(job("queued")))

    status = kube.wait_phase(namespace, "queued", "Suspended")
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Suspended"]["status"] == "True"
    assert conditions["Admitted"]["status"] == "False"
    assert "startTime" not in status
    hold_without_pods(kube, namespace, "queued")
    assert_nothing_created(kube, namespace, "queued")

    admit(kube, namespace, "queued")
    names = wait_for("the pod", lambda: kube.pod_names(namespace, "queued"))
    assert names == ["queued-gpu-0"]
    status = kube.wait_phase(namespace, "queued", "Pending")
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Admitted"]["status"] == "True"
    assert conditions["Suspended"]["status"] == "False"
    assert status["startTime"]
    # The quota Kueue would have charged: one unit of the share resource for the pod.
    (container,) = kube.pods(namespace, "queued")[0]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu.shared"] == "1"


def test_admission_to_a_flavor_pins_the_pod_to_that_flavors_nodes(
    kube: Kube, namespace: str, make_node: Callable[..., str], job: Callable[[str], JobBuilder]
) -> None:
    make_node(sharing="time-slicing", replicas=4)
    flavored = make_node(
        sharing="time-slicing", replicas=4, extra_labels={FLAVOR_LABEL: "l4-shared"}
    )
    kube.create_job(namespace, queued(job("flavored")))
    kube.wait_phase(namespace, "flavored", "Suspended")
    hold_without_pods(kube, namespace, "flavored")
    assert_nothing_created(kube, namespace, "flavored")

    admit(kube, namespace, "flavored", {FLAVOR_LABEL: "l4-shared"})
    wait_for("the pod", lambda: kube.pod_names(namespace, "flavored"))
    (pod,) = kube.pods(namespace, "flavored")
    assert hostnames(pod) == [flavored]
    # The flavor's label joined the test pool's selector; it did not replace it.
    selector = kube.job(namespace, "flavored")["spec"]["placement"]["nodeSelector"]
    assert selector == {"cotrain.test/pool": namespace, FLAVOR_LABEL: "l4-shared"}


def test_preemption_suspends_the_job_and_readmission_moves_it_to_the_new_flavor(
    kube: Kube, namespace: str, make_node: Callable[..., str], job: Callable[[str], JobBuilder]
) -> None:
    first = make_node(sharing="time-slicing", replicas=4, extra_labels={FLAVOR_LABEL: "a"})
    second = make_node(sharing="time-slicing", replicas=4, extra_labels={FLAVOR_LABEL: "b"})
    kube.create_job(namespace, queued(job("moved")))
    kube.wait_phase(namespace, "moved", "Suspended")
    admit(kube, namespace, "moved", {FLAVOR_LABEL: "a"})
    wait_for("the pod on flavor a", lambda: kube.pod_names(namespace, "moved"))
    kube.run_pod(namespace, "moved-gpu-0", first)
    kube.wait_phase(namespace, "moved", "Running")

    # Preemption: suspend again, and restore the selector as it was before admission.
    restore = {"nodeSelector": {FLAVOR_LABEL: None}}
    kube.patch_job(
        namespace, "moved", {"spec": {"runPolicy": {"suspend": True}, "placement": restore}}
    )
    kube.wait_phase(namespace, "moved", "Suspended")
    wait_for("the pod gone", lambda: kube.pod_names(namespace, "moved") == [])
    kube.finish_deletions(namespace)  # the kubelet's part
    hold_without_pods(kube, namespace, "moved")

    admit(kube, namespace, "moved", {FLAVOR_LABEL: "b"})
    wait_for("the pod on flavor b", lambda: kube.pod_names(namespace, "moved"))
    (pod,) = kube.pods(namespace, "moved")
    assert hostnames(pod) == [second]
    kube.wait_phase(namespace, "moved", "Pending")


def test_a_suspended_job_with_no_node_for_its_flavor_waits_unschedulable(
    kube: Kube, namespace: str, make_node: Callable[..., str], job: Callable[[str], JobBuilder]
) -> None:
    """An admission to a flavor no node carries is visible, and creates nothing."""
    make_node(sharing="time-slicing", replicas=4)
    kube.create_job(namespace, queued(job("nowhere")))
    kube.wait_phase(namespace, "nowhere", "Suspended")
    admit(kube, namespace, "nowhere", {FLAVOR_LABEL: "missing"})
    condition = wait_for(
        "Schedulable=False",
        lambda: (
            (c := kube.condition(namespace, "nowhere", "Schedulable"))
            and c["status"] == "False"
            and c
        ),
    )
    assert FLAVOR_LABEL in condition["message"]
    assert kube.pod_names(namespace, "nowhere") == []
