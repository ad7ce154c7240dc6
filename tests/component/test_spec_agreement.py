"""`cotrain validate` and the real API server agree on every generated CoTrainJob, and what both
accept the operator can turn into children that the API server accepts too.

Each hypothesis draw (tests/fixtures/spec_strategies.py) is judged twice: by `parse_job`, the
validator behind `cotrain validate` and the operator, and by a server-side dry-run create with
strict field validation (what `kubectl apply` does). A job both accept is then decided as the
operator would on GPU nodes of every kind, and each child it would create (pods, Services) is
dry-run created in a namespace that enforces Pod Security "restricted"; the API server must
accept every one.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlparse

import pytest
from hypothesis import HealthCheck, given, settings

from cotrain_operator.api import InvalidJobError, parse_job
from cotrain_operator.reconcile.access import build_trainer_identity
from cotrain_operator.reconcile.job import decide
from cotrain_operator.sharing import GpuNode, parse_node
from tests.controlplane.cluster import ControlPlane
from tests.fixtures.nodes import gpu_node
from tests.fixtures.spec_strategies import job_documents

EXAMPLES = int(os.environ.get("COTRAIN_FUZZ_EXAMPLES", "1000"))
NAMESPACE = "tfuzz"
JOBS_PATH = f"/apis/cotrain.dev/v1alpha1/namespaces/{NAMESPACE}/cotrainjobs"
CHILD_PATHS = {"Pod": "pods", "Service": "services"}
# Nodes of every sharing setup, so that every mode (and Auto) finds one that fits.
NODES: list[GpuNode] = [
    node
    for node in (
        parse_node(gpu_node("ts", sharing="time-slicing", replicas=4, memory_mib=81920)),
        parse_node(gpu_node("mps", sharing="mps", replicas=2, memory_mib=81920)),
        parse_node(gpu_node("exclusive", count=8, memory_mib=81920)),
        parse_node(
            gpu_node(
                "mig",
                memory_mib=81920,
                mig={"1g.10gb": (7, 9856), "3g.40gb": (2, 40192), "7g.80gb+me": (1, 80896)},
            )
        ),
    )
    if node is not None
]


@dataclass
class Tally:
    """What the draws covered, printed at the end so the closing note can quote it."""

    examples: int = 0
    accepted: int = 0
    children: int = 0
    kinds: dict[str, int] = field(default_factory=dict)


def as_kubectl_sends(value: Any) -> Any:
    """`value` with floats as Go's encoding/json writes them, which is how kubectl sends a
    manifest: an integral float below 1e21 has no fraction (5.0 goes as 5)."""
    if isinstance(value, dict):
        return {k: as_kubectl_sends(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_kubectl_sends(v) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return int(value)
    return value


class DryRun:
    """Server-side dry-run creates over one kept-alive connection (a TLS handshake per draw
    would cost more than the draw)."""

    def __init__(self, cluster: ControlPlane) -> None:
        url = urlparse(cluster.server)
        context = ssl.create_default_context(cafile=str(cluster.ca_file))
        self._connection = http.client.HTTPSConnection(
            url.hostname or "127.0.0.1", url.port, context=context, timeout=30
        )
        self._token = cluster.token

    def create(self, path: str, body: Any) -> tuple[int, dict[str, Any]]:
        query = "?dryRun=All&fieldValidation=Strict"
        headers = {
            "Authorization": f"Bearer {self._token}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        data = json.dumps(as_kubectl_sends(body))
        self._connection.request("POST", path + query, data, headers)
        response = self._connection.getresponse()
        answer = json.loads(response.read() or b"{}")
        return response.status, answer

    def close(self) -> None:
        self._connection.close()


@pytest.fixture(scope="module")
def dry_run(cluster: ControlPlane) -> Iterator[DryRun]:
    cluster.kubectl("create", "namespace", NAMESPACE)
    cluster.kubectl(
        "label", "namespace", NAMESPACE, "pod-security.kubernetes.io/enforce=restricted"
    )
    # The trainer identity exists before any pod, as the operator makes it.
    for child in build_trainer_identity(NAMESPACE):
        cluster.kubectl("create", "-f", "-", input=json.dumps(child))
    runner = DryRun(cluster)
    try:
        yield runner
    finally:
        runner.close()
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


def _python_verdict(document: dict[str, Any]) -> str | None:
    """None when `cotrain validate` accepts the document, else its violations."""
    try:
        parse_job(document)
    except InvalidJobError as error:
        return str(error)
    return None


def _check_children(dry_run: DryRun, stored: dict[str, Any], tally: Tally) -> None:
    decision = decide(stored, [], NODES, datetime.now(UTC))
    assert decision.phase != "Failed", f"decided {decision.status_patch}"
    for child in decision.create:
        kind = child["kind"]
        status, answer = dry_run.create(
            f"/api/v1/namespaces/{NAMESPACE}/{CHILD_PATHS[kind]}", child
        )
        tally.children += 1
        tally.kinds[kind] = tally.kinds.get(kind, 0) + 1
        assert status in (200, 201), (
            f"the API server refused the {kind} the operator built ({status}): "
            f"{answer.get('message')}\nspec: {json.dumps(stored['spec'])}"
        )


def test_validate_agrees_with_the_api_server_and_children_are_accepted(
    dry_run: DryRun,
) -> None:
    tally = Tally()
    started = time.monotonic()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(document=job_documents())
    def agree(document: dict[str, Any]) -> None:
        tally.examples += 1
        ours = _python_verdict(document)
        status, answer = dry_run.create(JOBS_PATH, document)
        assert status < 500, f"the API server failed ({status}): {answer}"
        server_accepts = status in (200, 201)
        if server_accepts:
            assert ours is None, (
                f"cotrain validate refuses what the API server accepts: {ours}\n"
                f"document: {json.dumps(document)}"
            )
            tally.accepted += 1
            _check_children(dry_run, answer, tally)
        else:
            assert ours is not None, (
                f"cotrain validate accepts what the API server refuses ({status}): "
                f"{answer.get('message')}\ndocument: {json.dumps(document)}"
            )

    agree()
    print(
        f"\nspec agreement: {tally.examples} examples, {tally.accepted} accepted by both, "
        f"{tally.children} children dry-run created {tally.kinds}, "
        f"{time.monotonic() - started:.0f}s"
    )
    # The draws must reach both verdicts and make children, or the comparison proves little.
    assert tally.accepted >= EXAMPLES // 20
    assert tally.examples - tally.accepted >= EXAMPLES // 4
    assert tally.kinds.get("Pod", 0) >= EXAMPLES // 20
