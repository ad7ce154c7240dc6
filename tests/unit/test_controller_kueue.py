"""The controller's Kueue caches, against the fake API at the boundary of `k8s.py`: a restarted
operator that sees a job's Workload before the job itself creates no second one and starts the
job once Kueue has admitted it; a Workload left by an earlier job of the same name is not the
new job's."""

from __future__ import annotations

import asyncio
from typing import Any

from cotrain_operator.controller import Controller
from cotrain_operator.reconcile.queueing import workload_name
from cotrain_operator.sharing import parse_node
from tests.fixtures.nodes import gpu_node
from tests.unit.test_controller_refusals import FakeApi, _job

KEY = ("ns", "job")


def _queued() -> dict[str, Any]:
    body = _job()
    body["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "team-a"}
    return body


def _workload(owner_uid: str, admitted: bool) -> dict[str, Any]:
    conditions = (
        [
            {"type": "QuotaReserved", "status": "True", "reason": "QuotaReserved"},
            {"type": "Admitted", "status": "True", "reason": "Admitted"},
        ]
        if admitted
        else []
    )
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "Workload",
        "metadata": {
            "name": workload_name(_queued()),
            "namespace": "ns",
            "uid": "w1",
            "labels": {"cotrain.dev/job": "job"},
            "ownerReferences": [{"kind": "CoTrainJob", "name": "job", "uid": owner_uid}],
        },
        "spec": {"queueName": "team-a", "podSets": []},
        "status": {
            "conditions": conditions,
            "admission": {"clusterQueue": "cq", "podSetAssignments": [
                {"name": "gpu", "count": 1, "flavors": {"nvidia.com/gpu": "default"}}
            ]},
        },
    }  # fmt: skip


async def _run(workload: dict[str, Any]) -> tuple[FakeApi, Controller]:
    api = FakeApi(None)
    controller = Controller(api, workers=1, kueue=True)  # type: ignore[arg-type]
    controller.on_kueue_object("ResourceFlavor", "ADDED", {"metadata": {"name": "default"}})
    node = parse_node(gpu_node("n"))
    assert node is not None
    controller.nodes["n"] = node
    controller.on_workload("ADDED", workload)  # before the job's own event
    controller.jobs[KEY] = _queued()
    await controller._reconcile_and_schedule(KEY)
    await controller.stop()
    return api, controller


def test_a_workload_seen_before_its_job_is_the_jobs_and_its_admission_starts_it() -> None:
    api, _ = asyncio.run(_run(_workload("u1", admitted=True)))
    kinds = [kind for kind, _ in api.created]
    assert "Workload" not in kinds
    assert "Pod" in kinds


def test_a_workload_of_an_earlier_job_of_the_same_name_is_not_this_jobs() -> None:
    api, controller = asyncio.run(_run(_workload("an-earlier-uid", admitted=True)))
    kinds = [kind for kind, _ in api.created]
    assert "Pod" not in kinds
    assert "Workload" in kinds
    assert controller.workloads[KEY]["metadata"]["ownerReferences"][0]["uid"] == "u1"


def test_an_admission_the_watch_brings_before_the_create_returns_is_not_lost() -> None:
    class RacingApi(FakeApi):
        controller: Controller

        async def create(self, body: Any) -> dict[str, Any] | None:
            created = await super().create(body)
            if body["kind"] == "Workload":
                admitted = _workload("u1", admitted=True)
                admitted["metadata"]["uid"] = created["metadata"]["uid"] = "w1"  # type: ignore[index]
                self.controller.on_workload("MODIFIED", admitted)
            return created

    async def run() -> Controller:
        api = RacingApi(None)
        controller = Controller(api, workers=1, kueue=True)  # type: ignore[arg-type]
        api.controller = controller
        controller.on_kueue_object("ResourceFlavor", "ADDED", {"metadata": {"name": "default"}})
        node = parse_node(gpu_node("n"))
        assert node is not None
        controller.nodes["n"] = node
        controller.jobs[KEY] = _queued()
        await controller._reconcile_and_schedule(KEY)
        await controller.stop()
        return controller

    controller = asyncio.run(run())
    conditions = controller.workloads[KEY]["status"]["conditions"]
    assert {"type": "Admitted", "status": "True", "reason": "Admitted"} in conditions
