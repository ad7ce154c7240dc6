"""A data-parallel member through the whole stack: replica pods found by stable names, real
torch.distributed (gloo) and MultiWorkerMirroredStrategy training, the job Succeeded."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import DP_POOL
from tests.e2e.kubelet import LocalKubelet
from tests.fixtures.jobs import a_job
from tests.fixtures.kube import Kube

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("e2e_operator")]


def test_two_replica_members_train_to_success(
    kube: Kube, namespace: str, dp_kubelet: LocalKubelet
) -> None:
    builder = (
        a_job("dp")
        .sharing(mode="Exclusive")
        .placement(strategy="PodPerMember", nodeSelector=DP_POOL)
        .member(0, replicas=2, steps=30, batchSize=32)
        .member(1, replicas=2, steps=30, batchSize=32)
    )
    kube.create_job(namespace, builder.build())
    status = kube.wait_phase(namespace, "dp", "Succeeded", timeout=240)
    assert sorted(kube.pod_names(namespace, "dp")) == [
        "dp-tf-0-0",
        "dp-tf-1-0",
        "dp-torch-0-0",
        "dp-torch-1-0",
    ]
    for name in ("torch", "tf"):
        member = status["members"][name]
        assert member["phase"] == "Succeeded", member
        assert member["step"] == member["totalSteps"] > 0, member
        assert member["loss"] < member["firstLoss"], member
    service = kube.core.read_namespaced_service("dp-torch", namespace)
    assert service.spec.cluster_ip == "None"
    pod = next(p for p in kube.pods(namespace, "dp") if p["metadata"]["name"] == "dp-torch-1-0")
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    topology = json.loads(env["COTRAIN_POD_PLAN"])["topology"]["torch"]
    assert topology["replicas"] == 2
    assert topology["replicaIndices"] == [1]
    assert topology["masterAddr"] == f"torch-0.dp-torch.{namespace}.svc"
