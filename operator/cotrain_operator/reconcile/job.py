"""The reconcile decision: (job, its observed pods, the GPU nodes, now) -> what to do.

Owns the controller's logic as one pure function, `decide`: validate the spec (an invalid one ends
as Failed/InvalidSpec), honour suspend, place the pods, create missing attempts, recreate crashed
ones within backoffLimit (a CoTenantFault costs the victim nothing), enforce
activeDeadlineSeconds and the success policy, expire finished jobs after their TTL, and compute
the status and the Events for every transition. `k8s.py` carries the `Decision` out; running it
twice on the same observations gives the same objects, so a restarted operator duplicates nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cotrain_operator.api.contract import (
    EXIT_MEMBERS_FAILED,
    LABEL_ATTEMPT,
    LABEL_GROUP,
    REASON_BACKOFF_EXCEEDED,
    REASON_CO_TENANT_FAULT,
    REASON_COMPLETED,
    REASON_ERROR,
    REASON_FAILED_CREATE,
    REASON_GPU_OOM,
    REASON_INVALID_SPEC,
    REASON_OOM_KILLED,
    TRAINER_CONTAINER,
)
from cotrain_operator.api.models import (
    CoTrainJob,
    JobPhase,
    MemberPhase,
    MemberStatus,
    SuccessPolicy,
    read_member_report,
)
from cotrain_operator.api.validation import InvalidJobError, parse_job
from cotrain_operator.reconcile.children import (
    ANNOTATION_RESTARTS,
    build_peer_services,
    build_pod,
)
from cotrain_operator.reconcile.placement import (
    Placement,
    PodGroup,
    Unschedulable,
    place,
    pod_groups,
)
from cotrain_operator.reconcile.queueing import (
    QUEUE_LABEL,
    REASON_KUEUE_DISABLED,
    REASON_NOT_QUEUEABLE,
    KueueObjects,
    assigned_flavors,
    build_workload,
    condition_true,
    finished_patch,
    pod_set_name,
    queue_name,
    release_patch,
    shape,
    waiting_message,
)
from cotrain_operator.reconcile.status import (
    CONDITION_TYPES,
    merge_patch,
    parse_time,
    progress_text,
    rfc3339,
    set_condition,
    with_kstatus,
)
from cotrain_operator.settings import DecisionSettings
from cotrain_operator.sharing import GpuNode

DEFAULT_DECISIONS = DecisionSettings()

TERMINAL = (JobPhase.SUCCEEDED.value, JobPhase.FAILED.value)
# Member reasons that explain a job's failure better than a generic one.
SPECIFIC_REASONS = (REASON_GPU_OOM, REASON_OOM_KILLED, REASON_BACKOFF_EXCEEDED)


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Decision:
    """What one reconcile wants done, in order: create, delete, patch status, delete job."""

    create: list[dict[str, Any]] = field(default_factory=list)
    delete_pods: list[str] = field(default_factory=list)
    status_patch: dict[str, Any] = field(default_factory=dict)
    delete_job: bool = False
    requeue_after: float | None = None
    events: list[Event] = field(default_factory=list)
    phase: str | None = None
    # No node has room for a pod the job needs now: look again once a GPU share is released.
    waits_for_capacity: bool = False
    # The job's Kueue Workload: a merge patch of its status, or its name to delete it.
    workload_status: dict[str, Any] = field(default_factory=dict)
    delete_workload: str | None = None

    def requeue(self, seconds: float) -> None:
        seconds = max(0.5, seconds)
        self.requeue_after = (
            seconds if self.requeue_after is None else min(self.requeue_after, seconds)
        )


@dataclass
class _GroupState:
    """What became of one pod group."""

    group: PodGroup
    pods: list[Mapping[str, Any]]
    current: Mapping[str, Any] | None = None
    outcome: str = "Pending"  # Pending | Running | Succeeded | Failed
    reason: str | None = None
    message: str | None = None
    exit_code: int | None = None
    restarts: dict[str, int] = field(default_factory=dict)


def _attempt(pod: Mapping[str, Any]) -> int:
    try:
        return int(pod["metadata"]["labels"][LABEL_ATTEMPT])
    except (KeyError, TypeError, ValueError):
        return -1


def _pod_phase(pod: Mapping[str, Any]) -> str:
    return str((pod.get("status") or {}).get("phase") or "Pending")


def _active(pod: Mapping[str, Any]) -> bool:
    terminating = (pod.get("metadata") or {}).get("deletionTimestamp")
    return not terminating and _pod_phase(pod) not in ("Succeeded", "Failed")


def _terminated(pod: Mapping[str, Any]) -> tuple[int | None, str | None, str | None]:
    """(exit code, reason, message) of the trainer container, or the pod's own reason."""
    status = pod.get("status") or {}
    for container in status.get("containerStatuses") or []:
        if container.get("name") != TRAINER_CONTAINER:
            continue
        terminated = (container.get("state") or {}).get("terminated") or {}
        if terminated:
            code = terminated.get("exitCode")
            return (
                code if isinstance(code, int) else None,
                terminated.get("reason"),
                terminated.get("message"),
            )
    return None, status.get("reason"), status.get("message")


def _pod_members(pod: Mapping[str, Any]) -> list[str]:
    """The members a pod runs, from the restarts annotation every trainer pod carries."""
    return list(_baseline(pod))


def _baseline(pod: Mapping[str, Any]) -> dict[str, int]:
    raw = ((pod.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_RESTARTS, "{}")
    try:
        parsed = json.loads(raw)
    except (TypeError, ValueError):
        return {}
    if not isinstance(parsed, dict):
        return {}
    return {str(k): v for k, v in parsed.items() if isinstance(v, int) and v >= 0}


def observed_status(body: Mapping[str, Any]) -> dict[str, Any]:
    """The job's status as far as it has the shape the operator writes: reporters write into it
    and a lax install may not check their types, so a status, condition or member entry of the
    wrong type counts as absent rather than failing every reconcile of the job."""
    raw = body.get("status")
    status = dict(raw) if isinstance(raw, Mapping) else {}
    conditions = status.get("conditions")
    if conditions is not None:
        status["conditions"] = (
            [c for c in conditions if isinstance(c, Mapping)]
            if isinstance(conditions, list)
            else []
        )
    members = status.get("members")
    if members is not None:
        status["members"] = (
            {k: v for k, v in members.items() if isinstance(v, Mapping)}
            if isinstance(members, Mapping)
            else {}
        )
    return status


def _failed(
    body: Mapping[str, Any],
    reason: str,
    message: str,
    generation: int | None,
    now: datetime,
    pods: Sequence[Mapping[str, Any]],
) -> Decision:
    status = observed_status(body)
    decision = Decision(phase=JobPhase.FAILED.value)
    conditions = list(status.get("conditions") or [])
    conditions = set_condition(conditions, "Failed", True, reason, message, generation, now)
    conditions = set_condition(conditions, "Running", False, reason, message, generation, now)
    conditions = with_kstatus(
        conditions, JobPhase.FAILED.value, reason, message, generation, now, under_way=False
    )
    desired = {
        "phase": JobPhase.FAILED.value,
        "conditions": conditions,
        "observedGeneration": generation,
        "completionTime": status.get("completionTime") or rfc3339(now),
    }
    decision.status_patch = merge_patch(status, desired)
    decision.delete_pods = [p["metadata"]["name"] for p in pods if _active(p)]
    if status.get("phase") != JobPhase.FAILED.value:
        decision.events.append(Event("Warning", reason, message))
    return decision


REASON_POD_NAME_TAKEN = "PodNameTaken"
REASON_UNSCHEDULABLE = "Unschedulable"  # kube-scheduler's reason for a pod it cannot place
# The longest message the operator writes into a condition.
MAX_MESSAGE = 4096
POD_NAME_RETRY_SECONDS = 30.0


def decide(
    body: Mapping[str, Any],
    pods: Sequence[Mapping[str, Any]],
    nodes: Sequence[GpuNode],
    now: datetime,
    pod_jobs: Mapping[str, str] | None = None,
    *,
    capacity: Sequence[GpuNode] | None = None,
    workload: Mapping[str, Any] | None = None,
    kueue: KueueObjects | None = None,
    settings: DecisionSettings = DEFAULT_DECISIONS,
) -> Decision:
    """Everything the operator should do for one job given what it observes now.

    `pod_jobs`: the job of each trainer pod the operator sees in the job's namespace, by pod
    name, so that a pod name another job's pod already has is not asked for again.
    `capacity`: the GPU nodes as they are, before our pods' shares are taken off (`nodes`);
    what a queued job's Workload asks for is planned on them. `workload`: the job's Kueue
    Workload; `kueue`: the cluster's Kueue objects, None when the operator does not queue;
    `settings`: the operator's settings that decisions read (its trainer image, CPU threads)."""
    metadata = body.get("metadata") or {}
    generation = metadata.get("generation")
    status = observed_status(body)
    phase = status.get("phase")

    if phase in TERMINAL and not _reopened(status, generation):
        ended = _finished(body, status, pods, now)
        if workload is not None and not condition_true(workload, "Finished"):
            conditions = status.get("conditions") or []
            ending: Mapping[str, Any] = next((c for c in conditions if c.get("type") == phase), {})
            message = str(ending.get("message") or phase)
            succeeded = phase == JobPhase.SUCCEEDED.value
            ended.workload_status = finished_patch(workload, succeeded, message, now)
        return ended

    try:
        job = parse_job(
            {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in body}
        )
    except InvalidJobError as error:
        message = "the spec is invalid: " + "; ".join(str(v) for v in error.violations)
        return _failed(body, REASON_INVALID_SPEC, message, generation, now, pods)

    # What Kueue's admission adds to the pods: its ResourceFlavors' node labels and tolerations.
    flavor_labels: dict[str, str] = {}
    tolerations: list[Mapping[str, Any]] = []
    queue = queue_name(body)
    if queue is not None:
        gate = _queue_gate(
            body,
            job,
            status,
            pods,
            capacity or nodes,
            generation,
            now,
            queue,
            workload,
            kueue,
            settings,
        )
        if isinstance(gate, Decision):
            return gate
        job, flavor_labels, tolerations = gate
    elif job.spec.run_policy.suspend:
        return _suspended(body, status, pods, generation, now)

    decision = Decision()
    conditions = list(status.get("conditions") or [])
    conditions = set_condition(
        conditions, "Admitted", True, "Admitted", "the job may run", generation, now
    )
    conditions = set_condition(
        conditions, "Suspended", False, "Resumed", "the job is not suspended", generation, now
    )
    start_time = parse_time(status.get("startTime"))

    # Deadline first: nothing else matters once it has passed.
    deadline = job.spec.run_policy.active_deadline_seconds
    if deadline is not None and start_time is not None:
        remaining = deadline - (now - start_time).total_seconds()
        if remaining <= 0:
            return _failed(
                body,
                "DeadlineExceeded",
                f"the job ran longer than activeDeadlineSeconds={deadline}",
                generation,
                now,
                pods,
            )
        decision.requeue(remaining)

    reports = {
        name: read_member_report(raw)
        for name, raw in (status.get("members") or {}).items()
        if name in {m.name for m in job.spec.members}
    }
    groups = [_observe(group, pods, reports) for group in pod_groups(job)]
    for state in groups:
        if state.outcome == "Crashed" and state.group.replica is None:
            _retry_crashed(body, job, state, reports, nodes, decision, settings)
    for gang in _gangs(groups).values():
        _settle_gang(body, job, gang, reports, nodes, decision, settings)
    placement: Placement | Unschedulable | None = None
    if any(g.outcome == "Pending" and g.current is None for g in groups):
        placement = place(job, list(nodes), settings.default_cpu_threads)

    if isinstance(placement, Unschedulable):
        decision.waits_for_capacity = True
        conditions = set_condition(
            conditions, "Schedulable", False, placement.reason, placement.message, generation, now
        )
        if not condition_is(status, "Schedulable", False, placement.message):
            decision.events.append(Event("Warning", placement.reason, placement.message))
    elif placement is not None:
        conditions = set_condition(
            conditions, "Schedulable", True, "Fits", _fit_message(placement), generation, now
        )
        _create_missing(body, job, placement, groups, decision, settings)

    verdict = _scheduler_verdict(groups) if placement is None else None
    if verdict is not None:
        # The pods exist: kube-scheduler's word on them is the job's schedulability now. A bound
        # pod only mends a False condition (no status write for the usual way of things).
        fits, why, detail = verdict
        if not fits or _condition_status(status, "Schedulable") == "False":
            conditions = set_condition(
                conditions, "Schedulable", fits, why, detail, generation, now
            )
        if not fits and not condition_is(status, "Schedulable", False, detail):
            decision.events.append(Event("Warning", why, detail))

    taken = _name_taken(body, decision, pod_jobs or {})
    if taken is not None:
        # No child of this job until the name is free: it stays Pending and says why.
        decision.create.clear()
        conditions = set_condition(
            conditions, "Schedulable", False, REASON_POD_NAME_TAKEN, taken, generation, now
        )
        if not condition_is(status, "Schedulable", False, taken):
            decision.events.append(Event("Warning", REASON_POD_NAME_TAKEN, taken))
        decision.requeue(POD_NAME_RETRY_SECONDS)

    member_status = _member_status(job, groups, reports)
    job_phase, reason, message = _job_phase(job, groups, member_status, placement)
    if job_phase == JobPhase.PENDING.value and verdict is not None and not verdict[0]:
        reason, message = verdict[1], verdict[2]
    started = status.get("startTime") or _start_time(pods, decision, now)
    finished = job_phase in TERMINAL

    # The Running, Succeeded and Failed conditions follow the phase; when one does not hold it
    # says so plainly (Running keeps the reason, e.g. why the job is still Pending).
    for kind, holds_in, otherwise_reason, otherwise_message in (
        ("Running", JobPhase.RUNNING.value, reason, message),
        ("Succeeded", JobPhase.SUCCEEDED.value, "NotSucceeded", "the job has not succeeded"),
        ("Failed", JobPhase.FAILED.value, "NotFailed", "the job has not failed"),
    ):
        holds = job_phase == holds_in
        conditions = set_condition(
            conditions,
            kind,
            holds,
            reason if holds else otherwise_reason,
            message if holds else otherwise_message,
            generation,
            now,
        )
    conditions = with_kstatus(
        conditions, job_phase, reason, message, generation, now, under_way=not finished
    )
    desired: dict[str, Any] = {
        "phase": job_phase,
        "conditions": conditions,
        "observedGeneration": generation,
        "startTime": started,
        # A job reopened after an InvalidSpec failure starts its clock afresh.
        "completionTime": (rfc3339(now) if finished else None)
        if phase in TERMINAL
        else status.get("completionTime") or (rfc3339(now) if finished else None),
        "readyMembers": _ready(member_status, len(job.spec.members)),
        "progress": progress_text(reports),
        "members": member_status,
    }
    if isinstance(placement, Placement):
        desired["sharing"] = _sharing_status(placement, pods)
    elif (node := _bound_node(pods)) is not None:
        desired["sharing"] = {"node": node}
    decision.status_patch = merge_patch(status, desired)
    decision.phase = job_phase
    for child in decision.create:
        if child["kind"] == "Pod" and (flavor_labels or tolerations):
            child["spec"]["tolerations"].extend(dict(t) for t in tolerations)
            child["spec"]["nodeSelector"] = dict(flavor_labels)
    if finished:
        decision.delete_pods = _unfinished_pods(groups, member_status, job_phase)
    # An Event for every phase transition. A new job's first phase, Pending, is not one: its
    # Admitted and Schedulable conditions say as much, and the Event would cost every job a write.
    if job_phase != phase and not (phase is None and job_phase == JobPhase.PENDING.value):
        kind = "Warning" if job_phase == JobPhase.FAILED.value else "Normal"
        decision.events.append(Event(kind, job_phase, message))
    return decision


def _start_time(pods: Sequence[Mapping[str, Any]], decision: Decision, now: datetime) -> str | None:
    """When the job's first pod was made: its own creation time when an earlier run of the
    operator created it but stopped before writing the status, else now if this one does."""
    created = sorted(
        str(p["metadata"]["creationTimestamp"])
        for p in pods
        if (p.get("metadata") or {}).get("creationTimestamp") and _active(p)
    )
    if created:
        return created[0]
    return rfc3339(now) if decision.create else None


def _unfinished_pods(
    groups: list[_GroupState], members: Mapping[str, Mapping[str, Any]], job_phase: str
) -> list[str]:
    """Pods to stop once the job has ended: on failure all that still run; on success only
    those whose members have not finished (AnyMember), so completing pods keep their logs."""
    doomed: list[str] = []
    for state in groups:
        done = all(
            members.get(m.name, {}).get("phase")
            in (MemberPhase.SUCCEEDED.value, MemberPhase.FAILED.value)
            for m in state.group.members
        )
        if job_phase == JobPhase.SUCCEEDED.value and done:
            continue
        doomed.extend(p["metadata"]["name"] for p in state.pods if _active(p))
    return doomed


def _condition_status(status: Mapping[str, Any], kind: str) -> str | None:
    for condition in status.get("conditions") or []:
        if condition.get("type") == kind:
            return str(condition.get("status"))
    return None


def condition_is(status: Mapping[str, Any], kind: str, value: bool, message: str) -> bool:
    for condition in status.get("conditions") or []:
        if condition.get("type") == kind:
            return bool(
                condition.get("status") == ("True" if value else "False")
                and condition.get("message") == message
            )
    return False


def failed_create(
    body: Mapping[str, Any], pods: Sequence[Mapping[str, Any]], message: str, now: datetime
) -> Decision:
    """The job ends Failed/FailedCreate: the API server refused a child it needs for a reason
    that no retry can change (`create_errors.classify`). Its pods are stopped; a new spec
    (metadata.generation) tries again."""
    generation = (body.get("metadata") or {}).get("generation")
    return _failed(body, REASON_FAILED_CREATE, message[:MAX_MESSAGE], generation, now, pods)


def _reopened(status: Mapping[str, Any], generation: int | None) -> bool:
    """A failure the spec caused (InvalidSpec, FailedCreate) is retried once the spec changes;
    any other end is final."""
    failed = next((c for c in status.get("conditions") or [] if c.get("type") == "Failed"), None)
    return bool(
        failed
        and failed.get("reason") in (REASON_INVALID_SPEC, REASON_FAILED_CREATE)
        and generation is not None
        and status.get("observedGeneration") != generation
    )


def _finished(
    body: Mapping[str, Any],
    status: Mapping[str, Any],
    pods: Sequence[Mapping[str, Any]],
    now: datetime,
) -> Decision:
    decision = Decision(phase=str(status.get("phase")))
    if status.get("phase") == JobPhase.FAILED.value:
        decision.delete_pods = [p["metadata"]["name"] for p in pods if _active(p)]
    else:
        # A succeeded job stops only pods whose members have not finished (AnyMember); the
        # others are about to complete on their own and keep their logs.
        finished = {
            name
            for name, raw in (status.get("members") or {}).items()
            if isinstance(raw, Mapping)
            and raw.get("phase") in (MemberPhase.SUCCEEDED.value, MemberPhase.FAILED.value)
        }
        decision.delete_pods = [
            p["metadata"]["name"]
            for p in pods
            if _active(p) and not set(_pod_members(p)) <= finished
        ]
    ttl = ((body.get("spec") or {}).get("runPolicy") or {}).get("ttlSecondsAfterFinished")
    completed = parse_time(status.get("completionTime"))
    if isinstance(ttl, int) and completed is not None:
        remaining = ttl - (now - completed).total_seconds()
        if remaining <= 0:
            decision.delete_job = True
        else:
            decision.requeue(remaining)
    return decision


def _suspended(
    body: Mapping[str, Any],
    status: Mapping[str, Any],
    pods: Sequence[Mapping[str, Any]],
    generation: int | None,
    now: datetime,
    reason: str = "Suspended",
    message: str = "spec.runPolicy.suspend is true: the job has no pods until it is cleared",
) -> Decision:
    """No pods: suspended by its spec, or held until Kueue admits it (`reason` says which)."""
    decision = Decision(phase=JobPhase.SUSPENDED.value)
    message = message[:MAX_MESSAGE]
    conditions = list(status.get("conditions") or [])
    conditions = set_condition(conditions, "Admitted", False, reason, message, generation, now)
    conditions = set_condition(conditions, "Running", False, reason, message, generation, now)
    conditions = set_condition(conditions, "Suspended", True, reason, message, generation, now)
    # Held for Kueue, the job is still on its way; suspended by its spec, it is where it should be.
    conditions = with_kstatus(
        conditions, JobPhase.SUSPENDED.value, reason, message, generation, now,
        under_way=reason != "Suspended",
    )  # fmt: skip
    desired = {
        "phase": JobPhase.SUSPENDED.value,
        "conditions": conditions,
        "observedGeneration": generation,
        # As for a batch/v1 Job: the clock (and the immutability of members) restarts on resume.
        "startTime": None,
        "readyMembers": None,
    }
    decision.status_patch = merge_patch(status, desired)
    decision.delete_pods = [p["metadata"]["name"] for p in pods if _active(p)]
    was: Mapping[str, Any] = next(
        (c for c in status.get("conditions") or [] if c.get("type") == "Suspended"), {}
    )
    if status.get("phase") != JobPhase.SUSPENDED.value or was.get("reason") != reason:
        decision.events.append(Event("Normal", reason, message))
    return decision


def _queue_gate(
    body: Mapping[str, Any],
    job: CoTrainJob,
    status: Mapping[str, Any],
    pods: Sequence[Mapping[str, Any]],
    capacity: Sequence[GpuNode],
    generation: int | None,
    now: datetime,
    queue: str,
    workload: Mapping[str, Any] | None,
    kueue: KueueObjects | None,
    settings: DecisionSettings,
) -> Decision | tuple[CoTrainJob, dict[str, str], list[Mapping[str, Any]]]:
    """A queued job runs only while Kueue admits its Workload: the decision that holds it (and
    keeps its Workload in step), or the job as admitted (the ResourceFlavors' node labels in
    its placement.nodeSelector), and the node labels and tolerations its pods get."""

    def held(reason: str, message: str) -> Decision:
        return _suspended(body, status, pods, generation, now, reason, message)

    running = [p for p in pods if _pod_phase(p) not in ("Succeeded", "Failed")]
    if job.spec.run_policy.suspend:
        decision = _suspended(body, status, pods, generation, now)
        if workload is not None and not running:
            decision.delete_workload = workload["metadata"]["name"]  # it leaves the queue
        return decision
    if kueue is None:
        return held(
            REASON_KUEUE_DISABLED,
            f"label {QUEUE_LABEL}={queue} asks for Kueue, and this operator does not queue "
            "jobs with it: install it with deploy/components/kueue (docs/kueue.md), or remove "
            "the label",
        )
    if not condition_true(workload, "QuotaReserved"):
        desired = _desired_workload(body, job, capacity, queue, kueue, settings)
        if isinstance(desired, Unschedulable):
            return held(desired.reason, f"not queued: {desired.message}")
        if isinstance(desired, str):
            return held(REASON_NOT_QUEUEABLE, desired)
        if workload is None:
            decision = held(*waiting_message(queue, None))
            decision.create.append(desired)
            return decision
        if shape(workload) != shape(desired):
            # The job asks for something else now: it queues again with what it asks.
            decision = held(*waiting_message(queue, None))
            decision.delete_workload = workload["metadata"]["name"]
            return decision
    assert workload is not None
    evicted = condition_true(workload, "Evicted")
    if evicted or not condition_true(workload, "Admitted"):
        decision = held(*waiting_message(queue, workload))
        if evicted and condition_true(workload, "QuotaReserved") and not running:
            decision.workload_status = release_patch(workload, now)
        return decision
    flavors = assigned_flavors(workload, kueue)
    if isinstance(flavors, str):
        decision = held(REASON_NOT_QUEUEABLE, flavors)
        decision.requeue(5.0)
        return decision
    labels, tolerations = flavors
    if labels:
        selector = {**job.spec.placement.node_selector, **labels}
        placement = job.spec.placement.model_copy(update={"node_selector": selector})
        job = job.model_copy(update={"spec": job.spec.model_copy(update={"placement": placement})})
    return job, labels, tolerations


def _desired_workload(
    body: Mapping[str, Any],
    job: CoTrainJob,
    capacity: Sequence[GpuNode],
    queue: str,
    kueue: KueueObjects,
    settings: DecisionSettings,
) -> dict[str, Any] | str | Unschedulable:
    """The Workload of exactly the pods the job would create, planned on the nodes as they are
    (Kueue's quota, not what is free now, decides when they may start)."""
    placement = place(job, list(capacity), settings.default_cpu_threads)
    if isinstance(placement, Unschedulable):
        return placement
    planned = []
    for group in placement.groups:
        pod = build_pod(body, job, placement, group, 0, {}, settings.trainer_image)
        member = group.group.members[0].name
        planned.append((pod_set_name(group.group.name, member, group.group.replica), pod))
    return build_workload(body, planned, queue, kueue)


def _observe(
    group: PodGroup, pods: Sequence[Mapping[str, Any]], reports: Mapping[str, MemberStatus]
) -> _GroupState:
    mine = sorted(
        (p for p in pods if (p["metadata"].get("labels") or {}).get(LABEL_GROUP) == group.name),
        key=_attempt,
    )
    mine = [p for p in mine if _attempt(p) >= 0]
    state = _GroupState(group, mine)
    live = [p for p in mine if not (p["metadata"].get("deletionTimestamp"))]
    state.current = live[-1] if live else None
    baseline = _baseline(state.current) if state.current else {}
    state.restarts = {
        m.name: max(baseline.get(m.name, 0), reports.get(m.name, MemberStatus()).restarts)
        for m in group.members
    }
    if state.current is None:
        state.outcome = "Pending"
        return state
    phase = _pod_phase(state.current)
    if phase in ("Pending", "Running", "Unknown"):
        state.outcome = "Running" if phase == "Running" else "Pending"
        return state
    code, reason, message = _terminated(state.current)
    state.exit_code, state.message = code, message
    if phase == "Succeeded":
        state.outcome, state.reason = "Succeeded", REASON_COMPLETED
    elif code == EXIT_MEMBERS_FAILED:
        state.outcome, state.reason = "Failed", "MembersFailed"
    else:
        state.outcome, state.reason = "Crashed", reason or REASON_ERROR
    return state


def _scheduler_verdict(groups: list[_GroupState]) -> tuple[bool, str, str] | None:
    """What kube-scheduler said of the job's live pods: (False, its reason, its message) for the
    first it cannot place, (True, "Scheduled", where they went) once all are bound, None while
    it has said nothing."""
    bound = []
    for state in groups:
        pod = state.current
        if pod is None or _pod_phase(pod) != "Pending":
            continue
        name = pod["metadata"]["name"]
        node = (pod.get("spec") or {}).get("nodeName")
        scheduled = next(
            (
                c
                for c in (pod.get("status") or {}).get("conditions") or []
                if isinstance(c, Mapping) and c.get("type") == "PodScheduled"
            ),
            None,
        )
        if scheduled is not None and scheduled.get("status") == "False":
            reason = str(scheduled.get("reason") or REASON_UNSCHEDULABLE)
            why = reason if re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", reason) else REASON_UNSCHEDULABLE
            return False, why, f"pod {name}: {scheduled.get('message') or reason}"[:MAX_MESSAGE]
        if node:
            bound.append(f"{name} on {node}")
        elif scheduled is None:
            return None
    if not bound:
        return None
    return True, "Scheduled", "kube-scheduler bound pod " + ", ".join(bound)


def _name_taken(
    body: Mapping[str, Any], decision: Decision, pod_jobs: Mapping[str, str]
) -> str | None:
    """Why a pod to create cannot be: its name is another job's pod's, or None."""
    job_name = body["metadata"]["name"]
    for child in decision.create:
        name = child["metadata"]["name"]
        owner = pod_jobs.get(name)
        if child["kind"] == "Pod" and owner is not None and owner != job_name:
            return (
                f"pod {name} is a pod of CoTrainJob {owner}: pods are named "
                "<job>-<member>-<attempt> (<job>-gpu-<attempt> with SameGPU), and the names of "
                "the two jobs and their members run together; rename this job or its member"
            )
    return None


def _create_missing(
    body: Mapping[str, Any],
    job: CoTrainJob,
    placement: Placement,
    groups: list[_GroupState],
    decision: Decision,
    settings: DecisionSettings,
) -> None:
    by_name = {g.group.name: g for g in placement.groups}
    creates = []
    for state in groups:
        if state.current is None and state.outcome == "Pending":
            attempt = (_attempt(state.pods[-1]) + 1) if state.pods else 0
            group, image = by_name[state.group.name], settings.trainer_image
            creates.append(build_pod(body, job, placement, group, attempt, state.restarts, image))
    if creates:
        decision.create.extend(build_peer_services(body, job))
        decision.create.extend(creates)


def _retry_crashed(
    body: Mapping[str, Any],
    job: CoTrainJob,
    state: _GroupState,
    reports: Mapping[str, MemberStatus],
    nodes: Sequence[GpuNode],
    decision: Decision,
    settings: DecisionSettings,
) -> None:
    """Recreate a crashed pod group within backoffLimit; a co-tenant's fault costs nothing."""
    limit = job.spec.run_policy.backoff_limit
    next_restarts = {}
    for member in state.group.members:
        victim = reports.get(member.name, MemberStatus()).reason == REASON_CO_TENANT_FAULT
        next_restarts[member.name] = state.restarts[member.name] + (0 if victim else 1)
    exhausted = [name for name, count in next_restarts.items() if count > limit]
    if exhausted:
        last = state.reason or REASON_ERROR
        state.outcome, state.reason = "Failed", REASON_BACKOFF_EXCEEDED
        state.message = (
            f"member(s) {', '.join(exhausted)} crashed more than backoffLimit={limit} times; "
            f"last: {last}"
        )
        return
    placement = place(job, list(nodes), settings.default_cpu_threads)
    if isinstance(placement, Unschedulable):
        state.outcome = "Pending"
        return
    group = next(g for g in placement.groups if g.group.name == state.group.name)
    attempt = _attempt(state.current or {}) + 1
    decision.create.append(
        build_pod(body, job, placement, group, attempt, next_restarts, settings.trainer_image)
    )
    decision.events.append(
        Event(
            "Warning",
            "RestartingMembers",
            f"pod group {state.group.name} ended ({state.reason}, exit code {state.exit_code}); "
            f"attempt {attempt} with restarts {next_restarts}",
        )
    )
    state.restarts = next_restarts
    state.outcome = "Pending"


def _gangs(groups: list[_GroupState]) -> dict[str, list[_GroupState]]:
    """The replica pod groups of each member with replicas > 1, by member name."""
    gangs: dict[str, list[_GroupState]] = {}
    for state in groups:
        if state.group.replica is not None:
            gangs.setdefault(state.group.members[0].name, []).append(state)
    return gangs


def _settle_gang(
    body: Mapping[str, Any],
    job: CoTrainJob,
    gang: list[_GroupState],
    reports: Mapping[str, MemberStatus],
    nodes: Sequence[GpuNode],
    decision: Decision,
    settings: DecisionSettings,
) -> None:
    """A member's replicas live and die together: one ending badly stops and restarts them all
    (one restart of the member), or fails them all when the backoff is spent."""
    ended = [g for g in gang if g.outcome in ("Crashed", "Failed")]
    if not ended:
        return
    member = gang[0].group.members[0]
    first = ended[0]
    active = [p["metadata"]["name"] for g in gang for p in g.pods if _active(p)]
    spent = max(g.restarts.get(member.name, 0) for g in gang)
    victim = reports.get(member.name, MemberStatus()).reason == REASON_CO_TENANT_FAULT
    following = spent + (0 if victim else 1)
    limit = job.spec.run_policy.backoff_limit
    if first.outcome == "Failed" or following > limit:
        reason = first.reason if first.outcome == "Failed" else REASON_BACKOFF_EXCEEDED
        message = (
            first.message
            if first.outcome == "Failed"
            else f"a replica of {member.name} ended more than backoffLimit={limit} times; "
            f"last: {first.reason or REASON_ERROR}"
        )
        decision.delete_pods.extend(active)
        for state in gang:
            state.outcome, state.reason, state.message = "Failed", reason, message
            state.exit_code = first.exit_code
        return
    placement = place(job, list(nodes), settings.default_cpu_threads)
    decision.delete_pods.extend(active)
    if isinstance(placement, Unschedulable):
        for state in gang:
            state.outcome = "Pending"
        return
    attempt = max(_attempt(p) for g in gang for p in g.pods) + 1
    by_name = {g.group.name: g for g in placement.groups}
    decision.create.extend(build_peer_services(body, job))
    for state in gang:
        state.restarts = {member.name: following}
        state.outcome = "Pending"
        group, image = by_name[state.group.name], settings.trainer_image
        decision.create.append(
            build_pod(body, job, placement, group, attempt, state.restarts, image)
        )
    decision.events.append(
        Event(
            "Warning",
            "RestartingMembers",
            f"replica pod {first.group.name} of {member.name} ended ({first.reason}, exit code "
            f"{first.exit_code}); all {len(gang)} replicas restart together as attempt "
            f"{attempt} (restarts {following})",
        )
    )


def _member_status(
    job: CoTrainJob, groups: list[_GroupState], reports: Mapping[str, MemberStatus]
) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = {}
    for state in groups:
        for member in state.group.members:
            # Replica 0 reports for a replicated member; the other replicas show through their pods.
            follower = state.group.replica not in (None, 0)
            report = MemberStatus() if follower else reports.get(member.name, MemberStatus())
            reported = report.phase.value if report.phase else None
            entry: dict[str, Any] = {"restarts": state.restarts.get(member.name, 0)}
            if state.outcome == "Pending":
                # No trainer runs for this member now: what an earlier attempt reported about
                # how it ended no longer holds.
                entry.update(phase=MemberPhase.PENDING.value, reason=None, message=None)
                entry["exitCode"] = None
            elif state.outcome == "Running":
                live = reported not in (None, MemberPhase.PENDING.value)
                entry["phase"] = reported if live else MemberPhase.RUNNING.value
            elif state.outcome == "Succeeded":
                entry["phase"] = (
                    reported
                    if reported in (MemberPhase.SUCCEEDED.value, MemberPhase.FAILED.value)
                    else MemberPhase.SUCCEEDED.value
                )
            else:  # Failed for good
                entry["phase"] = (
                    reported
                    if reported in (MemberPhase.SUCCEEDED.value, MemberPhase.FAILED.value)
                    else MemberPhase.FAILED.value
                )
                if entry["phase"] == MemberPhase.FAILED.value:
                    entry["reason"] = (
                        report.reason
                        if report.reason and state.reason == "MembersFailed"
                        else state.reason
                    )
                    if state.message:
                        entry["message"] = state.message[:4096]
                    if state.exit_code is not None:
                        entry["exitCode"] = report.exit_code or state.exit_code
            if member.name in result:
                entry = _merge_replica_entries(result[member.name], entry)
            result[member.name] = entry
    return result


_PHASE_WEIGHT = {
    MemberPhase.FAILED.value: 4,
    MemberPhase.RESTARTING.value: 3,
    MemberPhase.PENDING.value: 2,
    MemberPhase.RUNNING.value: 1,
    MemberPhase.SUCCEEDED.value: 0,
}


def _merge_replica_entries(one: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """A member of several replica pods is as far as its least advanced replica."""
    worse = max(one, other, key=lambda e: _PHASE_WEIGHT.get(str(e.get("phase")), 2))
    merged = dict(worse)
    merged["restarts"] = max(one.get("restarts", 0), other.get("restarts", 0))
    return merged


def _job_phase(
    job: CoTrainJob,
    groups: list[_GroupState],
    members: Mapping[str, Mapping[str, Any]],
    placement: Placement | Unschedulable | None,
) -> tuple[str, str, str]:
    phases = {name: entry.get("phase") for name, entry in members.items()}
    succeeded = [n for n, p in phases.items() if p == MemberPhase.SUCCEEDED.value]
    failed = [n for n, p in phases.items() if p == MemberPhase.FAILED.value]
    total = len(job.spec.members)
    if job.spec.success_policy == SuccessPolicy.ANY_MEMBER:
        if succeeded:
            return JobPhase.SUCCEEDED.value, "MemberSucceeded", f"member {succeeded[0]} succeeded"
        if len(failed) == total:
            return JobPhase.FAILED.value, *_failure(failed, members)
    else:
        if failed:
            return JobPhase.FAILED.value, *_failure(failed, members)
        if len(succeeded) == total:
            return JobPhase.SUCCEEDED.value, "AllMembersSucceeded", "every member succeeded"
    if any(g.outcome == "Running" for g in groups):
        running = [n for n, p in phases.items() if p == MemberPhase.RUNNING.value]
        return JobPhase.RUNNING.value, "MembersRunning", f"running: {', '.join(running) or '-'}"
    if isinstance(placement, Unschedulable):
        return JobPhase.PENDING.value, placement.reason, placement.message
    return JobPhase.PENDING.value, "PodsPending", "waiting for the job's pods to start"


def _failure(failed: list[str], members: Mapping[str, Mapping[str, Any]]) -> tuple[str, str]:
    first = members[failed[0]]
    reason = str(first.get("reason") or REASON_ERROR)
    detail = f"member {failed[0]} failed: {reason}"
    if first.get("exitCode") is not None:
        detail += f" (exit code {first['exitCode']})"
    if first.get("message"):
        detail += f": {first['message']}"
    return (reason if reason in SPECIFIC_REASONS else "MemberFailed"), detail


def _ready(members: Mapping[str, Mapping[str, Any]], total: int) -> str:
    ready = sum(
        1
        for entry in members.values()
        if entry.get("phase") in (MemberPhase.RUNNING.value, MemberPhase.SUCCEEDED.value)
    )
    return f"{ready}/{total}"


def _bound_node(pods: Sequence[Mapping[str, Any]]) -> str | None:
    for pod in sorted(pods, key=_attempt, reverse=True):
        node = (pod.get("spec") or {}).get("nodeName")
        if node:
            return str(node)
    return None


def _sharing_status(placement: Placement, pods: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    budget: dict[str, dict[str, int]] = {}
    for group in placement.groups:
        for name, planned in group.budgets.items():
            entry = {}
            if planned.memory_bytes is not None:
                entry["memoryBytes"] = planned.memory_bytes
            if planned.compute_percent is not None:
                entry["computePercent"] = planned.compute_percent
            budget[name] = entry
    first = placement.groups[0]
    return {
        "mode": placement.mode.value,
        "resource": first.share.resource,
        "node": _bound_node(pods) or first.share.node,
        "gpuProduct": placement.gpu_product,
        "budget": budget,
    }


def _fit_message(placement: Placement) -> str:
    parts = []
    for group in placement.groups:
        memory = group.share.memory_bytes
        size = f"{memory // 2**20}MiB" if memory is not None else "unknown memory"
        parts.append(
            f"pod {group.group.name}: {group.share.resource} ({size}) on {', '.join(group.nodes)}"
        )
    return f"{placement.mode.value}: " + "; ".join(parts)


__all__ = ["CONDITION_TYPES", "Decision", "Event", "decide", "failed_create"]
