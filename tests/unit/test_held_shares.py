"""GPU shares that live pods hold are not offered again: placement sees each node less what the
operator's own bound pods already hold, kept in step with pod events."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cotrain_operator.controller import Controller
from cotrain_operator.reconcile.placement import held_share
from cotrain_operator.sharing import parse_node
from tests.fixtures.jobs import a_job
from tests.fixtures.nodes import gpu_node
from tests.unit.test_controller_refusals import FakeApi


def _pod(
    node: str | None = "n", phase: str = "Running", limits: dict[str, Any] | None = None
) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "metadata": {"name": "p", "namespace": "ns", "labels": {"cotrain.dev/job": "a"}},
        "spec": {"containers": [{"resources": {"limits": limits or {"nvidia.com/gpu": "1"}}}]},
        "status": {"phase": phase},
    }
    if node:
        pod["spec"]["nodeName"] = node
    return pod


@pytest.mark.parametrize(
    ("pod", "held"),
    [
        (_pod(), ("n", {"nvidia.com/gpu": 1})),
        (_pod(phase="Pending"), ("n", {"nvidia.com/gpu": 1})),  # bound, not started yet
        (
            _pod(limits={"nvidia.com/mig-1g.10gb.me": "2", "cpu": "1"}),
            ("n", {"nvidia.com/mig-1g.10gb.me": 2}),
        ),
        (_pod(node=None), None),  # not bound: holds nothing yet
        (_pod(phase="Succeeded"), None),
        (_pod(phase="Failed"), None),
        (_pod(limits={"cpu": "1"}), None),
    ],
)
def test_a_pod_holds_the_gpu_shares_it_is_bound_with(pod: dict[str, Any], held: Any) -> None:
    assert held_share(pod) == held


def test_a_deleting_pod_holds_nothing() -> None:
    pod = _pod()
    pod["metadata"]["deletionTimestamp"] = "2026-12-01T00:00:00Z"
    assert held_share(pod) is None


def _job(name: str) -> dict[str, Any]:
    body = a_job(name).sharing(mode="Exclusive").build()
    body["metadata"].update(namespace="ns", uid=name, generation=1, resourceVersion="1")
    return body


def test_a_gpu_a_running_pod_holds_is_not_offered_to_the_next_job() -> None:
    async def scenario() -> tuple[FakeApi, FakeApi]:
        controller = Controller(FakeApi(None), workers=1)  # type: ignore[arg-type]
        node = parse_node(gpu_node("n", count=1))
        assert node is not None
        controller.nodes["n"] = node
        holder = _pod()
        controller.on_pod("ADDED", holder)
        controller.jobs[("ns", "b")] = _job("b")
        full = controller.api = FakeApi(None)  # type: ignore[assignment]
        await controller.reconcile(("ns", "b"))
        controller.on_pod("DELETED", holder)
        freed = controller.api = FakeApi(None)  # type: ignore[assignment]
        await controller.reconcile(("ns", "b"))
        await controller.stop()
        return full, freed

    full, freed = asyncio.run(scenario())
    assert [kind for kind, _ in full.created] == []
    schedulable = next(c for c in full.patches[0]["conditions"] if c["type"] == "Schedulable")
    assert schedulable["status"] == "False"
    assert "n (NVIDIA-L4, 1x 24576MiB) has no allocatable nvidia.com/gpu" in schedulable["message"]
    assert ("Pod", "b-gpu-0") in freed.created
