"""What GitOps tooling reads of a job: the real kstatus (sigs.k8s.io/cli-utils, the status Flux
and cli-utils' appliers wait on, built by setup in controlplane/kstatus-module) computes each
job's state from the status the real operator wrote: pending, running and queued jobs are
InProgress, a succeeded or suspended one Current, a failed one Failed, and a spec the operator
has not observed yet InProgress. `kubectl wait --for=condition=...` reads the same conditions.
"""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from tests.controlplane.tools import ToolNotBuiltError, built_tool
from tests.fixtures.jobs import JobBuilder
from tests.fixtures.kube import Kube, wait_for

pytestmark = pytest.mark.usefixtures("operator")


@pytest.fixture(scope="module")
def kstatus() -> Callable[[dict[str, Any]], str]:
    try:
        binary = built_tool("kstatus")
    except ToolNotBuiltError as error:
        pytest.fail(str(error))

    def compute(job: dict[str, Any]) -> str:
        ran = subprocess.run(
            [binary], input=json.dumps(job) + "\n", capture_output=True, text=True, timeout=30
        )
        assert ran.returncode == 0, ran.stderr
        answer = json.loads(ran.stdout)
        assert not answer.get("error"), answer
        return str(answer["status"])

    return compute


def test_kstatus_reads_each_phase_of_a_job_as_gitops_tools_expect(
    kube: Kube,
    namespace: str,
    make_node: Callable[..., str],
    job: Callable[[str], JobBuilder],
    kstatus: Callable[[dict[str, Any]], str],
) -> None:
    node = make_node(sharing="time-slicing", replicas=4)
    kube.create_job(namespace, job("done").build())
    kube.create_job(namespace, job("broken").build())
    kube.create_job(namespace, job("held").run_policy(suspend=True).build())
    kube.create_job(namespace, job("huge").gpu(0, memory="900Gi").build())
    for name in ("done", "broken"):
        wait_for(f"{name}'s pod", lambda n=name: kube.pod_names(namespace, n))
    kube.wait_phase(namespace, "done", "Pending")
    assert kstatus(kube.job(namespace, "done")) == "InProgress"  # its pod not yet running
    kube.wait_phase(namespace, "huge", "Pending")
    assert kstatus(kube.job(namespace, "huge")) == "InProgress"  # no node fits it (yet)
    kube.wait_phase(namespace, "held", "Suspended")
    assert kstatus(kube.job(namespace, "held")) == "Current"  # suspended, as its spec asks

    for name in ("done", "broken"):
        kube.run_pod(namespace, f"{name}-gpu-0", node)
        kube.wait_phase(namespace, name, "Running")
    running = kube.job(namespace, "done")
    assert kstatus(running) == "InProgress"
    # A spec the operator has not observed yet: observedGeneration behind metadata.generation.
    changed = copy.deepcopy(running)
    changed["metadata"]["generation"] += 1
    assert kstatus(changed) == "InProgress"

    kube.patch_job_status(
        namespace,
        "done",
        {"members": {"torch": {"phase": "Succeeded"}, "tf": {"phase": "Succeeded"}}},
    )
    kube.set_pod_phase(namespace, "done-gpu-0", "Succeeded", 0)
    kube.wait_phase(namespace, "done", "Succeeded")
    assert kstatus(kube.job(namespace, "done")) == "Current"

    kube.set_pod_phase(namespace, "broken-gpu-0", "Failed", 3)  # the members failed for good
    failed = kube.wait_phase(namespace, "broken", "Failed")
    assert kstatus(kube.job(namespace, "broken")) == "Failed", failed["conditions"]
    stalled = kube.condition(namespace, "broken", "Stalled")
    assert stalled is not None
    assert stalled["status"] == "True"
    assert stalled["observedGeneration"] == 1
