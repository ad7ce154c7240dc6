"""The controller's answer to children the API server refuses, against a fake API at the
boundary of `k8s.py`: a refusal no retry can change fails the job once, with the server's words;
one that can heal is retried, said once, and the namespace's trainer identity is made once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import pytest

from cotrain_operator.controller import Controller
from cotrain_operator.k8s import ApiError
from cotrain_operator.sharing import parse_node
from tests.fixtures.jobs import a_job
from tests.fixtures.nodes import gpu_node


class FakeApi:
    """What `KubeApi` offers the controller, recording every call; pod creates answer with
    `refusal` (an HTTP status and message) until it is cleared."""

    def __init__(self, refusal: tuple[int, str] | None) -> None:
        self.refusal = refusal
        self.created: list[tuple[str, str]] = []
        self.refused = 0
        self.patches: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str]] = []

    async def create(self, body: Mapping[str, Any]) -> dict[str, Any] | None:
        if body["kind"] == "Pod" and self.refusal is not None:
            self.refused += 1
            status, message = self.refusal
            raise ApiError(status, "Refused", json.dumps({"kind": "Status", "message": message}))
        self.created.append((body["kind"], body["metadata"]["name"]))
        return dict(body)

    async def delete_pod(self, namespace: str, name: str) -> None:
        return None

    async def patch_status(
        self, namespace: str, name: str, status: Mapping[str, Any], resource_version: str | None
    ) -> dict[str, Any] | None:
        self.patches.append(dict(status))
        return None

    async def post_event(
        self, job: Mapping[str, Any], event_type: str, reason: str, message: str
    ) -> None:
        self.events.append((event_type, reason, message))

    async def delete_job(self, namespace: str, name: str, uid: str) -> None:
        return None

    async def missing_trainer_policy(self) -> list[str]:
        return []


def _job() -> dict[str, Any]:
    body = a_job("job").sharing(mode="Exclusive").build()
    body["metadata"].update(namespace="ns", uid="u1", generation=1, resourceVersion="1")
    return body


async def _reconcile(api: FakeApi, times: int) -> Controller:
    controller = Controller(api, workers=1)  # type: ignore[arg-type]
    node = parse_node(gpu_node("n"))
    assert node is not None
    controller.nodes["n"] = node
    controller.jobs[("ns", "job")] = _job()
    for _ in range(times):
        await controller._reconcile_and_schedule(("ns", "job"))
    await controller.stop()
    return controller


def test_a_refusal_no_retry_can_change_fails_the_job_once_with_the_servers_words() -> None:
    message = 'pods "job-gpu-0" is forbidden: maximum cpu usage per Container is 1, but limit is 2'
    api = FakeApi((403, message))
    asyncio.run(_reconcile(api, times=1))
    (patch,) = api.patches
    assert patch["phase"] == "Failed"
    failed = next(c for c in patch["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "FailedCreate"
    assert message in failed["message"]
    assert [e[1] for e in api.events] == ["FailedCreate"]
    assert api.refused == 1
    # The namespace's trainer identity was made once, before the pod.
    assert sorted(kind for kind, _ in api.created) == ["RoleBinding", "ServiceAccount"]


@pytest.mark.parametrize(
    "refusal",
    [(500, "etcdserver: request timed out"), (403, "exceeded quota: q, requested: pods=1")],
)
def test_a_refusal_that_can_heal_is_retried_said_once_and_makes_the_identity_once(
    refusal: tuple[int, str],
) -> None:
    api = FakeApi(refusal)
    controller = asyncio.run(_reconcile(api, times=3))
    assert api.refused == 3
    assert api.patches == []  # nothing to say in the status yet: it is not over
    assert [(e[1], refusal[1] in e[2]) for e in api.events] == [("FailedCreate", True)]
    assert sorted(kind for kind, _ in api.created) == ["RoleBinding", "ServiceAccount"]
    assert controller._failures[("ns", "job")] == 3


def test_a_missing_trainer_service_account_is_made_again_before_the_retry() -> None:
    missing = (
        "error looking up service account ns/cotrain-trainer: "
        'serviceaccount "cotrain-trainer" not found'
    )
    api = FakeApi((403, missing))
    asyncio.run(_reconcile(api, times=2))
    accounts = [name for kind, name in api.created if kind == "ServiceAccount"]
    assert accounts == ["cotrain-trainer", "cotrain-trainer"]
    assert api.patches == []
