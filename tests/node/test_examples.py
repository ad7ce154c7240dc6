"""The examples the other node tests do not run, applied with kubectl to the real node and
trained in the trainer image: whole GPUs in a pod per member (sized down to this 2-core node),
and MPS compute shares, granted where the node's MPS daemon allows them and refused, with the
node's facts, where it does not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.controlplane.images import LocalImage
from tests.node.conftest import GFD_MPS_LABELS, MPS_GPUS, RealNode, as_mps_node
from tests.node.running import (
    assert_trained,
    events,
    host_operator,
    job_path,
    run_operator_job,
)
from tests.node.waiting import get_json as _get
from tests.node.waiting import until as _until

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _example(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())  # type: ignore[no-any-return]


def test_the_exclusive_pod_per_member_example_runs_each_member_on_a_whole_gpu(
    exclusive_node: RealNode, trainer_image: LocalImage, restricted_namespace: str, tmp_path: Path
) -> None:
    """Two pods, one whole GPU each, on one node (sameNode); the job Succeeded once either
    member did (successPolicy AnyMember). The example asks 2 CPUs per member and 1,000 CNN
    steps of 256: this node has 2 CPUs in all, so the test asks a quarter of a CPU and 60 steps,
    and changes nothing else."""
    job = _example("exclusive-pod-per-member")
    for member in job["spec"]["members"]:
        member["resources"] = {
            "requests": {"cpu": "250m", "memory": "1Gi"},
            "limits": {"cpu": "1", "memory": "3Gi"},
        }
        member["steps"] = 60
    ns, cp = restricted_namespace, exclusive_node.control_plane
    ran = run_operator_job(exclusive_node, trainer_image, ns, job, tmp_path)
    status = ran.status
    assert status["phase"] == "Succeeded", (status, events(cp, ns))
    succeeded = [n for n, m in status["members"].items() if m["phase"] == "Succeeded"]
    assert succeeded, status["members"]
    assert_trained(status, succeeded)
    pods = ran.pods
    assert sorted(pods) == ["exclusive-pod-per-member-tf-0", "exclusive-pod-per-member-torch-0"]
    assert {p["spec"]["nodeName"] for p in pods.values()} == {exclusive_node.node.name}
    for pod in pods.values():
        [container] = pod["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1", container["resources"]
    assert status["sharing"]["mode"] == "Exclusive", status["sharing"]


def test_the_mps_example_gets_its_compute_shares_from_a_whole_gpu_under_mps(
    whole_mps_node: RealNode, trainer_image: LocalImage, restricted_namespace: str, tmp_path: Path
) -> None:
    """The example as written: 60% and 40% of the SMs, which an MPS daemon over one GPU that is
    not split (its default active thread percentage 100) can grant; 2 epochs of the CNN."""
    ns, cp = restricted_namespace, whole_mps_node.control_plane
    job = _example("mps-compute-shares")
    ran = run_operator_job(whole_mps_node, trainer_image, ns, job, tmp_path)
    status = ran.status
    assert status["phase"] == "Succeeded", (status, events(cp, ns))
    assert_trained(status, ["torch-cnn", "tf-cnn"])
    assert status["sharing"]["mode"] == "MPS", status["sharing"]
    budget = status["sharing"]["budget"]
    assert budget["torch-cnn"] == {"memoryBytes": 8 << 30, "computePercent": 60}, budget
    assert budget["tf-cnn"] == {"memoryBytes": 6 << 30, "computePercent": 40}, budget
    [pod] = ran.pods.values()
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    # The device plugin's pipe directory reaches the members: the pod sets none of its own.
    assert "CUDA_MPS_PIPE_DIRECTORY" not in env, env
    plan = json.loads(env["COTRAIN_POD_PLAN"])
    # What the trainer narrows each member's process to (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE).
    shares = {name: b.get("computePercent") for name, b in plan["budgets"].items()}
    assert shares == {"torch-cnn": 60, "tf-cnn": 40}, plan["budgets"]


def test_the_mps_example_on_a_split_gpu_is_refused_with_what_the_daemon_grants(
    real_node: RealNode, trainer_image: LocalImage, restricted_namespace: str, tmp_path: Path
) -> None:
    """On an MPS node split in two replicas the daemon grants each client 50% at most: the
    job's 60% cannot be had, and the job says so instead of running with less. (An 80 GiB card,
    so that a replica's 40 GiB holds the members' memory and compute is what refuses.)"""
    labels = {**GFD_MPS_LABELS, "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    mps_node = as_mps_node(real_node, MPS_GPUS, labels | {"nvidia.com/gpu.memory": "81920"})
    ns, cp = restricted_namespace, mps_node.control_plane
    job = _example("mps-compute-shares")
    name = job["metadata"]["name"]

    def refused() -> dict[str, Any] | None:
        conditions = _get(cp, job_path(ns, name)).get("status", {}).get("conditions", [])
        found = next((c for c in conditions if c["type"] == "Schedulable"), None)
        return found if found and found["status"] == "False" else None

    with host_operator(mps_node, trainer_image, ns, tmp_path):
        cp.kubectl("apply", "-n", ns, "-f", str(EXAMPLES / "mps-compute-shares.yaml"))
        condition = _until("the job refused", refused, timeout=60)
        assert not _get(cp, f"/api/v1/namespaces/{ns}/pods")["items"]
    message = condition["message"]
    assert "grants each client at most 50%" in message, condition
    assert "torch-cnn 60%" in message, condition
    assert mps_node.node.name in message, condition
