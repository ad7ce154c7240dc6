"""The objects a job owns: names, labels, owner references, least privilege, restricted pods."""

from __future__ import annotations

from typing import Any

import pytest

from cotrain_operator.api.models import CoTrainJobStatus
from cotrain_operator.reconcile.access import build_trainer_identity, render_trainer_access
from tests.fixtures.cluster_state import ClusterState
from tests.fixtures.jobs import a_job
from tests.fixtures.nodes import gpu_node

MODES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("Exclusive", {}, gpu_node("n")),
    ("TimeSlicing", {}, gpu_node("n", sharing="time-slicing", replicas=4, renamed=True)),
    ("MPS", {}, gpu_node("n", sharing="mps", replicas=2)),
    ("MIG", {"migProfile": "1g.10gb"}, gpu_node("n", mig={"1g.10gb": (7, 9984)})),
]


def children(mode: str, extra: dict[str, Any], node: dict[str, Any], strategy: str) -> ClusterState:
    builder = a_job("job").sharing(mode=mode, **extra).placement(strategy=strategy)
    cluster = ClusterState(builder.build(), node)
    cluster.settle()
    return cluster


@pytest.mark.parametrize(("mode", "extra", "node"), MODES, ids=[m[0] for m in MODES])
@pytest.mark.parametrize("strategy", ["SameGPU", "PodPerMember"])
def test_pods_meet_the_restricted_profile_and_request_their_share(
    mode: str, extra: dict[str, Any], node: dict[str, Any], strategy: str
) -> None:
    cluster = children(mode, extra, node, strategy)
    expected = {
        "Exclusive": "nvidia.com/gpu",
        "TimeSlicing": "nvidia.com/gpu.shared",
        "MPS": "nvidia.com/gpu",
        "MIG": "nvidia.com/mig-1g.10gb",
    }[mode]
    assert len(cluster.pods) == (1 if strategy == "SameGPU" else 2)
    for pod in cluster.pods.values():
        spec = pod["spec"]
        container = spec["containers"][0]
        assert container["resources"]["limits"][expected] == "1"
        assert spec["restartPolicy"] == "Never"
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security["runAsNonRoot"] is True
        assert spec["serviceAccountName"] == "cotrain-trainer"
        terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert terms["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == ["n"]
        env = {e["name"] for e in container["env"]}
        assert "COTRAIN_POD_PLAN" in env
        # The device plugin sets the MPS pipe directory and mounts it and its /dev/shm: the pod
        # sets and mounts nothing over them, or its members would miss the daemon.
        assert not [name for name in env if name.startswith("CUDA_MPS_")]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert ("/dev/shm" in mounts) == (mode != "MPS")
        assert not [m for m in mounts if "mps" in m]


def test_every_child_is_owned_labelled_and_deterministically_named() -> None:
    cluster = children("TimeSlicing", {}, MODES[1][2], "SameGPU")
    objects = [*cluster.pods.values(), *cluster.others.values()]
    assert sorted(o["metadata"]["name"] for o in objects) == ["job-gpu-0"]
    for item in objects:
        metadata = item["metadata"]
        assert metadata["labels"]["cotrain.dev/job"] == "job"
        assert metadata["labels"]["app.kubernetes.io/managed-by"] == "cotrain-operator"
        (owner,) = metadata["ownerReferences"]
        assert owner["kind"] == "CoTrainJob"
        assert owner["uid"] == "uid-1"
        assert owner["controller"] is True


def test_a_namespaces_trainer_identity_is_shared_and_bound_to_the_trainer_cluster_role() -> None:
    account, binding = build_trainer_identity("team-a")
    assert (account["kind"], account["metadata"]["name"]) == ("ServiceAccount", "cotrain-trainer")
    assert binding["kind"] == "RoleBinding"
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "cotrain-trainer",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "cotrain-trainer", "namespace": "team-a"}
    ]
    for item in (account, binding):
        assert item["metadata"]["namespace"] == "team-a"
        # No job owns it: deleting a job must not take the other jobs' reporting with it.
        assert "ownerReferences" not in item["metadata"]
        assert item["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "cotrain-operator"


def test_the_trainer_policy_freezes_every_status_field_but_members() -> None:
    (policy,) = [d for d in render_trainer_access() if d["kind"] == "ValidatingAdmissionPolicy"]
    expressions = " ".join(v["expression"] for v in policy["spec"]["validations"])
    status_fields = set(CoTrainJobStatus.model_json_schema(by_alias=True)["properties"])
    frozen = {
        f for f in status_fields if f"object.status.{f} == oldObject.status.{f}" in expressions
    }
    assert frozen == status_fields - {"members"}
    assert "members" in status_fields


def test_same_node_pods_get_pod_affinity() -> None:
    builder = (
        a_job("job").sharing(mode="Exclusive").placement(strategy="PodPerMember", sameNode=True)
    )
    cluster = ClusterState(builder.build(), gpu_node("n", count=2))
    cluster.settle()
    for pod in cluster.pods.values():
        affinity = pod["spec"]["affinity"]["podAffinity"]
        term = affinity["requiredDuringSchedulingIgnoredDuringExecution"][0]
        assert term["labelSelector"] == {"matchLabels": {"cotrain.dev/job": "job"}}


def test_member_resources_add_up_in_the_shared_pod() -> None:
    builder = (
        a_job("job")
        .member(0, resources={"requests": {"cpu": "1", "memory": "1Gi"}})
        .member(1, resources={"requests": {"cpu": "500m", "memory": "512Mi"}})
    )
    cluster = ClusterState(builder.build(), MODES[1][2])
    cluster.settle()
    resources = cluster.pods["job-gpu-0"]["spec"]["containers"][0]["resources"]
    assert resources["requests"] == {"cpu": "1.5", "memory": str(1536 * 2**20)}


@pytest.mark.parametrize(
    ("members", "requests", "limits"),
    [
        # Each member's limit-only resource requests its limit, as in a container of its own.
        ([{"requests": {"cpu": "2"}}, {"limits": {"cpu": "1"}}], {"cpu": "3"}, {}),
        # A limit on the sum only when every member limits the resource.
        ([{"limits": {"cpu": "1"}}, {"limits": {"cpu": "500m"}}], {"cpu": "1.5"}, {"cpu": "1.5"}),
        (
            [{"requests": {"memory": "1Gi"}, "limits": {"memory": "2Gi"}}, {}],
            {"memory": str(2**30)},
            {},
        ),
        ([{}, {}], {}, {}),
    ],
)
def test_a_same_gpu_pod_sums_its_members_and_never_requests_over_its_limit(
    members: list[dict[str, Any]], requests: dict[str, str], limits: dict[str, str]
) -> None:
    builder = a_job("job").sharing(mode="Exclusive")
    for index, resources in enumerate(members):
        builder.member(index, resources=resources)
    cluster = ClusterState(builder.build(), gpu_node("n"))
    cluster.settle()
    (pod,) = cluster.pods.values()
    resources = pod["spec"]["containers"][0]["resources"]
    assert resources["requests"] == requests
    assert {k: v for k, v in resources["limits"].items() if k != "nvidia.com/gpu"} == limits


def test_a_mig_profile_with_media_extensions_is_requested_as_the_device_plugin_names_it() -> None:
    node = gpu_node("n", mig={"1g.10gb+me": (1, 9984)})
    # GFD and the device plugin spell "+" as "." (no "+" in label keys and resource names).
    assert "nvidia.com/mig-1g.10gb.me" in node["status"]["allocatable"]
    assert "nvidia.com/mig-1g.10gb.me.count" in node["metadata"]["labels"]
    cluster = children("MIG", {"migProfile": "1g.10gb+me"}, node, "SameGPU")
    (pod,) = cluster.pods.values()
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/mig-1g.10gb.me"] == "1"
