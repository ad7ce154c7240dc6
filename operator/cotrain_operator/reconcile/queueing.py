"""Kueue: the Workload that queues a job, and what Kueue's answer on it means for the job.

Owns the integration with a stock Kueue for an operator not written with Kueue's Go job
framework: a job labelled `kueue.x-k8s.io/queue-name` gets one `Workload`
(kueue.x-k8s.io/v1beta2) that it owns, with a pod set per pod (or per member's gang of replicas)
whose template requests exactly what the pod will; the job has no pods until Kueue admits the
Workload, its pods then carry the admitted ResourceFlavors' node labels and tolerations, and an
eviction (preemption) stops them and hands the quota back the way Kueue's job framework does.
Pure: `decide` calls it with the Workload and the Kueue objects the controller caches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cotrain_operator.api.contract import LABEL_JOB
from cotrain_operator.reconcile.children import owner_reference
from cotrain_operator.reconcile.status import rfc3339

KUEUE_GROUP = "kueue.x-k8s.io"
KUEUE_VERSION = "v1beta2"
WORKLOAD_API = f"{KUEUE_GROUP}/{KUEUE_VERSION}"
QUEUE_LABEL = f"{KUEUE_GROUP}/queue-name"
PRIORITY_LABEL = f"{KUEUE_GROUP}/priority-class"
JOB_UID_LABEL = f"{KUEUE_GROUP}/job-uid"
# Kueue takes at most this many pod sets in one Workload (its CRD's maxItems).
MAX_POD_SETS = 8
MAX_CONDITION_MESSAGE = 32768
REASON_QUEUED = "Queued"
REASON_KUEUE_DISABLED = "KueueNotEnabled"
REASON_NOT_QUEUEABLE = "NotQueueable"


@dataclass(frozen=True)
class Flavor:
    """What admission to one ResourceFlavor asks of the pods."""

    node_labels: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class KueueObjects:
    """The cluster's Kueue objects the decision reads: ResourceFlavors and
    WorkloadPriorityClasses (their values), by name."""

    flavors: Mapping[str, Flavor] = field(default_factory=dict)
    priorities: Mapping[str, int] = field(default_factory=dict)


def parse_flavor(body: Mapping[str, Any]) -> Flavor:
    spec = body.get("spec") or {}
    labels = spec.get("nodeLabels") or {}
    tolerations = spec.get("tolerations") or []
    return Flavor(
        {str(k): str(v) for k, v in labels.items()} if isinstance(labels, Mapping) else {},
        tuple(t for t in tolerations if isinstance(t, Mapping))
        if isinstance(tolerations, list)
        else (),
    )


def queue_name(body: Mapping[str, Any]) -> str | None:
    labels = (body.get("metadata") or {}).get("labels") or {}
    queue = labels.get(QUEUE_LABEL)
    return str(queue) if queue else None


def workload_name(body: Mapping[str, Any]) -> str:
    """`cotrainjob-<job>-<hash>`: the hash of the job's uid makes a job made again under the
    same name queue afresh, and cuts a long name to the 253 characters a name may have."""
    metadata = body["metadata"]
    digest = hashlib.sha256(str(metadata.get("uid")).encode()).hexdigest()[:5]
    return f"cotrainjob-{str(metadata['name'])[:235]}-{digest}"


def condition(workload: Mapping[str, Any] | None, kind: str) -> Mapping[str, Any] | None:
    for entry in ((workload or {}).get("status") or {}).get("conditions") or []:
        if isinstance(entry, Mapping) and entry.get("type") == kind:
            return entry
    return None


def condition_true(workload: Mapping[str, Any] | None, kind: str) -> bool:
    return (condition(workload, kind) or {}).get("status") == "True"


def pod_set_name(group_name: str, member: str, replica: int | None) -> str:
    """A member's replicas share one pod set (their pods are alike); other pods have their own."""
    return member if replica is not None else group_name


def build_workload(
    body: Mapping[str, Any],
    job_pods: Sequence[tuple[str, Mapping[str, Any]]],
    queue: str,
    kueue: KueueObjects,
) -> dict[str, Any] | str:
    """The job's Workload from the pods it will create, (pod set name, pod) each; or why the job
    cannot be queued, in words that name the fix."""
    sets: dict[str, dict[str, Any]] = {}
    for name, pod in job_pods:
        if name in sets:
            sets[name]["count"] += 1
            continue
        sets[name] = {"name": name, "count": 1, "template": _template(pod)}
    if len(sets) > MAX_POD_SETS:
        return (
            f"the job has {len(sets)} kinds of pod ({', '.join(sets)}) and a Kueue Workload "
            f"holds at most {MAX_POD_SETS} pod sets: use placement.strategy SameGPU, or fewer "
            "members"
        )
    spec: dict[str, Any] = {"queueName": queue, "podSets": list(sets.values()), "active": True}
    labels = (body.get("metadata") or {}).get("labels") or {}
    priority_class = labels.get(PRIORITY_LABEL)
    if priority_class:
        value = kueue.priorities.get(str(priority_class))
        if value is None:
            return (
                f"label {PRIORITY_LABEL} names WorkloadPriorityClass {priority_class}, which does "
                "not exist: create it or fix the label"
            )
        spec["priorityClassRef"] = {
            "group": KUEUE_GROUP,
            "kind": "WorkloadPriorityClass",
            "name": str(priority_class),
        }
        spec["priority"] = value
    metadata = body["metadata"]
    return {
        "apiVersion": WORKLOAD_API,
        "kind": "Workload",
        "metadata": {
            "name": workload_name(body),
            "namespace": metadata["namespace"],
            "labels": {LABEL_JOB: metadata["name"], JOB_UID_LABEL: str(metadata.get("uid"))},
            "ownerReferences": [owner_reference(body)],
        },
        "spec": spec,
    }


def _template(pod: Mapping[str, Any]) -> dict[str, Any]:
    """What Kueue reads of a pod: its containers' requests, its tolerations and the node labels
    it needs (the hostnames it is pinned to are chosen only once it is admitted)."""
    spec = pod["spec"]
    containers = [
        {"name": c["name"], "image": c["image"], "resources": c.get("resources") or {}}
        for c in spec["containers"]
    ]
    template: dict[str, Any] = {
        "metadata": {"labels": dict(pod["metadata"].get("labels") or {})},
        "spec": {
            "containers": containers,
            "restartPolicy": spec.get("restartPolicy", "Never"),
            "tolerations": list(spec.get("tolerations") or []),
        },
    }
    selector = spec.get("nodeSelector")
    if selector:
        template["spec"]["nodeSelector"] = dict(selector)
    return template


def shape(workload: Mapping[str, Any]) -> list[Any]:
    """What a Workload asks of Kueue, to tell whether the job still asks the same."""
    spec = workload.get("spec") or {}
    sets: list[Any] = []
    for pod_set in spec.get("podSets") or []:
        containers = ((pod_set.get("template") or {}).get("spec") or {}).get("containers") or []
        sets.append(
            (
                pod_set.get("name"),
                pod_set.get("count"),
                tuple(repr(sorted((c.get("resources") or {}).items())) for c in containers),
            )
        )
    return [spec.get("queueName"), spec.get("priority"), *sets]


def assigned_flavors(
    workload: Mapping[str, Any], kueue: KueueObjects
) -> tuple[dict[str, str], list[Mapping[str, Any]]] | str:
    """The node labels and tolerations of the ResourceFlavors the Workload was admitted to, for
    every pod of the job; or why they cannot all hold at once."""
    admission = ((workload.get("status") or {}).get("admission")) or {}
    labels: dict[str, str] = {}
    tolerations: list[Mapping[str, Any]] = []
    for assignment in admission.get("podSetAssignments") or []:
        for name in sorted(set((assignment.get("flavors") or {}).values())):
            flavor = kueue.flavors.get(str(name))
            if flavor is None:
                return f"ResourceFlavor {name} that Kueue admitted the job to is not known yet"
            for key, value in flavor.node_labels.items():
                if labels.setdefault(key, value) != value:
                    return (
                        f"the ResourceFlavors the job was admitted to want node label {key} "
                        f"both {labels[key]} and {value}"
                    )
            tolerations.extend(t for t in flavor.tolerations if t not in tolerations)
    return labels, tolerations


def release_patch(workload: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """The Workload's status once an evicted job's pods are gone, as Kueue's job framework
    writes it: quota no longer reserved (Pending), not admitted, requeued after a preemption."""
    evicted = condition(workload, "Evicted") or {}
    reason = str(evicted.get("reason") or "Evicted")
    message = str(evicted.get("message") or "evicted")[:MAX_CONDITION_MESSAGE]
    generation = (workload.get("metadata") or {}).get("generation")
    conditions = _conditions(workload)
    conditions = _set(conditions, "QuotaReserved", False, "Pending", message, generation, now)
    conditions = _set(
        conditions, "Admitted", False, "NoReservation", "The workload has no reservation",
        generation, now,
    )  # fmt: skip
    requeued = reason in ("Preempted", "NodeFailures")
    conditions = _set(conditions, "Requeued", requeued, reason, message, generation, now)
    return {"conditions": conditions, "admission": None}


def finished_patch(
    workload: Mapping[str, Any], succeeded: bool, message: str, now: datetime
) -> dict[str, Any]:
    """The Workload's status once the job has ended: Kueue releases its quota."""
    generation = (workload.get("metadata") or {}).get("generation")
    reason = "Succeeded" if succeeded else "Failed"
    conditions = _set(
        _conditions(workload), "Finished", True, reason, message[:MAX_CONDITION_MESSAGE],
        generation, now,
    )  # fmt: skip
    return {"conditions": conditions}


def _conditions(workload: Mapping[str, Any]) -> list[dict[str, Any]]:
    raw = (workload.get("status") or {}).get("conditions") or []
    return [dict(c) for c in raw if isinstance(c, Mapping)]


def _set(
    conditions: list[dict[str, Any]],
    kind: str,
    value: bool,
    reason: str,
    message: str,
    generation: Any,
    now: datetime,
) -> list[dict[str, Any]]:
    status = "True" if value else "False"
    entry: dict[str, Any] = {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": rfc3339(now),
    }
    if isinstance(generation, int):
        entry["observedGeneration"] = generation
    for index, existing in enumerate(conditions):
        if existing.get("type") == kind:
            if existing.get("status") == status:
                entry["lastTransitionTime"] = existing.get("lastTransitionTime", entry[
                    "lastTransitionTime"])  # fmt: skip
            return [*conditions[:index], entry, *conditions[index + 1 :]]
    return [*conditions, entry]


def waiting_message(queue: str, workload: Mapping[str, Any] | None) -> tuple[str, str]:
    """(reason, message) of a job that waits in its queue, in Kueue's words when it has said
    why; a job evicted and not yet admitted again says what evicted it."""
    evicted = condition(workload, "Evicted")
    where = f"LocalQueue {queue}"
    if workload is not None and evicted is not None and evicted.get("status") == "True":
        reason = str(evicted.get("reason") or "Evicted")
        return reason, (
            f"evicted by Kueue ({reason}: {evicted.get('message') or 'no message'}); its pods "
            f"are stopped and it waits in {where} to be admitted again"
        )
    requeued = condition(workload, "Requeued")
    reserved = condition(workload, "QuotaReserved")
    if reserved is not None and reserved.get("status") == "True":
        return REASON_QUEUED, f"quota reserved in {where}; waiting for Kueue's admission checks"
    said = (
        f": Kueue says: {reserved.get('message')}" if reserved and reserved.get("message") else ""
    )
    if requeued is not None and requeued.get("status") == "True" and requeued.get("reason"):
        return str(requeued["reason"]), (
            f"{requeued['reason']} by Kueue earlier, waiting in {where} to be admitted again{said}"
        )
    what = f"Workload {workload['metadata']['name']}" if workload is not None else "its Workload"
    return REASON_QUEUED, f"waiting in {where} for Kueue to admit {what}{said}"


__all__ = [
    "QUEUE_LABEL",
    "Flavor",
    "KueueObjects",
    "assigned_flavors",
    "build_workload",
    "finished_patch",
    "release_patch",
    "shape",
    "workload_name",
]
