"""Apply a CoTrainJob, watch real PyTorch and TensorFlow train in its pods, see Succeeded."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.controlplane.cluster import ControlPlane
from tests.e2e.conftest import POOL
from tests.e2e.kubelet import LocalKubelet
from tests.fixtures.faultproxy import FaultProxy
from tests.fixtures.jobs import JobBuilder
from tests.fixtures.kube import Kube, wait_for
from tests.fixtures.operator_process import OperatorProcess

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("e2e_operator", "kubelet")]


def _assert_trained(status: dict[str, Any], members: list[str]) -> None:
    for name in members:
        member = status["members"][name]
        assert member["phase"] == "Succeeded", member
        assert member["step"] == member["totalSteps"] > 0, member
        assert member["loss"] < member["firstLoss"], member
        assert member["samplesPerSecond"] > 0, member
        assert member["lastReportTime"], member


def _mixed_example(examples_dir: Path, placement: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((examples_dir / "mixed-same-gpu.yaml").read_text())
    document["spec"]["placement"] = {"strategy": placement, "nodeSelector": POOL}
    return document


@pytest.mark.parametrize("placement", ["SameGPU", "PodPerMember"])
def test_mixed_example_trains_to_success(
    kube: Kube, namespace: str, examples_dir: Path, placement: str
) -> None:
    started = time.monotonic()
    document = _mixed_example(examples_dir, placement)
    name = document["metadata"]["name"]
    kube.create_job(namespace, document)
    status = kube.wait_phase(namespace, name, "Succeeded", timeout=240)
    elapsed = time.monotonic() - started
    _assert_trained(status, ["torch-mlp", "tf-mlp"])
    assert status["progress"] == "100%"
    assert status["sharing"]["node"] == "e2e-gpu"
    assert elapsed < 240
    print(
        f"\n{placement}: Succeeded in {elapsed:.1f}s; "
        + ", ".join(
            f"{n}: loss {m['firstLoss']:.3f} -> {m['loss']:.3f}, "
            f"{m['samplesPerSecond']:.0f} samples/s"
            for n, m in status["members"].items()
        )
    )


def test_failing_member_is_retried_and_the_job_still_succeeds(
    kube: Kube, namespace: str, e2e_job: Callable[..., JobBuilder], tmp_path: Path
) -> None:
    marker = tmp_path / "crashed-once"
    script = (
        "import os, sys\n"
        "from cotrain_trainer import report\n"
        f"marker = {str(marker)!r}\n"
        "if not os.path.exists(marker):\n"
        "    open(marker, 'w').close()\n"
        "    sys.exit(3)\n"
        "for step in range(1, 11):\n"
        "    report.step(step=step, loss=1.0 / step, samples=8, total_steps=10)\n"
    )
    builder = e2e_job("retry").run_policy(backoffLimit=2)
    builder.member(1, framework="PyTorch", command=["python", "-c", script], steps=None)
    kube.create_job(namespace, builder.build())
    status = kube.wait_phase(namespace, "retry", "Succeeded", timeout=180)
    assert status["members"]["tf"]["restarts"] == 1
    assert status["members"]["tf"]["phase"] == "Succeeded"
    assert status["members"]["torch"]["restarts"] == 0


def test_deleting_a_job_mid_run_stops_its_processes_and_children(
    kube: Kube,
    namespace: str,
    e2e_job: Callable[..., JobBuilder],
    kubelet: LocalKubelet,
    gc_ready: ControlPlane,
) -> None:
    kube.create_job(namespace, e2e_job("doomed", steps=100000).build())
    wait_for(
        "training",
        lambda: (
            (kube.job_status(namespace, "doomed").get("members") or {}).get("torch", {}).get("step")
        ),
        timeout=120,
    )
    pids = kubelet.processes()
    assert pids
    kube.custom.delete_namespaced_custom_object(
        "cotrain.dev", "v1alpha1", namespace, "cotrainjobs", "doomed"
    )
    wait_for("pods gone", lambda: not kube.pods(namespace, "doomed"), timeout=60)
    wait_for("processes gone", lambda: not any(_alive(pid) for pid in pids), timeout=60)
    # The namespace's trainer identity is no child of the job: it stays for the other jobs.
    account = kube.core.read_namespaced_service_account("cotrain-trainer", namespace)
    assert not account.metadata.owner_references


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_operator_restarted_mid_run_still_completes_without_duplicates(
    kube: Kube,
    namespace: str,
    e2e_job: Callable[..., JobBuilder],
    e2e_operator: OperatorProcess,
) -> None:
    kube.create_job(namespace, e2e_job("survivor", steps=150).build())
    wait_for(
        "training",
        lambda: (
            (kube.job_status(namespace, "survivor").get("members") or {}).get("tf", {}).get("step")
        ),
        timeout=120,
    )
    e2e_operator.kill()
    time.sleep(2)
    progress_before = kube.job_status(namespace, "survivor")["members"]["tf"]["step"]
    e2e_operator.start()
    status = kube.wait_phase(namespace, "survivor", "Succeeded", timeout=180)
    _assert_trained(status, ["torch", "tf"])
    assert status["members"]["tf"]["step"] >= progress_before
    assert kube.pod_names(namespace, "survivor") == ["survivor-gpu-0"]


@pytest.mark.parametrize("attempt", [1, 2, 3])  # must hold every time, not once by luck
def test_job_converges_through_api_faults(
    attempt: int, kube: Kube, namespace: str, e2e_job: Callable[..., JobBuilder], proxy: FaultProxy
) -> None:
    proxy.fail("POST", rf"/namespaces/{namespace}/pods$", 500, times=2)
    proxy.fail("PATCH", r"/cotrainjobs/faulted/status$", 409, times=2)
    proxy.fail("PATCH", r"/cotrainjobs/faulted/status$", 500, times=2)
    kube.create_job(namespace, e2e_job("faulted", steps=60).build())
    wait_for(
        "running",
        lambda: kube.job_status(namespace, "faulted").get("phase") == "Running",
        timeout=120,
    )
    proxy.drop_watches()
    time.sleep(1)
    proxy.drop_watches()
    status = kube.wait_phase(namespace, "faulted", "Succeeded", timeout=180)
    _assert_trained(status, ["torch", "tf"])
    assert kube.pod_names(namespace, "faulted") == ["faulted-gpu-0"]
