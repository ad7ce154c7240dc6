"""Status arithmetic: conditions, untrusted member reports, progress, and the status patch.

Owns metav1.Condition bookkeeping (lastTransitionTime kept unless the status flips), progress
and the smallest JSON merge patch that turns the stored status into the desired one (the
trainer's reports are read by `api.models.read_member_report`, which `cotrain status` shares).
Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from cotrain_operator.api.models import ConditionStatus, MemberStatus

CONDITION_TYPES = (
    "Admitted", "Schedulable", "Running", "Succeeded", "Failed", "Suspended", "Reconciling",
    "Stalled",
)  # fmt: skip
# Fields of status.members.<name> that the operator writes; the trainer writes the rest.
OPERATOR_MEMBER_FIELDS = ("phase", "restarts", "reason", "message", "exitCode")


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def set_condition(
    conditions: list[dict[str, Any]],
    kind: str,
    status: bool,
    reason: str,
    message: str,
    generation: int | None,
    now: datetime,
) -> list[dict[str, Any]]:
    """`conditions` with `kind` set; its lastTransitionTime moves only when its status does."""
    value = ConditionStatus.TRUE.value if status else ConditionStatus.FALSE.value
    previous = next((c for c in conditions if c.get("type") == kind), None)
    transition = (
        previous["lastTransitionTime"]
        if previous and previous.get("status") == value and previous.get("lastTransitionTime")
        else rfc3339(now)
    )
    condition: dict[str, Any] = {
        "type": kind,
        "status": value,
        "reason": reason,
        "message": message[:32768],
        "lastTransitionTime": transition,
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    others = [c for c in conditions if c.get("type") != kind]
    ordered = [*others, condition]
    rank = {name: index for index, name in enumerate(CONDITION_TYPES)}
    return sorted(ordered, key=lambda c: rank.get(str(c.get("type")), len(rank)))


def with_kstatus(
    conditions: list[dict[str, Any]],
    phase: str,
    reason: str,
    message: str,
    generation: int | None,
    now: datetime,
    *,
    under_way: bool,
) -> list[dict[str, Any]]:
    """`conditions` with the two that generic tooling reads (kstatus, as Flux and cli-utils
    compute a resource's health): `Reconciling` while the job is `under_way` (pending, running,
    or waiting in a Kueue queue), `Stalled` once it has failed; both False otherwise, so that a
    succeeded or suspended job reads as Current and a failed one as Failed."""
    failed = phase == "Failed"
    conditions = set_condition(
        conditions,
        "Reconciling",
        under_way,
        reason if under_way else phase,
        message if under_way else f"the job is {phase}",
        generation,
        now,
    )
    return set_condition(
        conditions,
        "Stalled",
        failed,
        reason if failed else "NotFailed",
        message if failed else "the job has not failed",
        generation,
        now,
    )


def condition_true(conditions: list[dict[str, Any]], kind: str) -> bool:
    return any(c.get("type") == kind and c.get("status") == "True" for c in conditions)


def progress_text(reports: Mapping[str, MemberStatus]) -> str | None:
    """Steps done over steps planned across members, as a whole percentage."""
    done = planned = 0
    for report in reports.values():
        if report.total_steps:
            planned += report.total_steps
            done += min(report.step or 0, report.total_steps)
    if not planned:
        return None
    return f"{100 * done // planned}%"


def merge_patch(current: Any, desired: Any) -> Any:
    """The JSON merge patch (RFC 7386) from `current` to `desired`; None values delete keys.

    Only keys present in `desired` are considered, so fields other writers own are untouched.
    Returns an empty dict when nothing changes.
    """
    if not isinstance(desired, dict) or not isinstance(current, dict):
        return desired
    patch: dict[str, Any] = {}
    for key, value in desired.items():
        if value is None:
            if key in current:
                patch[key] = None
            continue
        if key not in current:
            patch[key] = value
        elif isinstance(value, dict) and isinstance(current[key], dict):
            sub = merge_patch(current[key], value)
            if sub != {}:
                patch[key] = sub
        elif current[key] != value:
            patch[key] = value
    return patch
