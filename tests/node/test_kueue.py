"""CoTrainJobs queued by the real Kueue on the real node, under the real operator: a ClusterQueue
with whole-GPU quota for two jobs runs two, holds the third (saying in which queue, in Kueue's
words) until one finishes, never starts a job larger than its quota, and lets a higher-priority
job preempt a running one, which goes back to waiting and later completes with its restarts
counted. The pods are placed by kube-scheduler and run in the trainer image.

The members are small scripts that report steps through the trainer's `report` module: each runs
until the test ends it (a file it waits for, written with `kubectl exec`), so which job is running
when is the test's choice and not the machine's speed.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest

from tests.controlplane.cluster import ControlPlane
from tests.controlplane.images import LocalImage
from tests.controlplane.kueue import Kueue
from tests.node.conftest import RealNode
from tests.node.running import events, host_operator, job_path
from tests.node.waiting import get_json, until

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
API = "kueue.x-k8s.io/v1beta2"
# Runs until /tmp/finish exists (the pod's own emptyDir /tmp); with CRASH_ONCE it first exits 3
# once per pod, a restart the trainer counts; with QUICK it ends after five steps.
SCRIPT = """
import os, sys, time
from cotrain_trainer import report
if os.environ.get("CRASH_ONCE") and not os.path.exists("/tmp/crashed"):
    open("/tmp/crashed", "w").close()
    sys.exit(3)
quick = bool(os.environ.get("QUICK"))
step = 0
while True:
    step += 1
    report.step(step=step, loss=1.0 / step, samples=8, total_steps=1000)
    if (quick and step >= 5) or os.path.exists("/tmp/finish") or step >= 999:
        break
    time.sleep(0.5)
"""


def _job(name: str, priority: str, gpus: int = 1, **env: str) -> dict[str, Any]:
    return {
        "apiVersion": "cotrain.dev/v1alpha1",
        "kind": "CoTrainJob",
        "metadata": {
            "name": name,
            "labels": {
                "kueue.x-k8s.io/queue-name": "team-a",
                "kueue.x-k8s.io/priority-class": priority,
            },
        },
        "spec": {
            "sharing": {"mode": "Exclusive"},
            # gpu.count above 1 takes a pod of the member's own.
            "placement": {"strategy": "SameGPU" if gpus == 1 else "PodPerMember"},
            "runPolicy": {"backoffLimit": 3},
            "members": [
                {
                    "name": "main",
                    "framework": "PyTorch",
                    "command": ["python", "-c", SCRIPT],
                    "env": [{"name": k, "value": v} for k, v in env.items()],
                    "gpu": {"count": gpus},
                    "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
                }
            ],
        },
    }


def _queues(ns: str) -> list[dict[str, Any]]:
    flavor = f"fake-gpus-{ns}"
    return [
        {
            "apiVersion": API,
            "kind": "ResourceFlavor",
            "metadata": {"name": flavor},
            "spec": {
                "nodeLabels": {"nvidia.com/gpu.present": "true"},
                "tolerations": [
                    {"key": "example.com/gpu-pool", "operator": "Exists", "effect": "NoSchedule"}
                ],
            },
        },
        {
            "apiVersion": API,
            "kind": "ClusterQueue",
            "metadata": {"name": f"gpus-{ns}"},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                "preemption": {"withinClusterQueue": "LowerPriority"},
                "resourceGroups": [
                    {
                        "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                        "flavors": [
                            {
                                "name": flavor,
                                "resources": [
                                    {"name": "cpu", "nominalQuota": "2"},
                                    {"name": "memory", "nominalQuota": "4Gi"},
                                    {"name": "nvidia.com/gpu", "nominalQuota": "2"},
                                ],
                            }
                        ],
                    }
                ],
            },
        },
        {
            "apiVersion": API,
            "kind": "LocalQueue",
            "metadata": {"name": "team-a", "namespace": ns},
            "spec": {"clusterQueue": f"gpus-{ns}"},
        },
        {
            "apiVersion": API,
            "kind": "WorkloadPriorityClass",
            "metadata": {"name": f"low-{ns}"},
            "value": 100,
        },
        {
            "apiVersion": API,
            "kind": "WorkloadPriorityClass",
            "metadata": {"name": f"medium-{ns}"},
            "value": 200,
        },
        {
            "apiVersion": API,
            "kind": "WorkloadPriorityClass",
            "metadata": {"name": f"high-{ns}"},
            "value": 1000,
        },
    ]


class Queue:
    def __init__(self, cp: ControlPlane, ns: str) -> None:
        self.cp, self.ns = cp, ns

    def status(self, name: str) -> dict[str, Any]:
        return get_json(self.cp, job_path(self.ns, name)).get("status", {})  # type: ignore[no-any-return]

    def condition(self, name: str, kind: str) -> dict[str, Any]:
        conditions = self.status(name).get("conditions", [])
        return next((c for c in conditions if c["type"] == kind), {})

    def pods(self, name: str) -> list[dict[str, Any]]:
        selector = f"labelSelector=cotrain.dev/job={name}"
        got = get_json(self.cp, f"/api/v1/namespaces/{self.ns}/pods?{selector}")
        return got["items"]  # type: ignore[no-any-return]

    def workload(self, name: str) -> dict[str, Any] | None:
        got = get_json(
            self.cp,
            f"/apis/kueue.x-k8s.io/v1beta2/namespaces/{self.ns}/workloads"
            f"?labelSelector=cotrain.dev/job={name}",
        )
        return got["items"][0] if got["items"] else None

    def admitted(self, name: str) -> bool:
        workload = self.workload(name) or {}
        conditions = workload.get("status", {}).get("conditions", [])
        return any(c["type"] == "Admitted" and c["status"] == "True" for c in conditions)

    def running(self, name: str) -> dict[str, Any] | None:
        """The job's running pod once its member has reported a step, else None."""
        member = self.status(name).get("members", {}).get("main", {})
        live = [p for p in self.pods(name) if p["status"].get("phase") == "Running"]
        return live[0] if live and (member.get("step") or 0) > 0 else None

    def phase(self, name: str) -> str | None:
        phase = self.status(name).get("phase")
        return str(phase) if phase else None

    def finish(self, name: str) -> None:
        """End the job's running member: the file its script waits for."""
        pod = until(f"{name} running", lambda: self.running(name), timeout=180)
        self.cp.kubectl(
            "exec", "-n", self.ns, pod["metadata"]["name"], "-c", "trainer", "--",
            "python", "-c", "open('/tmp/finish', 'w').close()",
        )  # fmt: skip

    def ended(self, name: str, timeout: float = 180) -> dict[str, Any]:
        def end() -> dict[str, Any] | None:
            status = self.status(name)
            return status if status.get("phase") in ("Succeeded", "Failed") else None

        return until(f"{name} to end", end, timeout=timeout)


def test_kueue_queues_admits_refuses_and_preempts_cotrainjobs(
    exclusive_node: RealNode,
    node_kueue: Kueue,
    trainer_image: LocalImage,
    restricted_namespace: str,
    tmp_path: Path,
) -> None:
    cp, ns = exclusive_node.control_plane, restricted_namespace
    cp.kubectl("apply", "-f", str(ROOT / "deploy" / "components" / "kueue" / "rbac.yaml"))
    objects = {"apiVersion": "v1", "kind": "List", "items": _queues(ns)}
    cp.kubectl("apply", "-f", "-", input=json.dumps(objects))
    queue = Queue(cp, ns)
    low, medium, high = f"low-{ns}", f"medium-{ns}", f"high-{ns}"

    def apply(job: dict[str, Any]) -> None:
        cp.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(job))

    with host_operator(
        exclusive_node, trainer_image, ns, tmp_path, env={"COTRAIN_KUEUE": "true"}
    ) as operator:
        try:
            # Larger than the ClusterQueue's whole quota: never started, and it says so.
            apply(_job("huge", low, gpus=3))
            # One at a time, so that which two Kueue admits first is the test's order.
            apply(_job("first", low))
            until("first admitted", lambda: queue.admitted("first"), timeout=120)
            apply(_job("second", medium))
            until("second admitted", lambda: queue.admitted("second"), timeout=120)
            apply(_job("third", low, CRASH_ONCE="1"))

            def refused() -> dict[str, Any] | None:
                condition = queue.condition("third", "Admitted")
                return condition if "insufficient" in condition.get("message", "") else None

            waiting = until("third waiting for quota", refused, timeout=120)
            assert waiting["status"] == "False", waiting
            assert waiting["reason"] == "Queued", waiting
            assert "LocalQueue team-a" in waiting["message"], waiting
            assert "insufficient unused quota for nvidia.com/gpu" in waiting["message"], waiting
            assert queue.phase("third") == "Suspended"
            assert queue.pods("third") == []
            # The two admitted jobs run side by side on the node, each on a whole fake GPU.
            for name in ("first", "second"):
                pod = until(f"{name} running", functools.partial(queue.running, name), 180)
                assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
                assert {
                    "key": "example.com/gpu-pool", "operator": "Exists", "effect": "NoSchedule"
                } in pod["spec"]["tolerations"]  # fmt: skip
                [container] = pod["spec"]["containers"]
                assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
            huge = queue.condition("huge", "Admitted")
            assert huge["status"] == "False", huge
            assert "LocalQueue team-a" in huge["message"], huge
            assert "> maximum capacity (2)" in huge["message"], huge
            assert queue.pods("huge") == []
            assert queue.status("third").get("members", {}).get("main", {}).get("step") is None

            # One ends: the third is admitted and runs (crashing once first, in its pod).
            queue.finish("first")
            assert queue.ended("first")["phase"] == "Succeeded"
            until("third running", lambda: queue.running("third"), timeout=180)
            assert queue.status("third")["members"]["main"]["restarts"] == 1

            # A higher-priority job preempts the lowest-priority running one: the third.
            apply(_job("urgent", high, QUICK="1"))
            until(
                "third preempted",
                lambda: queue.condition("third", "Admitted").get("reason") == "Preempted",
                timeout=120,
            )
            until("third's pod gone", lambda: queue.pods("third") == [], timeout=120)
            preempted = queue.condition("third", "Suspended")
            assert preempted["status"] == "True", preempted
            assert "LocalQueue team-a" in preempted["message"], preempted
            assert queue.phase("second") == "Running"
            assert queue.ended("urgent")["phase"] == "Succeeded"

            # Once the urgent job has ended, the third is admitted again and runs in a new pod:
            # its restart before the preemption is kept, and the new pod's crash counted on top.
            until(
                "third running again",
                lambda: (
                    queue.running("third")
                    and queue.condition("third", "Admitted").get("status") == "True"
                ),
                timeout=180,
            )
            queue.finish("third")
            third = queue.ended("third")
            assert third["phase"] == "Succeeded", third
            assert third["members"]["main"]["restarts"] == 2, third["members"]
            assert queue.phase("second") == "Running"
            queue.finish("second")
            assert queue.ended("second")["phase"] == "Succeeded"
            # Each finished job's Workload is Finished: Kueue has its quota back.
            for name in ("first", "second", "third", "urgent"):
                workload = queue.workload(name) or {}
                finished = [
                    c for c in workload.get("status", {}).get("conditions", [])
                    if c["type"] == "Finished" and c["status"] == "True"
                ]  # fmt: skip
                assert finished, (name, workload)
            assert queue.phase("huge") == "Suspended"
        except BaseException:
            print(operator.logs()[-6000:])
            print(node_kueue.logs()[-4000:])
            print(events(cp, ns))
            raise
