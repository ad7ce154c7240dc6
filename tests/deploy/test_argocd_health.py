"""The Argo CD health check (deploy/argocd/), run by a real Lua interpreter on CoTrainJob statuses.

Argo CD runs health checks with gopher-lua, a Lua 5.1; lupa embeds the reference Lua 5.1 (and
5.4, to catch anything version-specific). The statuses are both hand-written edge cases and the
ones the operator's own `decide` writes through a job's life (tests/fixtures/cluster_state.py).
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import yaml

from cotrain_operator.api.models import GROUP, KIND
from tests.deploy.conftest import DEPLOY
from tests.fixtures.cluster_state import ClusterState
from tests.fixtures.jobs import a_job
from tests.fixtures.nodes import gpu_node

LUA_FILE = DEPLOY / "argocd/cotrainjob-health.lua"
ARGOCD_CM = DEPLOY / "argocd/argocd-cm.yaml"
HEALTH_KEY = f"resource.customizations.health.{GROUP}_{KIND}"


@pytest.fixture(params=["lua51", "lua54"])
def health(request: pytest.FixtureRequest) -> Any:
    """health(job) -> (status, message), as Argo CD would compute it."""
    # lupa is a dev dependency (pyproject.toml); Argo CD's own interpreter is a Lua 5.1.
    runtime = importlib.import_module(f"lupa.{request.param}").LuaRuntime()
    script = LUA_FILE.read_text()

    def run(job: dict[str, Any]) -> tuple[str, str]:
        runtime.globals().obj = runtime.table_from(job, recursive=True)
        result = runtime.execute(script)
        return str(result["status"]), str(result["message"])

    return run


def job(status: dict[str, Any] | None = None, generation: int = 1) -> dict[str, Any]:
    document: dict[str, Any] = {
        "apiVersion": "cotrain.dev/v1alpha1",
        "kind": "CoTrainJob",
        "metadata": {"name": "demo", "namespace": "team-a", "generation": generation},
        "spec": {"members": [{"name": "torch", "framework": "PyTorch"}]},
    }
    if status is not None:
        document["status"] = status
    return document


def condition(kind: str, status: str, reason: str, message: str) -> dict[str, Any]:
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-11-22T12:00:00Z",
        "observedGeneration": 1,
    }


def test_argocd_cm_carries_the_lua_file_verbatim_under_the_right_key() -> None:
    config_map = yaml.safe_load(ARGOCD_CM.read_text())
    assert (config_map["metadata"]["name"], config_map["metadata"]["namespace"]) == (
        "argocd-cm",
        "argocd",
    )
    assert config_map["metadata"]["labels"]["app.kubernetes.io/part-of"] == "argocd"
    assert config_map["data"] == {HEALTH_KEY: LUA_FILE.read_text()}


SAMPLES = [
    pytest.param(job(), "Progressing", "Waiting for the CoTrain operator", id="no status yet"),
    pytest.param(job({}), "Progressing", "Waiting for the CoTrain operator", id="empty status"),
    pytest.param(
        job({"phase": "Pending", "observedGeneration": 1}),
        "Progressing",
        "Waiting for the job's pods",
        id="pending",
    ),
    pytest.param(
        job(
            {
                "phase": "Pending",
                "observedGeneration": 1,
                "conditions": [
                    condition("Schedulable", "False", "NoNodeFits", "gpu-a has 4096MiB per share")
                ],
            }
        ),
        "Progressing",
        "Unschedulable: gpu-a has 4096MiB per share",
        id="pending, no node fits",
    ),
    pytest.param(
        job(
            {"phase": "Running", "observedGeneration": 1, "readyMembers": "2/2", "progress": "45%"}
        ),
        "Progressing",
        "Training: 2/2 members ready, 45% done",
        id="running",
    ),
    pytest.param(
        job({"phase": "Running", "observedGeneration": 1}),
        "Progressing",
        "Training",
        id="running, no detail",
    ),
    pytest.param(
        job(
            {
                "phase": "Succeeded",
                "observedGeneration": 1,
                "conditions": [
                    condition("Succeeded", "True", "Completed", "all members succeeded")
                ],
            }
        ),
        "Healthy",
        "all members succeeded",
        id="succeeded",
    ),
    pytest.param(
        job(
            {
                "phase": "Failed",
                "observedGeneration": 1,
                "conditions": [
                    condition("Running", "False", "BackoffLimitExceeded", "member torch crashed"),
                    condition(
                        "Failed", "True", "BackoffLimitExceeded", "member torch crashed 4 times"
                    ),
                ],
            }
        ),
        "Degraded",
        "member torch crashed 4 times",
        id="failed: the Failed condition's message",
    ),
    pytest.param(job({"phase": "Failed"}), "Degraded", "The job failed", id="failed, no condition"),
    pytest.param(
        job(
            {
                "phase": "Suspended",
                "observedGeneration": 1,
                "conditions": [condition("Suspended", "True", "Suspended", "waiting in queue")],
            }
        ),
        "Suspended",
        "waiting in queue",
        id="suspended",
    ),
    pytest.param(
        job({"phase": "Running", "observedGeneration": 1}, generation=2),
        "Progressing",
        "Waiting for the operator to observe generation 2 (status is from generation 1)",
        id="stale observedGeneration",
    ),
    pytest.param(
        job({"phase": "Suspended", "observedGeneration": 1}, generation=2),
        "Progressing",
        "observe generation 2",
        id="stale while suspended (just resumed)",
    ),
    pytest.param(
        job(
            {
                "phase": "Failed",
                "observedGeneration": 1,
                "conditions": [condition("Failed", "True", "InvalidSpec", "the spec is invalid")],
            },
            generation=2,
        ),
        "Progressing",
        "waiting for the operator to check generation 2",
        id="InvalidSpec, spec edited since",
    ),
    pytest.param(
        job(
            {
                "phase": "Failed",
                "observedGeneration": 1,
                "conditions": [condition("Failed", "True", "DeadlineExceeded", "ran too long")],
            },
            generation=2,
        ),
        "Degraded",
        "ran too long",
        id="failed for good, spec edited since",
    ),
    pytest.param(
        job({"phase": "Succeeded", "observedGeneration": 1}, generation=3),
        "Healthy",
        "The job succeeded",
        id="succeeded, spec edited since",
    ),
    pytest.param(
        job({"phase": "Exploded"}), "Unknown", "Unknown phase Exploded", id="unknown phase"
    ),
]


@pytest.mark.parametrize(("document", "status", "message"), SAMPLES)
def test_health_of_a_sample_status(
    health: Any, document: dict[str, Any], status: str, message: str
) -> None:
    got_status, got_message = health(document)
    assert got_status == status
    assert message in got_message


# The statuses the operator itself writes, through a job's whole life.
NODE = gpu_node("gpu-a", sharing="time-slicing", replicas=4, memory_mib=24576)


def test_health_follows_a_job_the_operator_runs_to_success(health: Any) -> None:
    cluster = ClusterState(a_job().build(), NODE)
    assert health(cluster.job)[0] == "Progressing"
    cluster.settle()
    assert health(cluster.job) == ("Progressing", "Waiting for the job's pods to start")
    cluster.run_pods()
    cluster.settle()
    assert health(cluster.job)[0] == "Progressing"
    assert "2/2 members ready" in health(cluster.job)[1]
    for member in ("torch", "tf"):
        cluster.report(member, phase="Succeeded", step=20, totalSteps=20)
    cluster.end_pod("demo-gpu-0", 0)
    cluster.settle()
    assert cluster.status["phase"] == "Succeeded"
    assert health(cluster.job)[0] == "Healthy"


def test_health_of_a_job_the_operator_failed(health: Any) -> None:
    cluster = ClusterState(a_job().run_policy(backoffLimit=0).build(), NODE)
    cluster.settle()
    cluster.run_pods()
    cluster.end_pod("demo-gpu-0", 137, "OOMKilled")
    cluster.settle()
    assert cluster.status["phase"] == "Failed"
    status, message = health(cluster.job)
    assert status == "Degraded"
    assert message == cluster.condition("Failed")["message"]


def test_health_of_a_queued_and_an_unschedulable_job(health: Any) -> None:
    queued = ClusterState(a_job().run_policy(suspend=True).build(), NODE)
    queued.settle()
    assert health(queued.job) == ("Suspended", queued.condition("Suspended")["message"])

    too_big = ClusterState(a_job().gpu(0, memory="20Gi").build(), NODE)
    too_big.settle()
    status, message = health(too_big.job)
    assert status == "Progressing"
    assert message == "Unschedulable: " + too_big.condition("Schedulable")["message"]


def test_health_of_a_job_refused_as_invalid_then_fixed(health: Any) -> None:
    invalid = a_job().sharing(mode="TimeSlicing", migProfile="1g.10gb").build()
    cluster = ClusterState(invalid, NODE)
    cluster.settle()
    status, message = health(cluster.job)
    assert status == "Degraded"
    assert message.startswith("the spec is invalid")
    # The user fixes the spec: a new generation, not yet seen by the operator.
    del cluster.job["spec"]["sharing"]["migProfile"]
    cluster.job["metadata"]["generation"] = 2
    assert health(cluster.job)[0] == "Progressing"
    cluster.settle()
    assert health(cluster.job)[0] == "Progressing"  # Pending now, pods on the way
    assert cluster.status["phase"] == "Pending"
