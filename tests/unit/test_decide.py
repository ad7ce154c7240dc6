"""The reconcile decision through a job's whole life, with the kubelet and trainer played."""

from __future__ import annotations

import json

from cotrain_operator.api.contract import EXIT_MEMBERS_FAILED, PodPlan
from tests.fixtures.cluster_state import ClusterState
from tests.fixtures.jobs import a_job
from tests.fixtures.nodes import gpu_node

NODE = gpu_node("gpu-a", sharing="time-slicing", replicas=4, memory_mib=24576)


def state(builder=None) -> ClusterState:  # type: ignore[no-untyped-def]
    return ClusterState((builder or a_job()).build(), NODE)


def test_same_gpu_job_runs_to_success() -> None:
    cluster = state()
    decision = cluster.settle()
    assert sorted(cluster.pods) == ["demo-gpu-0"]
    assert cluster.others == {}  # the namespace's trainer identity is the controller's to ensure
    assert cluster.status["phase"] == "Pending"
    assert cluster.condition("Schedulable")["status"] == "True"
    assert cluster.status["startTime"]
    assert decision.create == []  # the fixpoint: nothing more to do

    cluster.run_pods()
    cluster.settle()
    assert cluster.status["phase"] == "Running"
    assert cluster.status["readyMembers"] == "2/2"
    assert cluster.status["sharing"]["node"] == "gpu-a"

    cluster.report("torch", phase="Running", step=10, totalSteps=20, loss=0.5)
    cluster.report("tf", phase="Running", step=5, totalSteps=20, loss=0.7)
    cluster.settle()
    assert cluster.status["progress"] == "37%"

    cluster.report("torch", phase="Succeeded", step=20)
    cluster.report("tf", phase="Succeeded", step=20)
    cluster.end_pod("demo-gpu-0", 0)
    cluster.settle()
    assert cluster.status["phase"] == "Succeeded"
    assert cluster.condition("Succeeded")["status"] == "True"
    assert cluster.condition("Running")["status"] == "False"
    assert cluster.status["completionTime"]
    assert cluster.status["progress"] == "100%"


def test_pod_per_member_creates_one_pod_each_with_its_plan() -> None:
    cluster = state(a_job().placement(strategy="PodPerMember"))
    cluster.settle()
    assert sorted(cluster.pods) == ["demo-tf-0", "demo-torch-0"]
    env = {e["name"]: e["value"] for e in cluster.pods["demo-tf-0"]["spec"]["containers"][0]["env"]}
    plan = PodPlan.model_validate_json(env["COTRAIN_POD_PLAN"])
    assert [m.name for m in plan.members] == ["tf"]
    assert plan.budgets["tf"].memory_bytes == 6 * 2**30


def test_reconciling_twice_creates_nothing_twice() -> None:
    cluster = state()
    first = cluster.reconcile()
    second = cluster.reconcile()
    assert [c["metadata"]["name"] for c in first.create if c["kind"] == "Pod"] == ["demo-gpu-0"]
    assert second.create == []


def test_crash_is_retried_within_backoff_then_fails() -> None:
    cluster = state(a_job().run_policy(backoffLimit=1))
    cluster.settle()
    cluster.run_pods()
    cluster.end_pod("demo-gpu-0", 137, "OOMKilled")
    cluster.settle()
    assert "demo-gpu-1" in cluster.pods
    restarts = json.loads(
        cluster.pods["demo-gpu-1"]["metadata"]["annotations"]["cotrain.dev/restarts"]
    )
    assert restarts == {"torch": 1, "tf": 1}
    assert cluster.status["members"]["torch"]["restarts"] == 1
    assert cluster.status["phase"] == "Pending"

    cluster.run_pods()
    cluster.end_pod("demo-gpu-1", 137, "OOMKilled")
    cluster.settle()
    assert "demo-gpu-2" not in cluster.pods
    assert cluster.status["phase"] == "Failed"
    failed = cluster.condition("Failed")
    assert failed["status"] == "True"
    assert failed["reason"] == "BackoffLimitExceeded"
    assert "backoffLimit=1" in failed["message"]


def test_in_pod_restarts_count_toward_the_next_attempt() -> None:
    cluster = state(a_job().run_policy(backoffLimit=3))
    cluster.settle()
    cluster.run_pods()
    cluster.report("torch", phase="Running", restarts=2)
    cluster.end_pod("demo-gpu-0", 1)
    cluster.settle()
    restarts = json.loads(
        cluster.pods["demo-gpu-1"]["metadata"]["annotations"]["cotrain.dev/restarts"]
    )
    assert restarts == {"torch": 3, "tf": 1}


def test_co_tenant_fault_costs_the_victim_nothing() -> None:
    cluster = state(a_job().run_policy(backoffLimit=0).placement(strategy="PodPerMember"))
    cluster.settle()
    cluster.run_pods()
    cluster.report("tf", phase="Failed", reason="CoTenantFault")
    cluster.end_pod("demo-tf-0", 1)
    cluster.settle()
    assert "demo-tf-1" in cluster.pods
    assert cluster.status["phase"] != "Failed"


def test_members_failed_for_good_fail_the_job_with_the_trainer_reason() -> None:
    cluster = state()
    cluster.settle()
    cluster.run_pods()
    cluster.report("tf", phase="Failed", reason="GPUOutOfMemory", exitCode=75)
    cluster.report("torch", phase="Succeeded")
    cluster.end_pod("demo-gpu-0", EXIT_MEMBERS_FAILED)
    cluster.settle()
    assert cluster.status["phase"] == "Failed"
    assert cluster.condition("Failed")["reason"] == "GPUOutOfMemory"
    assert cluster.status["members"]["tf"]["reason"] == "GPUOutOfMemory"
    assert cluster.status["members"]["torch"]["phase"] == "Succeeded"


def test_any_member_succeeds_and_stops_the_rest() -> None:
    cluster = state(
        a_job().placement(strategy="PodPerMember").spec_fields(successPolicy="AnyMember")
    )
    cluster.settle()
    cluster.run_pods()
    cluster.report("torch", phase="Succeeded")
    cluster.end_pod("demo-torch-0", 0)
    decision = cluster.settle()
    assert cluster.status["phase"] == "Succeeded"
    assert "demo-tf-0" not in cluster.pods
    assert decision.delete_pods == []


def test_suspend_removes_pods_and_resume_recreates_them() -> None:
    cluster = state()
    cluster.settle()
    cluster.run_pods()
    cluster.settle()
    cluster.job["spec"]["runPolicy"] = {"suspend": True}
    cluster.settle()
    assert cluster.pods == {}
    assert cluster.status["phase"] == "Suspended"
    assert cluster.condition("Suspended")["status"] == "True"
    assert "startTime" not in cluster.status
    cluster.job["spec"]["runPolicy"] = {"suspend": False}
    cluster.settle()
    assert list(cluster.pods) == ["demo-gpu-0"]
    assert cluster.condition("Suspended")["status"] == "False"
    assert cluster.status["phase"] == "Pending"


def test_created_suspended_job_never_gets_pods() -> None:
    cluster = state(a_job().run_policy(suspend=True))
    cluster.settle()
    assert cluster.pods == {}
    assert cluster.others == {}
    assert cluster.status["phase"] == "Suspended"


def test_active_deadline_fails_the_job_and_stops_pods() -> None:
    cluster = state(a_job().run_policy(activeDeadlineSeconds=60))
    decision = cluster.settle()
    assert decision.requeue_after is not None
    assert decision.requeue_after <= 60
    cluster.run_pods()
    cluster.advance(61)
    cluster.settle()
    assert cluster.status["phase"] == "Failed"
    assert cluster.condition("Failed")["reason"] == "DeadlineExceeded"
    assert cluster.pods == {}


def test_ttl_deletes_the_finished_job() -> None:
    cluster = state(a_job().run_policy(ttlSecondsAfterFinished=30))
    cluster.settle()
    cluster.run_pods()
    cluster.end_pod("demo-gpu-0", 0)
    decision = cluster.settle()
    assert cluster.status["phase"] == "Succeeded"
    assert not cluster.job_deleted
    assert decision.requeue_after == 30
    cluster.advance(31)
    cluster.reconcile()
    assert cluster.job_deleted


def test_unschedulable_job_gets_a_reason_and_no_pods() -> None:
    builder = a_job().gpu(0, memory="20Gi").gpu(1, memory="20Gi")
    cluster = state(builder)
    decision = cluster.settle()
    assert cluster.pods == {}
    schedulable = cluster.condition("Schedulable")
    assert schedulable["status"] == "False"
    assert schedulable["reason"] == "NoNodeFits"
    assert "gpu-a (NVIDIA-L4, 1x 24576MiB, time-slicing x4)" in schedulable["message"]
    assert cluster.status["phase"] == "Pending"
    assert [e.reason for d in cluster.decisions for e in d.events].count("NoNodeFits") == 1
    assert decision.events == []


def test_invalid_spec_ends_failed_and_is_not_retried() -> None:
    document = a_job().build()
    document["spec"]["members"][0]["framework"] = "Jax"  # as if validation were off
    cluster = ClusterState(document, NODE)
    cluster.settle()
    failed = cluster.condition("Failed")
    assert cluster.status["phase"] == "Failed"
    assert failed["reason"] == "InvalidSpec"
    assert "spec.members[0].framework" in failed["message"]
    assert cluster.pods == {}
    again = cluster.reconcile()
    assert again.create == []
    assert again.status_patch == {}
    assert again.events == []
    # Fixing the spec (a new generation) reopens the job.
    cluster.job["spec"]["members"][0]["framework"] = "PyTorch"
    cluster.job["metadata"]["generation"] = 2
    cluster.settle()
    assert cluster.status["phase"] == "Pending"
    assert list(cluster.pods) == ["demo-gpu-0"]
    assert "completionTime" not in cluster.status


def test_untrusted_reports_are_validated_field_by_field() -> None:
    cluster = state()
    cluster.settle()
    cluster.run_pods()
    cluster.report("torch", step=-5, totalSteps="lots", loss=0.3, phase="Exploded")
    cluster.report("intruder", phase="Succeeded")
    cluster.settle()
    assert cluster.status["phase"] == "Running"
    assert cluster.status["members"]["torch"]["phase"] == "Running"
    assert "progress" not in cluster.status


def test_conditions_keep_transition_times_when_nothing_flips() -> None:
    cluster = state()
    cluster.settle()
    before = cluster.condition("Admitted")["lastTransitionTime"]
    cluster.advance(100)
    cluster.run_pods()
    cluster.settle()
    assert cluster.condition("Admitted")["lastTransitionTime"] == before
    assert cluster.condition("Running")["lastTransitionTime"] != before


def test_a_succeeded_job_leaves_its_finishing_pods_alone() -> None:
    cluster = state()
    cluster.settle()
    cluster.run_pods()
    cluster.report("torch", phase="Succeeded")
    cluster.report("tf", phase="Succeeded")
    cluster.settle()
    assert cluster.status["phase"] == "Succeeded"
    # The kubelet has not yet said the pod ended: it must not be killed for it.
    assert cluster.pods["demo-gpu-0"]["status"]["phase"] == "Running"
    assert cluster.reconcile().delete_pods == []


def test_start_time_is_recovered_when_the_status_write_was_lost() -> None:
    cluster = state()
    cluster.reconcile()
    # The operator died after creating the pod and before writing the status.
    cluster.job.pop("status")
    cluster.pods["demo-gpu-0"]["metadata"]["creationTimestamp"] = "2026-11-22T11:59:00Z"
    cluster.settle()
    assert cluster.status["startTime"] == "2026-11-22T11:59:00Z"


def test_a_pod_name_another_jobs_pod_has_waits_and_says_why() -> None:
    # Job "a-b" with member "c" and job "a" with member "b-c" both name a pod a-b-c-0.
    cluster = state(a_job("a-b").placement(strategy="PodPerMember").member(0, name="c"))
    cluster.pod_jobs = {"a-b-c-0": "a", "a-b-tf-0": "a-b"}  # its own name does not count
    decision = cluster.reconcile()
    assert decision.create == []
    assert cluster.status["phase"] == "Pending"
    assert "startTime" not in cluster.status
    taken = cluster.condition("Schedulable")
    assert (taken["status"], taken["reason"]) == ("False", "PodNameTaken")
    assert taken["message"].startswith("pod a-b-c-0 is a pod of CoTrainJob a: ")
    assert [e.reason for e in decision.events] == ["PodNameTaken"]
    assert decision.requeue_after == 30
    assert cluster.reconcile().events == []  # said once

    cluster.pod_jobs = {}  # the other job's pod is gone
    cluster.settle()
    assert sorted(cluster.pods) == ["a-b-c-0", "a-b-tf-0"]
    assert cluster.condition("Schedulable")["status"] == "True"


def test_the_schedulers_verdict_on_a_pending_pod_is_the_jobs_schedulability() -> None:
    cluster = state()
    cluster.settle()
    assert cluster.condition("Schedulable")["status"] == "True"  # our own fit check
    verdict = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    cluster.pods["demo-gpu-0"]["status"]["conditions"] = [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": verdict}
    ]
    cluster.settle()
    schedulable = cluster.condition("Schedulable")
    assert (schedulable["status"], schedulable["reason"]) == ("False", "Unschedulable")
    assert schedulable["message"] == f"pod demo-gpu-0: {verdict}"
    running = cluster.condition("Running")
    assert (running["reason"], running["message"]) == ("Unschedulable", schedulable["message"])
    warnings = [e for d in cluster.decisions for e in d.events if e.reason == "Unschedulable"]
    assert len(warnings) == 1  # once, not on every reconcile
    # Bound at last: the condition mends.
    pod = cluster.pods["demo-gpu-0"]
    pod["spec"]["nodeName"] = "gpu-a"
    pod["status"]["conditions"] = [{"type": "PodScheduled", "status": "True"}]
    cluster.settle()
    schedulable = cluster.condition("Schedulable")
    assert (schedulable["status"], schedulable["reason"]) == ("True", "Scheduled")
    assert "demo-gpu-0 on gpu-a" in schedulable["message"]


def test_a_bound_pod_writes_no_status_of_its_own() -> None:
    cluster = state()
    cluster.settle()
    written = len([d for d in cluster.decisions if d.status_patch])
    cluster.pods["demo-gpu-0"]["spec"]["nodeName"] = "gpu-a"
    cluster.pods["demo-gpu-0"]["status"]["conditions"] = [
        {"type": "PodScheduled", "status": "True"}
    ]
    cluster.settle()
    patches = [d.status_patch for d in cluster.decisions if d.status_patch][written:]
    assert all("conditions" not in p for p in patches), patches
