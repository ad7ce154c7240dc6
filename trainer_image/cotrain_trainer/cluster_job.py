"""A CoTrainJob and its trainer pods as the API server returns them, read for `cotrain submit`,
`cotrain status` and `cotrain logs`.

Owns what those commands make of the server's objects: a stored job's members and member
statuses (reports are untrusted: a bad field is dropped, never fatal, as the operator reads them),
the rows of the job list and their ages, a job's verdict (exit code, phase line, failure lines)
and which of a job's pods hold a member. Pure: plain dicts in, values out; `cluster.py` does the
I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from cotrain_operator.api.contract import (
    ENV_POD_PLAN,
    LABEL_ATTEMPT,
    LABEL_GROUP,
    LABEL_MEMBER,
    TRAINER_CONTAINER,
    PodPlan,
)
from cotrain_operator.api.models import (
    JobPhase,
    Member,
    MemberPhase,
    MemberStatus,
    read_member_report,
)

# The exit code of a command that followed a job to its end.
EXIT_CODES = {JobPhase.SUCCEEDED: 0, JobPhase.FAILED: 1}
JOB_COLUMNS = ("NAME", "PHASE", "READY", "PROGRESS", "AGE")


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def job_name(job: Mapping[str, Any]) -> str:
    return str(_mapping(job.get("metadata")).get("name") or "")


def job_phase(job: Mapping[str, Any]) -> JobPhase | None:
    phase = _mapping(job.get("status")).get("phase")
    try:
        return JobPhase(phase) if isinstance(phase, str) else None
    except ValueError:
        return None


def exit_code(phase: JobPhase | None) -> int | None:
    """0 for a succeeded job, 1 for a failed one, None while it has not finished."""
    return EXIT_CODES.get(phase) if phase is not None else None


def job_members(job: Mapping[str, Any]) -> list[Member]:
    """The members of a stored job's spec. ValueError when one cannot be read (a job stored
    under another version of the API)."""
    raw = _mapping(job.get("spec")).get("members")
    if not isinstance(raw, list):
        raise ValueError(f"cotrainjob {job_name(job)} has no spec.members")
    members = []
    for index, entry in enumerate(raw):
        try:
            members.append(Member.model_validate(entry))
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ValueError(
                f"cotrainjob {job_name(job)}: spec.members[{index}].{where}: {first['msg']}"
            ) from None
    return members


def member_statuses(job: Mapping[str, Any]) -> dict[str, MemberStatus]:
    """status.members by member name, each report read field by field."""
    raw = _mapping(_mapping(job.get("status")).get("members"))
    return {str(name): read_member_report(report) for name, report in raw.items()}


def condition(job: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for entry in _mapping(job.get("status")).get("conditions") or []:
        if isinstance(entry, Mapping) and entry.get("type") == kind:
            return entry
    return None


def _described(entry: Mapping[str, Any] | None) -> str:
    if not entry or not entry.get("reason"):
        return ""
    message = f": {entry['message']}" if entry.get("message") else ""
    return f" ({entry['reason']}{message})"


def phase_line(job: Mapping[str, Any]) -> str:
    """`cotrainjob NAME: PHASE (reason: message)`: the reason from the condition named like the
    phase, else from `Reconciling` (which carries why a job is still under way)."""
    phase = job_phase(job)
    shown = phase.value if phase else "Unknown (no status yet: is the operator running?)"
    entry = condition(job, phase.value) if phase else None
    if entry is None or entry.get("status") != "True":
        entry = condition(job, "Reconciling")
        entry = entry if entry and entry.get("status") == "True" else None
    return f"cotrainjob {job_name(job)}: {shown}{_described(entry)}"


def failure_lines(job: Mapping[str, Any], members: Sequence[Member]) -> list[str]:
    """Why a failed job failed: its Failed condition, and each failed member's reason."""
    lines = []
    failed = condition(job, "Failed")
    if failed and failed.get("status") == "True":
        message = f": {failed['message']}" if failed.get("message") else ""
        lines.append(f"failed: {failed.get('reason') or 'no reason given'}{message}")
    statuses = member_statuses(job)
    for member in members:
        status = statuses.get(member.name)
        if status is None or status.phase != MemberPhase.FAILED:
            continue
        detail = f": {status.message}" if status.message else ""
        lines.append(f"  {member.name}: {status.reason or 'Failed'}{detail}")
    return lines


def parse_time(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def age(created: Any, now: datetime) -> str:
    """A duration as `kubectl get` shows it (k8s.io/apimachinery duration.HumanDuration)."""
    moment = parse_time(created)
    if moment is None:
        return "<unknown>"
    seconds = int((now - moment).total_seconds())
    if seconds < -1:
        return "<invalid>"
    seconds = max(seconds, 0)
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 120:
        return f"{seconds}s"
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 192:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    if days < 365 * 2:
        return f"{days}d"
    years = days // 365
    if years < 8:
        return f"{years}y{days % 365}d" if days % 365 else f"{years}y"
    return f"{years}y"


def job_row(job: Mapping[str, Any], now: datetime) -> tuple[str, ...]:
    """NAME, PHASE, READY, PROGRESS, AGE: the columns `kubectl get cotrainjobs` prints."""
    status = _mapping(job.get("status"))
    created = _mapping(job.get("metadata")).get("creationTimestamp")
    phase = job_phase(job)
    return (
        job_name(job),
        phase.value if phase else "",
        str(status.get("readyMembers") or ""),
        str(status.get("progress") or ""),
        age(created, now),
    )


def format_columns(rows: Sequence[Sequence[str]]) -> str:
    """Rows as left-aligned columns three spaces apart, as kubectl prints them."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))] if rows else []
    lines = [
        "   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "".join(f"{line}\n" for line in lines)


def _labels(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    return _mapping(_mapping(pod.get("metadata")).get("labels"))


def pod_members(pod: Mapping[str, Any]) -> list[str] | None:
    """The members a trainer pod runs: its member label, else the members of its pod plan;
    None when neither can be read."""
    labelled = _labels(pod).get(LABEL_MEMBER)
    if isinstance(labelled, str) and labelled:
        return [labelled]
    for container in _mapping(pod.get("spec")).get("containers") or []:
        if not isinstance(container, Mapping) or container.get("name") != TRAINER_CONTAINER:
            continue
        for variable in container.get("env") or []:
            if isinstance(variable, Mapping) and variable.get("name") == ENV_POD_PLAN:
                try:
                    plan = PodPlan.model_validate_json(str(variable.get("value") or ""))
                except ValidationError:
                    return None
                return [member.name for member in plan.members]
    return None


def _attempt(pod: Mapping[str, Any]) -> int:
    try:
        return int(_labels(pod).get(LABEL_ATTEMPT, 0))
    except (TypeError, ValueError):
        return 0


def current_pods(pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Of a job's pods, the latest attempt of each pod group, by pod name."""
    latest: dict[str, Mapping[str, Any]] = {}
    for pod in pods:
        group = str(_labels(pod).get(LABEL_GROUP) or _mapping(pod.get("metadata")).get("name"))
        if group not in latest or _attempt(pod) > _attempt(latest[group]):
            latest[group] = pod
    return sorted(latest.values(), key=lambda pod: str(_mapping(pod.get("metadata")).get("name")))


def member_pods(pods: Sequence[Mapping[str, Any]], member: str | None) -> list[Mapping[str, Any]]:
    """The current pods that hold `member` (every current pod when None): one for SameGPU, one
    per replica for a member with replicas. A pod whose members cannot be read is kept."""
    current = current_pods(pods)
    if member is None:
        return current
    held = [pod for pod in current if member in (pod_members(pod) or [member])]
    return held
