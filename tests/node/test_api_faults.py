"""The operator through API faults and its own sudden death, with its pods on the real node.

The operator runs as a host process (deploy/'s ServiceAccount) whose every request goes through
a fault proxy (`fixtures/faultproxy.py`) that answers some with 500 or 409 and cuts its watch
streams; the trainer pods reach the API server directly, through the `kubernetes` Service, as
on a cluster. Each job must still succeed with one pod, every step counted, nothing redone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.controlplane.images import LocalImage
from tests.fixtures.faultproxy import FaultProxy, running_proxy, write_proxy_kubeconfig
from tests.fixtures.jobs import a_job
from tests.fixtures.kube import install_cotrain
from tests.fixtures.operator_process import OperatorProcess
from tests.node.conftest import RealNode
from tests.node.running import assert_trained, host_operator, job_path, watch_to_end
from tests.node.waiting import get_json as _get
from tests.node.waiting import until as _until

pytestmark = pytest.mark.slow


@pytest.fixture
def proxy(time_slicing_node: RealNode) -> Iterator[FaultProxy]:
    cp = time_slicing_node.control_plane
    with running_proxy(cp.server, cp.ca_file) as running:
        yield running


@pytest.fixture
def proxied_operator(
    time_slicing_node: RealNode,
    trainer_image: LocalImage,
    restricted_namespace: str,
    proxy: FaultProxy,
    tmp_path: Path,
) -> Iterator[OperatorProcess]:
    cp = time_slicing_node.control_plane
    install_cotrain(cp)  # the operator's ServiceAccount, before a token of it
    token = cp.service_account_token(
        "cotrain-system", "cotrain-operator", create=False, duration="1h"
    )
    kubeconfig = write_proxy_kubeconfig(tmp_path / "operator.kubeconfig", proxy, token)
    with host_operator(
        time_slicing_node, trainer_image, restricted_namespace, tmp_path, kubeconfig
    ) as operator:
        yield operator


def _small_job(name: str, steps: int) -> dict[str, Any]:
    builder = a_job(name).member(0, steps=steps, batchSize=64).member(1, steps=steps, batchSize=64)
    return builder.gpu(0, memory="1Gi").gpu(1, memory="1Gi").build()


def _member_step(cp: Any, ns: str, name: str, member: str) -> int | None:
    members = _get(cp, job_path(ns, name)).get("status", {}).get("members") or {}
    step = members.get(member, {}).get("step")
    return int(step) if step else None


def _pod_names(cp: Any, ns: str, job: str) -> list[str]:
    pods = _get(cp, f"/api/v1/namespaces/{ns}/pods?labelSelector=cotrain.dev/job={job}")
    return sorted(p["metadata"]["name"] for p in pods["items"])


@pytest.mark.parametrize("attempt", [1, 2, 3])  # must hold every time, not once by luck
def test_a_job_converges_through_api_faults(
    attempt: int,
    time_slicing_node: RealNode,
    restricted_namespace: str,
    proxy: FaultProxy,
    proxied_operator: OperatorProcess,
) -> None:
    cp, ns = time_slicing_node.control_plane, restricted_namespace
    proxy.fail("POST", rf"/namespaces/{ns}/pods$", 500, times=2)
    proxy.fail("PATCH", r"/cotrainjobs/faulted/status$", 409, times=2)
    proxy.fail("PATCH", r"/cotrainjobs/faulted/status$", 500, times=2)
    cp.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(_small_job("faulted", 60)))
    _until(
        "the job Running",
        lambda: _get(cp, job_path(ns, "faulted")).get("status", {}).get("phase") == "Running",
    )
    assert proxy.drop_watches() > 0
    _until("the operator's watches open again", lambda: proxy.open_watches() > 0)
    proxy.drop_watches()
    ran = watch_to_end(cp, ns, "faulted")
    assert ran.status["phase"] == "Succeeded", ran.status
    assert_trained(ran.status, ["torch", "tf"])
    # The two refused creations were retried, and only one pod ever came of them.
    assert sorted(ran.pods) == _pod_names(cp, ns, "faulted") == ["faulted-gpu-0"]
    posts = [r.status for r in proxy.requests("POST", rf"/namespaces/{ns}/pods$")]
    assert posts[:2] == [500, 500], posts
    assert posts.count(201) == 1, posts


def test_the_operator_killed_mid_run_takes_up_the_job_again_without_duplicates(
    time_slicing_node: RealNode, restricted_namespace: str, proxied_operator: OperatorProcess
) -> None:
    cp, ns = time_slicing_node.control_plane, restricted_namespace
    cp.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(_small_job("survivor", 600)))
    _until("training", lambda: _member_step(cp, ns, "survivor", "tf"))
    [pod] = _get(cp, f"/api/v1/namespaces/{ns}/pods")["items"]
    proxied_operator.kill()  # SIGKILL: no clean-up, mid-reconcile or not
    before = _member_step(cp, ns, "survivor", "tf") or 0
    proxied_operator.start()
    ran = watch_to_end(cp, ns, "survivor")
    assert ran.status["phase"] == "Succeeded", ran.status
    assert_trained(ran.status, ["torch", "tf"])
    assert ran.status["members"]["tf"]["step"] >= before
    assert _pod_names(cp, ns, "survivor") == ["survivor-gpu-0"]
    [after] = _get(cp, f"/api/v1/namespaces/{ns}/pods")["items"]
    assert after["metadata"]["uid"] == pod["metadata"]["uid"]
