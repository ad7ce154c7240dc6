"""Data-parallel members: replica pods with stable names, their topology, gangs."""

from __future__ import annotations

import json

from cotrain_operator.api.contract import PodPlan
from cotrain_operator.api.models import SharingMode
from cotrain_operator.reconcile.placement import Unschedulable, place
from cotrain_operator.sharing import parse_node
from tests.fixtures.cluster_state import ClusterState
from tests.fixtures.jobs import JobBuilder, a_job
from tests.fixtures.nodes import gpu_node

NODE = gpu_node("gpu-a", count=8)


def distributed() -> JobBuilder:
    return (
        a_job("dp")
        .sharing(mode="Exclusive")
        .placement(strategy="PodPerMember")
        .member(0, replicas=2)
        .gpu(0, count=2)
        .member(1, replicas=2)
    )


def plan_of(pod: dict) -> PodPlan:  # type: ignore[type-arg]
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    return PodPlan.model_validate_json(env["COTRAIN_POD_PLAN"])


def test_each_replica_is_a_pod_with_a_stable_name_and_its_topology() -> None:
    cluster = ClusterState(distributed().build(), NODE)
    cluster.settle()
    assert sorted(cluster.pods) == ["dp-tf-0-0", "dp-tf-1-0", "dp-torch-0-0", "dp-torch-1-0"]
    pod = cluster.pods["dp-torch-1-0"]
    assert pod["spec"]["hostname"] == "torch-1"
    assert pod["spec"]["subdomain"] == "dp-torch"
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    topology = plan_of(pod).topology["torch"]
    assert topology.replicas == 2
    assert topology.procs_per_replica == 2  # PyTorch: a process per device
    assert topology.world_size == 4
    assert topology.replica_indices == [1]
    assert topology.master_addr == "torch-0.dp-torch.default.svc"
    tf = plan_of(cluster.pods["dp-tf-0-0"]).topology["tf"]
    assert tf.procs_per_replica == 1  # TensorFlow: one worker mirrors over its devices
    assert tf.worker_hosts == ["tf-0.dp-tf.default.svc:2222", "tf-1.dp-tf.default.svc:2223"]


def test_each_replicated_member_gets_a_headless_service() -> None:
    cluster = ClusterState(distributed().build(), NODE)
    cluster.settle()
    service = cluster.others[("Service", "dp-torch")]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"cotrain.dev/job": "dp", "cotrain.dev/member": "torch"}
    assert ("Service", "dp-tf") in cluster.others


def test_a_gang_that_cannot_start_at_once_is_unschedulable() -> None:
    job = distributed().build()
    small = parse_node(gpu_node("small", count=3))  # torch's gang wants 2 replicas x 2 GPUs
    assert small is not None
    from cotrain_operator.api import parse_job

    result = place(parse_job(job), [small])
    assert isinstance(result, Unschedulable)
    assert "member torch needs 4 GPU share(s) at once for its 2 replicas" in result.message
    big = parse_node(gpu_node("big", count=8))
    assert big is not None
    assert not isinstance(place(parse_job(job), [big]), Unschedulable)
    two_devices = parse_node(gpu_node("pair", count=2))
    assert two_devices is not None
    lonely = a_job().sharing(mode="Exclusive").placement(strategy="PodPerMember").gpu(0, count=4)
    refused = place(parse_job(lonely.build()), [two_devices])
    assert isinstance(refused, Unschedulable)
    assert "fewer than the 4 one pod asks for" in refused.message


def test_one_replica_crashing_restarts_the_whole_member_once() -> None:
    cluster = ClusterState(distributed().run_policy(backoffLimit=1).build(), NODE)
    cluster.settle()
    cluster.run_pods()
    cluster.settle()
    assert cluster.status["phase"] == "Running"
    cluster.end_pod("dp-torch-1-0", 137, "OOMKilled")
    cluster.settle()
    assert "dp-torch-0-0" not in cluster.pods  # its partner was stopped
    assert {"dp-torch-0-1", "dp-torch-1-1"} <= set(cluster.pods)
    assert {"dp-tf-0-0", "dp-tf-1-0"} <= set(cluster.pods)  # the other member is untouched
    restarts = json.loads(
        cluster.pods["dp-torch-0-1"]["metadata"]["annotations"]["cotrain.dev/restarts"]
    )
    assert restarts == {"torch": 1}
    assert cluster.status["members"]["torch"]["restarts"] == 1
    cluster.run_pods()
    cluster.end_pod("dp-torch-0-1", 1)
    cluster.settle()
    assert cluster.status["phase"] == "Failed"
    assert cluster.status["members"]["torch"]["reason"] == "BackoffLimitExceeded"
    assert not any(
        p["status"]["phase"] == "Running"
        for n, p in cluster.pods.items()
        if n.startswith("dp-torch")
    )


def test_replicas_succeed_together() -> None:
    cluster = ClusterState(distributed().build(), NODE)
    cluster.settle()
    cluster.run_pods()
    cluster.report("torch", phase="Succeeded", step=10, totalSteps=10)
    cluster.report("tf", phase="Succeeded", step=10, totalSteps=10)
    for name in list(cluster.pods):
        cluster.end_pod(name, 0)
    cluster.settle()
    assert cluster.status["phase"] == "Succeeded"
    assert cluster.status["readyMembers"] == "2/2"


def test_auto_gives_whole_devices_for_gpu_count() -> None:
    from cotrain_operator.api import parse_job

    job = a_job().sharing(mode="Auto").placement(strategy="PodPerMember").gpu(0, count=2)
    node = parse_node(gpu_node("a", count=4))
    assert node is not None
    result = place(parse_job(job.build()), [node])
    assert not isinstance(result, Unschedulable)
    assert result.mode == SharingMode.EXCLUSIVE
