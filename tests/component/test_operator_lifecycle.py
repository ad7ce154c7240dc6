"""The real operator against the real API server: pods per mode, lifecycle, policy, status."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.fixtures.jobs import JobBuilder
from tests.fixtures.kube import GROUP, PLURAL, VERSION, Kube, wait_for
from tests.fixtures.operator_process import OperatorProcess

pytestmark = pytest.mark.usefixtures("operator")


def test_same_gpu_job_gets_one_pod_and_its_reporting_identity(
    kube: Kube, namespace: str, make_node: Callable[..., str], job: Callable[[str], JobBuilder]
) -> None:
    node = make_node(sharing="time-slicing", replicas=4, renamed=True)
    kube.create_job(namespace, job("demo").sharing(mode="TimeSlicing").build())
    names = wait_for("the pod", lambda: kube.pod_names(namespace, "demo"))
    assert names == ["demo-gpu-0"]
    pod = kube.pods(namespace, "demo")[0]
    limits = pod["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu.shared"] == "1"
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "CoTrainJob"
    status = wait_for(
        "the sharing status", lambda: (s := kube.job_status(namespace, "demo")).get("sharing") and s
    )
    assert status["phase"] == "Pending"
    assert status["sharing"]["mode"] == "TimeSlicing"
    assert status["sharing"]["resource"] == "nvidia.com/gpu.shared"
    # The namespace's trainer identity came with its first pod.
    assert kube.core.read_namespaced_service_account("cotrain-trainer", namespace)
    binding = kube.rbac.read_namespaced_role_binding("cotrain-trainer", namespace)
    assert binding.role_ref.name == "cotrain-trainer"

    kube.run_pod(namespace, "demo-gpu-0", node)
    status = kube.wait_phase(namespace, "demo", "Running")
    assert status["readyMembers"] == "2/2"
    assert status["sharing"]["node"] == node


def test_trainer_reports_merge_into_status_and_the_job_succeeds(
    kube: Kube, namespace: str, make_node: Callable[..., str], job: Callable[[str], JobBuilder]
) -> None:
    node = make_node(sharing="time-slicing", replicas=2)
    kube.create_job(namespace, job("demo").build())
    wait_for("the pod", lambda: kube.pod_names(namespace, "demo"))
    kube.run_pod(namespace, "demo-gpu-0", node)
    kube.wait_phase(namespace, "demo", "Running")
    # What the trainer's reporter sends: each member merge-patches only its own key.
    kube.patch_job_status(
        namespace,
        "demo",
        {
            "members": {
                "torch": {
                    "phase": "Running",
                    "step": 10,
                    "totalSteps": 20,
                    "loss": 0.4,
                    "samplesPerSecond": 900.0,
                }
            }
        },
    )
    kube.patch_job_status(
        namespace,
        "demo",
        {"members": {"tf": {"phase": "Running", "step": 20, "totalSteps": 20, "loss": 0.3}}},
    )
    status = wait_for(
        "progress", lambda: (s := kube.job_status(namespace, "demo")).get("progress") == "75%" and s
    )
    assert status["members"]["torch"]["samplesPerSecond"] == 900.0
    assert status["members"]["tf"]["loss"] == 0.3
    kube.patch_job_status(
        namespace,
        "demo",
        {"members": {"torch": {"phase": "Succeeded", "step": 20}, "tf": {"phase": "Succeeded"}}},
    )
    kube.set_pod_phase(namespace, "demo-gpu-0", "Succeeded", 0)
    status = kube.wait_phase(namespace, "demo", "Succeeded")
    assert status["completionTime"]
    succeeded = kube.condition(namespace, "demo", "Succeeded")
    assert succeeded is not None
    assert succeeded["status"] == "True"
    assert succeeded["observedGeneration"] == 1


def test_job_that_cannot_fit_is_unschedulable_without_pods(
    kube: Kube, namespace: str, make_node: Callable[..., str], job: Callable[[str], JobBuilder]
) -> None:
    make_node(sharing="time-slicing", replicas=4, memory_mib=16384)
    kube.create_job(namespace, job("big").gpu(0, memory="8Gi").build())
    condition = wait_for(
        "Schedulable=False",
        lambda: (
            (c := kube.condition(namespace, "big", "Schedulable")) and c["status"] == "False" and c
        ),
    )
    assert condition["reason"] == "NoNodeFits"
    assert "4096MiB, less than the 8192MiB" in condition["message"]
    assert kube.pod_names(namespace, "big") == []


def test_member_failure_restarts_within_backoff_then_fails(
    kube: Kube, namespace: str, make_node: Callable[..., str], job: Callable[[str], JobBuilder]
) -> None:
    node = make_node(sharing="time-slicing", replicas=4)
    kube.create_job(namespace, job("flaky").run_policy(backoffLimit=1).build())
    wait_for("first pod", lambda: kube.pod_names(namespace, "flaky") == ["flaky-gpu-0"])
    kube.run_pod(namespace, "flaky-gpu-0", node)
    kube.set_pod_phase(namespace, "flaky-gpu-0", "Failed", 137, "OOMKilled")
    wait_for("second attempt", lambda: "flaky-gpu-1" in kube.pod_names(namespace, "flaky"))
    pod = next(p for p in kube.pods(namespace, "flaky") if p["metadata"]["name"] == "flaky-gpu-1")
    assert json.loads(pod["metadata"]["annotations"]["cotrain.dev/restarts"]) == {
        "torch": 1,
        "tf": 1,
    }
    kube.run_pod(namespace, "flaky-gpu-1", node)
    kube.set_pod_phase(namespace, "flaky-gpu-1", "Failed", 137, "OOMKilled")
    status = kube.wait_phase(namespace, "flaky", "Failed")
    assert status["members"]["torch"]["reason"] == "BackoffLimitExceeded"
    failed = kube.condition(namespace, "flaky", "Failed")
    assert failed is not None
    assert failed["reason"] == "BackoffLimitExceeded"
    assert kube.pod_names(namespace, "flaky") == ["flaky-gpu-0", "flaky-gpu-1"]


def test_suspend_and_resume(
    kube: Kube, namespace: str, make_node: Callable[..., str], job: Callable[[str], JobBuilder]
) -> None:
    node = make_node(sharing="time-slicing", replicas=4)
    kube.create_job(namespace, job("sus").build())
    wait_for("pod", lambda: kube.pod_names(namespace, "sus"))
    kube.run_pod(namespace, "sus-gpu-0", node)
    kube.wait_phase(namespace, "sus", "Running")
    kube.patch_job(namespace, "sus", {"spec": {"runPolicy": {"suspend": True}}})
    kube.wait_phase(namespace, "sus", "Suspended")
    wait_for("pods gone", lambda: kube.pod_names(namespace, "sus") == [])
    # The kubelet would confirm the deletion; play it, so the names are free again.
    kube.finish_deletions(namespace)
    kube.patch_job(namespace, "sus", {"spec": {"runPolicy": {"suspend": False}}})
    wait_for("pod back", lambda: len(kube.pod_names(namespace, "sus")) == 1)
    kube.wait_phase(namespace, "sus", "Pending")
    condition = kube.condition(namespace, "sus", "Suspended")
    assert condition is not None
    assert condition["status"] == "False"


def test_ttl_deletes_a_finished_job(
    kube: Kube, namespace: str, make_node: Callable[..., str], job: Callable[[str], JobBuilder]
) -> None:
    node = make_node(sharing="time-slicing", replicas=4)
    kube.create_job(namespace, job("ttl").run_policy(ttlSecondsAfterFinished=2).build())
    wait_for("pod", lambda: kube.pod_names(namespace, "ttl"))
    kube.run_pod(namespace, "ttl-gpu-0", node)
    kube.set_pod_phase(namespace, "ttl-gpu-0", "Succeeded", 0)
    kube.wait_phase(namespace, "ttl", "Succeeded")

    def gone() -> bool:
        listed = kube.custom.list_namespaced_custom_object(
            "cotrain.dev", "v1alpha1", namespace, "cotrainjobs"
        )
        return not listed["items"]

    wait_for("job deleted by TTL", gone, timeout=30)


def test_active_deadline_fails_the_job(
    kube: Kube, namespace: str, make_node: Callable[..., str], job: Callable[[str], JobBuilder]
) -> None:
    node = make_node(sharing="time-slicing", replicas=4)
    kube.create_job(namespace, job("late").run_policy(activeDeadlineSeconds=2).build())
    wait_for("pod", lambda: kube.pod_names(namespace, "late"))
    kube.run_pod(namespace, "late-gpu-0", node)
    kube.wait_phase(namespace, "late", "Failed", timeout=30)
    failed = kube.condition(namespace, "late", "Failed")
    assert failed is not None
    assert failed["reason"] == "DeadlineExceeded"
    wait_for("pod deleted", lambda: kube.pod_names(namespace, "late") == [])


def test_operator_metrics_are_served(operator: OperatorProcess) -> None:
    text = operator.metrics()
    assert "cotrain_reconcile_duration_seconds_bucket" in text
    assert "cotrain_api_requests_total" in text
    # deploy/base/trainer.yaml is installed here, and the operator may check that it is.
    assert "cotrain_trainer_policy_installed 1.0" in text
    assert "trainer admission policy" not in operator.logs()
    assert "deploy/base/trainer.yaml" not in operator.logs()
    # deploy/'s ClusterRole was enough for everything the operator did in this session. (An
    # Event posted into a namespace the previous test is deleting is refused with a 403 by the
    # NamespaceLifecycle admission, not by RBAC: Events are best effort and not counted here.)
    refused = [
        line
        for line in text.splitlines()
        if line.startswith("cotrain_api_requests_total{")
        and 'code="403"' in line
        and 'resource="event"' not in line
    ]
    assert refused == []


def test_a_running_jobs_members_are_served_as_metrics_until_it_is_deleted(
    kube: Kube,
    namespace: str,
    make_node: Callable[..., str],
    job: Callable[[str], JobBuilder],
    operator: OperatorProcess,
) -> None:
    node = make_node(sharing="time-slicing", replicas=2)
    kube.create_job(namespace, job("watched").build())
    wait_for("the pod", lambda: kube.pod_names(namespace, "watched"))
    kube.run_pod(namespace, "watched-gpu-0", node)
    kube.wait_phase(namespace, "watched", "Running")
    report = {"phase": "Running", "step": 7, "totalSteps": 20, "loss": 0.25,
              "samplesPerSecond": 640.0, "gpuMemoryBytes": 3 * 2**30}  # fmt: skip
    kube.patch_job_status(namespace, "watched", {"members": {"torch": report}})
    labels = f'job="watched",member="torch",namespace="{namespace}"'
    wanted = [
        f"cotrain_member_step{{{labels}}} 7.0",
        f"cotrain_member_total_steps{{{labels}}} 20.0",
        f"cotrain_member_loss{{{labels}}} 0.25",
        f"cotrain_member_samples_per_second{{{labels}}} 640.0",
        f"cotrain_member_gpu_memory_bytes{{{labels}}} 3.221225472e+09",
        f'cotrain_member_phase{{{labels},phase="Running"}} 1.0',
        f'cotrain_member_phase{{{labels},phase="Failed"}} 0.0',
    ]
    text = wait_for(
        "the member's series",
        lambda: (t := operator.metrics()) and all(w in t for w in wanted) and t,
    )
    tf = f'job="watched",member="tf",namespace="{namespace}"'
    assert f"cotrain_member_restarts{{{tf}}} 0.0" in text  # the operator's own entry for tf
    kube.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "watched")
    wait_for("the series gone", lambda: 'job="watched"' not in operator.metrics())


def test_pod_security_admission_really_enforces_restricted(kube: Kube, namespace: str) -> None:
    """The guard the other tests rely on: a non-restricted pod is refused in test namespaces."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    pod = client.V1Pod.model_validate(
        {
            "metadata": {"name": "rooty"},
            "spec": {
                "containers": [
                    {"name": "c", "image": "busybox", "securityContext": {"privileged": True}}
                ]
            },
        }
    )
    with pytest.raises(ApiException) as refused:
        kube.core.create_namespaced_pod(namespace, pod)
    assert refused.value.status == 403
    assert "violates PodSecurity" in str(refused.value.body)


SHARES = {
    # mode: (node kwargs, sharing fields, the resource each pod must request)
    "Exclusive": ({"count": 4}, {}, "nvidia.com/gpu"),
    "TimeSlicing": (
        {"sharing": "time-slicing", "replicas": 8, "renamed": True},
        {},
        "nvidia.com/gpu.shared",
    ),
    "MPS": ({"sharing": "mps", "replicas": 8}, {}, "nvidia.com/gpu"),
    "MIG": ({"mig": {"1g.10gb": (7, 9984)}}, {"migProfile": "1g.10gb"}, "nvidia.com/mig-1g.10gb"),
}


def test_every_mode_and_placement_gets_the_right_pods(
    kube: Kube, namespace: str, make_node: Callable[..., str], job: Callable[[str], JobBuilder]
) -> None:
    expected: dict[str, tuple[str, list[str], str]] = {}
    for mode, (node_kwargs, sharing, resource) in SHARES.items():
        pool = make_node(extra_labels={"mode": mode.lower()}, **node_kwargs)
        for strategy in ("SameGPU", "PodPerMember"):
            name = f"{mode.lower()}-{'same' if strategy == 'SameGPU' else 'each'}"
            builder = (
                job(name)
                .sharing(mode=mode, **sharing)
                .placement(strategy=strategy, nodeSelector={"mode": mode.lower()})
            )
            kube.create_job(namespace, builder.build())
            pods = (
                [f"{name}-gpu-0"] if strategy == "SameGPU" else [f"{name}-tf-0", f"{name}-torch-0"]
            )
            expected[name] = (resource, pods, pool)
    for name, (resource, pods, pool) in expected.items():
        wait_for(f"{name} pods", lambda n=name, p=pods: kube.pod_names(namespace, n) == p)
        for pod in kube.pods(namespace, name):
            spec = pod["spec"]
            assert spec["containers"][0]["resources"]["limits"][resource] == "1"
            terms = spec["affinity"]["nodeAffinity"][
                "requiredDuringSchedulingIgnoredDuringExecution"
            ]
            assert terms["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == [pool]
        # The pods are created before the status patch of the same reconcile lands.
        sharing = wait_for(
            f"{name} sharing status",
            lambda n=name: kube.job_status(namespace, n).get("sharing", {}).get("resource"),
        )
        assert sharing == resource


def test_replicated_member_gets_peer_pods_and_a_headless_service(
    kube: Kube, namespace: str, make_node: Callable[..., str], job: Callable[[str], JobBuilder]
) -> None:
    make_node(count=4)
    builder = (
        job("dp")
        .sharing(mode="Exclusive")
        .placement(strategy="PodPerMember")
        .member(0, replicas=2)
        .member(1, replicas=1)
    )
    kube.create_job(namespace, builder.build())
    wait_for(
        "pods",
        lambda: kube.pod_names(namespace, "dp") == ["dp-tf-0", "dp-torch-0-0", "dp-torch-1-0"],
    )
    service = kube.core.read_namespaced_service("dp-torch", namespace)
    assert service.spec.cluster_ip == "None"
    assert service.spec.selector == {"cotrain.dev/job": "dp", "cotrain.dev/member": "torch"}
    pods = {p["metadata"]["name"]: p for p in kube.pods(namespace, "dp")}
    replica = pods["dp-torch-1-0"]
    assert replica["spec"]["hostname"] == "torch-1"
    assert replica["spec"]["subdomain"] == "dp-torch"
    assert replica["metadata"]["labels"]["cotrain.dev/replica"] == "1"
    env = {e["name"]: e["value"] for e in replica["spec"]["containers"][0]["env"]}
    plan = json.loads(env["COTRAIN_POD_PLAN"])
    assert plan["topology"]["torch"]["masterAddr"] == f"torch-0.dp-torch.{namespace}.svc"
    assert plan["topology"]["torch"]["replicaIndices"] == [1]


def test_a_job_whose_pod_name_another_job_has_waits_and_says_why(
    kube: Kube, namespace: str, make_node: Callable[..., str], job: Callable[[str], JobBuilder]
) -> None:
    make_node(count=4)
    split = {"strategy": "PodPerMember"}
    # Job "a" with member "b-c" and job "a-b" with member "c" both name a pod a-b-c-0.
    kube.create_job(
        namespace,
        job("a").sharing(mode="Exclusive").placement(**split).member(0, name="b-c").build(),
    )
    wait_for("a's pods", lambda: len(kube.pod_names(namespace, "a")) == 2)
    kube.create_job(
        namespace,
        job("a-b").sharing(mode="Exclusive").placement(**split).member(0, name="c").build(),
    )

    def taken() -> dict[str, Any] | None:
        condition = kube.condition(namespace, "a-b", "Schedulable")
        return condition if condition and condition["reason"] == "PodNameTaken" else None

    condition = wait_for("a-b says why it waits", taken)
    assert condition["message"].startswith("pod a-b-c-0 is a pod of CoTrainJob a: ")
    assert kube.job_status(namespace, "a-b")["phase"] == "Pending"
    assert kube.pod_names(namespace, "a-b") == []
    assert sorted(kube.pod_names(namespace, "a")) == ["a-b-c-0", "a-tf-0"]
