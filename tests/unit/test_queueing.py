"""The decision for a job queued with Kueue: the Workload it owns asks for exactly what its pods
request, the job has no pods until the Workload is admitted, the admitted ResourceFlavors reach
the pods, an eviction stops them and hands the quota back, the end releases it. Kueue's answers
on the Workload are written here by the test; tests/node/test_kueue.py runs the real Kueue."""

from __future__ import annotations

import json
from collections import Counter
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cotrain_operator.api.quantity import parse_quantity
from cotrain_operator.api.validation import InvalidJobError, parse_job
from cotrain_operator.reconcile.queueing import Flavor, KueueObjects
from tests.fixtures.cluster_state import ClusterState
from tests.fixtures.jobs import a_job
from tests.fixtures.nodes import gpu_node
from tests.fixtures.spec_strategies import job_documents

TIME_SLICED = gpu_node("gpu-a", sharing="time-slicing", replicas=4, memory_mib=24576)
KUEUE = KueueObjects(
    flavors={
        "l4": Flavor({"nvidia.com/gpu.product": "NVIDIA-L4"},
                     ({"key": "team", "operator": "Exists"},)),
        "a100": Flavor({"nvidia.com/gpu.product": "NVIDIA-A100"}),
    },
    priorities={"high": 1000, "low": 10},
)  # fmt: skip


def queued(builder: Any = None, queue: str = "team-a", **labels: str) -> dict[str, Any]:
    document: dict[str, Any] = (builder or a_job()).build()
    document["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": queue, **labels}
    return document


def _requests(resources: dict[str, Any]) -> Counter[str]:
    """What Kueue charges for one container: its requests, a limit without a request for the
    rest (extended resources are given as limits)."""
    asked = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
    return Counter({k: parse_quantity(v) for k, v in asked.items()})


def charged(workload: dict[str, Any]) -> Counter[str]:
    total: Counter[str] = Counter()
    for pod_set in workload["spec"]["podSets"]:
        for container in pod_set["template"]["spec"]["containers"]:
            for resource, amount in _requests(container["resources"]).items():
                total[resource] += amount * pod_set["count"]
    return total


def requested(pods: dict[str, dict[str, Any]]) -> Counter[str]:
    total: Counter[str] = Counter()
    for pod in pods.values():
        for container in pod["spec"]["containers"]:
            total.update(_requests(container["resources"]))
    return total


def test_without_kueue_a_queued_job_is_held_and_says_how_to_queue_it() -> None:
    cluster = ClusterState(queued(), TIME_SLICED)
    cluster.settle()
    assert cluster.pods == {}
    assert cluster.workload is None
    assert cluster.status["phase"] == "Suspended"
    admitted = cluster.condition("Admitted")
    assert admitted["status"] == "False"
    assert admitted["reason"] == "KueueNotEnabled"
    assert "deploy/components/kueue" in admitted["message"]


def test_a_queued_job_has_no_pods_until_admitted_and_says_where_it_waits() -> None:
    cluster = ClusterState(queued(), TIME_SLICED, kueue=KUEUE)
    cluster.settle()
    assert cluster.pods == {}
    assert cluster.workload is not None
    workload = cluster.workload
    assert workload["spec"]["queueName"] == "team-a"
    assert workload["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert workload["metadata"]["labels"]["cotrain.dev/job"] == "demo"
    assert cluster.status["phase"] == "Suspended"
    assert cluster.condition("Admitted")["reason"] == "Queued"
    assert "waiting in LocalQueue team-a" in cluster.condition("Admitted")["message"]
    # On its way for GitOps tools (kstatus InProgress), unlike a job suspended by its spec.
    assert cluster.condition("Reconciling")["status"] == "True"
    assert cluster.condition("Stalled")["status"] == "False"

    cluster.kueue_refuse("couldn't assign flavors to pod set gpu: insufficient quota for cpu")
    cluster.settle()
    message = cluster.condition("Admitted")["message"]
    assert "LocalQueue team-a" in message
    assert "insufficient quota for cpu" in message
    assert cluster.pods == {}
    assert cluster.workloads_created == 1  # one Workload, however often it is reconciled


@pytest.mark.parametrize(
    ("mode", "node", "resource"),
    [
        ("Exclusive", gpu_node("gpu-a", count=2), "nvidia.com/gpu"),
        ("TimeSlicing", TIME_SLICED, "nvidia.com/gpu"),
        ("TimeSlicing", gpu_node("gpu-a", sharing="time-slicing", replicas=4, renamed=True),
         "nvidia.com/gpu.shared"),
        ("MPS", gpu_node("gpu-a", sharing="mps", replicas=2, renamed=True),
         "nvidia.com/gpu.shared"),
        ("MIG", gpu_node("gpu-a", mig={"1g.10gb": (7, 9856)}), "nvidia.com/mig-1g.10gb"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("strategy", ["SameGPU", "PodPerMember"])
def test_the_workload_charges_exactly_what_the_pods_request(
    mode: str, node: dict[str, Any], resource: str, strategy: str
) -> None:
    builder = a_job().sharing(mode=mode).placement(strategy=strategy)
    if mode == "MIG":
        builder.sharing(migProfile="1g.10gb")
    builder.member(0, resources={"requests": {"cpu": "1500m", "memory": "3Gi"}})
    builder.member(1, resources={"requests": {"cpu": "1", "memory": "1Gi"}})
    cluster = ClusterState(queued(builder), node, kueue=KUEUE)
    cluster.settle()
    assert cluster.workload is not None
    charge = charged(cluster.workload)
    pods = 1 if strategy == "SameGPU" else 2
    assert charge[resource] == pods  # one unit of the share per pod, never a fraction of it
    assert charge["cpu"] == Decimal("2.5")
    assert charge["memory"] == 4 * 2**30
    sets = cluster.workload["spec"]["podSets"]
    assert len(sets) == pods
    assert all(s["count"] == 1 for s in sets)
    cluster.kueue_admit({resource: "l4", "cpu": "l4", "memory": "l4"})
    cluster.settle()
    assert requested(cluster.pods) == charge


def test_a_members_replicas_are_one_pod_set_admitted_all_together() -> None:
    builder = a_job().placement(strategy="PodPerMember").sharing(mode="Exclusive")
    builder.member(1, replicas=3)
    cluster = ClusterState(queued(builder), gpu_node("gpu-a", count=4), kueue=KUEUE)
    cluster.settle()
    assert cluster.workload is not None
    sets = {s["name"]: s["count"] for s in cluster.workload["spec"]["podSets"]}
    assert sets == {"torch": 1, "tf": 3}
    cluster.kueue_admit({"nvidia.com/gpu": "l4"})
    cluster.settle()
    assert sorted(cluster.pods) == ["demo-tf-0-0", "demo-tf-1-0", "demo-tf-2-0", "demo-torch-0"]


def test_admission_puts_the_flavors_node_labels_and_tolerations_on_the_pods() -> None:
    cluster = ClusterState(queued(), TIME_SLICED, kueue=KUEUE)
    cluster.settle()
    cluster.kueue_admit({"nvidia.com/gpu": "l4"})
    cluster.settle()
    [pod] = cluster.pods.values()
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    assert {"key": "team", "operator": "Exists"} in pod["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"][
        "tolerations"
    ]
    assert cluster.condition("Admitted")["status"] == "True"


def test_admitted_to_a_flavor_no_node_has_the_job_says_so_and_makes_no_pod() -> None:
    cluster = ClusterState(queued(), TIME_SLICED, kueue=KUEUE)
    cluster.settle()
    cluster.kueue_admit({"nvidia.com/gpu": "a100"})
    cluster.settle()
    assert cluster.pods == {}
    schedulable = cluster.condition("Schedulable")
    assert schedulable["status"] == "False"
    assert "nvidia.com/gpu.product" in schedulable["message"]
    assert "NVIDIA-A100" in schedulable["message"]


def test_eviction_stops_the_pods_then_hands_the_quota_back_and_keeps_the_restarts() -> None:
    cluster = ClusterState(queued(a_job().run_policy(backoffLimit=3)), TIME_SLICED, kueue=KUEUE)
    cluster.settle()
    cluster.kueue_admit({"nvidia.com/gpu": "l4"})
    cluster.settle()
    cluster.run_pods()
    cluster.report("torch", phase="Running", restarts=1, step=5, totalSteps=20)
    cluster.settle()
    assert cluster.status["phase"] == "Running"

    cluster.kueue_evict("Preempted", "Preempted to accommodate a workload (UID: x) in cq")
    first = cluster.reconcile()
    assert first.delete_pods == ["demo-gpu-0"]
    assert first.workload_status == {}  # the quota stays reserved while the pods may still run
    cluster.settle()
    assert cluster.pods == {}
    assert cluster.workload is not None
    conditions = {c["type"]: c for c in cluster.workload["status"]["conditions"]}
    assert conditions["QuotaReserved"]["status"] == "False"
    assert conditions["QuotaReserved"]["reason"] == "Pending"
    assert conditions["Admitted"]["status"] == "False"
    assert conditions["Requeued"]["status"] == "True"
    assert conditions["Requeued"]["reason"] == "Preempted"
    assert "admission" not in cluster.workload["status"]
    assert cluster.status["phase"] == "Suspended"
    assert cluster.condition("Admitted")["reason"] == "Preempted"
    assert cluster.status["members"]["torch"]["restarts"] == 1

    cluster.kueue_admit({"nvidia.com/gpu": "l4"})
    cluster.settle()
    [pod] = cluster.pods.values()
    restarts = json.loads(pod["metadata"]["annotations"]["cotrain.dev/restarts"])
    assert restarts == {"torch": 1, "tf": 0}
    assert cluster.workloads_created == 1


def test_the_end_of_the_job_finishes_its_workload() -> None:
    cluster = ClusterState(queued(), TIME_SLICED, kueue=KUEUE)
    cluster.settle()
    cluster.kueue_admit({"nvidia.com/gpu": "l4"})
    cluster.settle()
    cluster.run_pods()
    cluster.report("torch", phase="Succeeded", step=20)
    cluster.report("tf", phase="Succeeded", step=20)
    cluster.end_pod("demo-gpu-0", 0)
    cluster.settle()
    assert cluster.status["phase"] == "Succeeded"
    assert cluster.workload is not None
    finished = {c["type"]: c for c in cluster.workload["status"]["conditions"]}["Finished"]
    assert finished["status"] == "True"
    assert finished["reason"] == "Succeeded"


def test_suspending_a_queued_job_takes_it_out_of_the_queue() -> None:
    document = queued()
    cluster = ClusterState(document, TIME_SLICED, kueue=KUEUE)
    cluster.settle()
    cluster.kueue_admit({"nvidia.com/gpu": "l4"})
    cluster.settle()
    assert cluster.pods
    cluster.job["spec"]["runPolicy"] = {"suspend": True}
    cluster.settle()
    assert cluster.pods == {}
    assert cluster.workload is None
    assert cluster.condition("Suspended")["reason"] == "Suspended"
    assert cluster.condition("Reconciling")["status"] == "False"
    cluster.job["spec"]["runPolicy"] = {"suspend": False}
    cluster.settle()
    assert cluster.workload is not None
    assert cluster.pods == {}


def test_a_job_changed_while_it_waits_queues_again_with_what_it_asks_now() -> None:
    cluster = ClusterState(queued(), TIME_SLICED, kueue=KUEUE)
    cluster.settle()
    cluster.job["spec"]["placement"]["strategy"] = "PodPerMember"
    cluster.settle()
    assert cluster.workloads_created == 2
    assert cluster.workload is not None
    assert len(cluster.workload["spec"]["podSets"]) == 2


def test_a_priority_class_label_sets_the_workloads_priority() -> None:
    labels = {"kueue.x-k8s.io/priority-class": "high"}
    cluster = ClusterState(queued(**labels), TIME_SLICED, kueue=KUEUE)
    cluster.settle()
    assert cluster.workload is not None
    assert cluster.workload["spec"]["priority"] == 1000
    assert cluster.workload["spec"]["priorityClassRef"] == {
        "group": "kueue.x-k8s.io",
        "kind": "WorkloadPriorityClass",
        "name": "high",
    }
    unknown = ClusterState(queued(**{"kueue.x-k8s.io/priority-class": "vip"}), TIME_SLICED,
                           kueue=KUEUE)  # fmt: skip
    unknown.settle()
    assert unknown.workload is None
    message = unknown.condition("Admitted")["message"]
    assert "WorkloadPriorityClass vip" in message
    assert "does not exist" in message


def test_the_most_members_a_job_may_have_fit_in_one_workloads_pod_sets() -> None:
    # The CRD allows 8 members and Kueue 8 pod sets; a member's replicas share one pod set.
    builder = a_job().placement(strategy="PodPerMember").sharing(mode="Exclusive").with_members(8)
    builder.member(0, replicas=2)
    cluster = ClusterState(queued(builder), gpu_node("gpu-a", count=16), kueue=KUEUE)
    cluster.settle()
    assert cluster.workload is not None, cluster.status
    assert len(cluster.workload["spec"]["podSets"]) == 8


NODES = [
    gpu_node("ts", sharing="time-slicing", replicas=4, memory_mib=81920),
    gpu_node("mps", sharing="mps", replicas=2, memory_mib=81920),
    gpu_node("x", count=8, memory_mib=81920),
    gpu_node("mig", mig={"1g.10gb": (7, 9856), "7g.80gb+me": (1, 80896)}),
]


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(document=job_documents())
def test_any_queued_job_is_charged_what_its_pods_request(document: dict[str, Any]) -> None:
    try:
        parse_job(document)
    except InvalidJobError:
        assume(False)
    document = json.loads(json.dumps(document))
    document["metadata"]["name"] = "fuzz"
    document["metadata"].pop("generateName", None)
    document["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "q"}
    cluster = ClusterState(document, *NODES, kueue=KUEUE)
    cluster.settle()
    assert cluster.pods == {}
    if cluster.workload is None:  # not queueable: it says why and holds
        assert cluster.status["phase"] == "Suspended"
        return
    # Kueue sums what each pod set's containers ask for, times its count: the same containers'
    # resources, as many times over, as the pods the admitted job creates.
    charge: Counter[str] = Counter()
    for pod_set in cluster.workload["spec"]["podSets"]:
        for container in pod_set["template"]["spec"]["containers"]:
            charge[json.dumps(container["resources"], sort_keys=True)] += pod_set["count"]
    resources = {r for key in charge for part in json.loads(key).values() for r in part}
    cluster.kueue = KueueObjects({"any": Flavor()}, KUEUE.priorities)
    cluster.kueue_admit({resource: "any" for resource in resources})
    cluster.settle()
    assert cluster.pods, cluster.status
    made = Counter(
        json.dumps(c["resources"], sort_keys=True)
        for pod in cluster.pods.values()
        for c in pod["spec"]["containers"]
    )
    assert made == charge


STATES = st.sampled_from([None, True, False])


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(
    reserved=STATES,
    admitted=STATES,
    evicted=STATES,
    running=st.booleans(),
    mode=st.sampled_from(["Exclusive", "Auto"]),
    strategy=st.sampled_from(["SameGPU", "PodPerMember"]),
)
def test_a_queued_job_has_pods_only_while_kueue_admits_it(
    reserved: bool | None,
    admitted: bool | None,
    evicted: bool | None,
    running: bool,
    mode: str,
    strategy: str,
) -> None:
    """Whatever Kueue's conditions on the Workload, pods are made only while it is Admitted and
    not Evicted, and the quota is handed back only once no pod of the job runs."""
    builder = a_job().sharing(mode=mode).placement(strategy=strategy)
    cluster = ClusterState(queued(builder), gpu_node("gpu-a", count=4), kueue=KUEUE)
    cluster.settle()
    cluster.kueue_admit({"nvidia.com/gpu": "l4"})
    cluster.settle()
    if running:
        cluster.run_pods()
    assert cluster.workload is not None
    conditions = cluster.workload["status"]["conditions"]
    conditions[:] = [
        c for c in conditions if c["type"] not in ("QuotaReserved", "Admitted", "Evicted")
    ]
    for kind, state in (("QuotaReserved", reserved), ("Admitted", admitted), ("Evicted", evicted)):
        if state is not None:
            cluster._workload_condition(kind, state, "Test", "set by the test")
    first = cluster.reconcile()
    if evicted is True and reserved is True:
        # Handed back only once no pod of the job is left: not in the round that deletes them.
        assert "admission" not in first.workload_status
    cluster.settle()
    may_run = admitted is True and evicted is not True
    if not may_run:
        assert [c for c in first.create if c["kind"] == "Pod"] == []
        assert cluster.pods == {}  # every pod it had is deleted
        assert cluster.status["phase"] == "Suspended"
    else:
        assert cluster.pods
    released = "admission" not in cluster.workload["status"]
    assert released == (evicted is True and reserved is True)
