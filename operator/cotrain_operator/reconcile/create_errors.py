"""What a refused child creation means for the job: retry, make the trainer identity again, or
fail the job.

Owns the classification of the API server's answers to the operator's creates. A refusal no
retry can change (the object is invalid, too large, or an admission policy, a LimitRange or Pod
Security forbids it) ends the job Failed/FailedCreate with the server's message, once; what can
heal (a 5xx, 429, a timeout, a conflict, a quota that frees up, a missing ServiceAccount or RBAC
that an admin restores) is retried with backoff. Pure; the controller acts on the outcome.
"""

from __future__ import annotations

from enum import StrEnum

from cotrain_operator.reconcile.access import TRAINER_SERVICE_ACCOUNT


class CreateOutcome(StrEnum):
    RETRY = "Retry"
    RECREATE_IDENTITY = "RecreateIdentity"  # retry once the namespace's trainer identity is back
    FAIL_JOB = "FailJob"


# 403s that say something outside the job is wrong for now, not the object itself.
_TRANSIENT_FORBIDDEN = (
    "exceeded quota",  # a ResourceQuota: frees up as other work ends
    "status unknown for quota",  # a new ResourceQuota not yet counted
    "cannot create resource",  # RBAC: the operator's own permissions, fixed by an admin
    "is being terminated",  # the namespace is going away, and the job with it
)
_PERMANENT = {400, 404, 406, 413, 415, 422}


def classify(status: int | None, message: str, kind: str = "") -> CreateOutcome:
    """The outcome of one refused create, from its HTTP status and the server's message."""
    if kind == "Workload" and status == 404:
        return CreateOutcome.RETRY  # Kueue's API is not served (yet): installing it heals this
    if status == 403:
        lowered = message.lower()
        if "serviceaccount" in lowered and TRAINER_SERVICE_ACCOUNT in lowered:
            return CreateOutcome.RECREATE_IDENTITY
        if any(reason in lowered for reason in _TRANSIENT_FORBIDDEN):
            return CreateOutcome.RETRY
        return CreateOutcome.FAIL_JOB  # admission (Pod Security, LimitRange, policies, webhooks)
    if status in _PERMANENT:
        return CreateOutcome.FAIL_JOB
    return CreateOutcome.RETRY  # 5xx, 408, 409, 429, no answer


def refusal_message(kind: str, name: str, status: int | None, message: str) -> str:
    """The condition's and the Event's text for a child the API server refused."""
    text = f"the API server refused {kind} {name} (HTTP {status}): {message}"
    if kind == "Workload" and status == 404:
        text += (
            "; the cluster serves no Kueue Workloads (kueue.x-k8s.io/v1beta2): install Kueue "
            "v0.17 or later (docs/kueue.md), or remove the job's kueue.x-k8s.io/queue-name label"
        )
    return text
