"""Prometheus metrics of the operator, served at :$COTRAIN_METRICS_PORT/metrics (default 8080).

Owns the metric objects; the controller and `k8s.py` update them, and `MemberSeries` keeps the
per-member series of each job in step with its status.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from cotrain_operator.api.models import MemberPhase, MemberStatus

JOBS = Gauge("cotrain_jobs", "CoTrainJobs the operator sees, by phase", ["phase"])
RECONCILE_SECONDS = Histogram(
    "cotrain_reconcile_duration_seconds",
    "Time to reconcile one job (decide and act)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
DECIDE_SECONDS = Histogram(
    "cotrain_decide_duration_seconds",
    "Time to decide what one job needs (pure CPU, off the event loop)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
)
RECONCILE_ERRORS = Counter(
    "cotrain_reconcile_errors_total", "Reconciles that failed and were requeued", ["kind"]
)
API_REQUESTS = Counter(
    "cotrain_api_requests_total",
    "Requests the operator made to the Kubernetes API, by verb, resource and outcome",
    ["verb", "resource", "code"],
)
QUEUE_DEPTH = Gauge("cotrain_queue_depth", "Jobs waiting to be reconciled")
TRAINER_POLICY = Gauge(
    "cotrain_trainer_policy_installed",
    "1 when the admission policy that keeps each trainer pod to its own job is installed, "
    "0 when it is missing (checked at start)",
)


def serve(port: int) -> None:
    start_http_server(port)


# Per member of each job the operator sees, from the status its trainer reported (fields that
# do not validate are left out, as everywhere). Labels: namespace, job, member; a job's series
# go when the job does. Twelve series per member at most (seven values and five phases), so at
# most 96 per job (8 members).
MEMBER_LABELS = ["namespace", "job", "member"]
MEMBER_VALUES = {
    "step": Gauge("cotrain_member_step", "Optimizer steps the member has done", MEMBER_LABELS),
    "total_steps": Gauge(
        "cotrain_member_total_steps", "Optimizer steps the member plans", MEMBER_LABELS
    ),
    "loss": Gauge("cotrain_member_loss", "The member's training loss at its last report",
                  MEMBER_LABELS),
    "samples_per_second": Gauge(
        "cotrain_member_samples_per_second", "The member's training throughput", MEMBER_LABELS
    ),
    "gpu_memory_bytes": Gauge(
        "cotrain_member_gpu_memory_bytes",
        "Device memory the member's process holds, as its framework counts it (0 on the CPU)",
        MEMBER_LABELS,
    ),
    "gpu_memory_peak_bytes": Gauge(
        "cotrain_member_gpu_memory_peak_bytes",
        "Peak device memory of the member's process",
        MEMBER_LABELS,
    ),
    "restarts": Gauge("cotrain_member_restarts", "Restarts of the member so far", MEMBER_LABELS),
}  # fmt: skip
MEMBER_PHASE = Gauge(
    "cotrain_member_phase",
    "1 for the member's phase (Pending, Running, Restarting, Succeeded, Failed), 0 for the others",
    [*MEMBER_LABELS, "phase"],
)
MEMBER_PHASES = tuple(phase.value for phase in MemberPhase)


class MemberSeries:
    """The per-member series of every job, set from the members' validated reports and removed
    with the job (or a member no longer in it)."""

    def __init__(self) -> None:
        # (namespace, job) -> member -> the values last set, so a job's update touches only
        # what changed and its removal knows which series it has.
        self._set: dict[tuple[str, str], dict[str, dict[str, float]]] = {}

    def update(self, namespace: str, job: str, members: Mapping[str, MemberStatus]) -> None:
        key = (namespace, job)
        before = self._set.get(key, {})
        for member in set(before) - set(members):
            self._remove(namespace, job, member, before[member])
        now: dict[str, dict[str, float]] = {}
        for member, report in members.items():
            values = _values(report)
            old = before.get(member, {})
            labels = (namespace, job, member)
            for name, value in values.items():
                if old.get(name) != value:
                    if name.startswith("phase:"):
                        MEMBER_PHASE.labels(*labels, name.removeprefix("phase:")).set(value)
                    else:
                        MEMBER_VALUES[name].labels(*labels).set(value)
            for name in set(old) - set(values):
                self._remove_one(labels, name)
            now[member] = values
        if now:
            self._set[key] = now
        else:
            self._set.pop(key, None)

    def forget(self, namespace: str, job: str) -> None:
        for member, values in self._set.pop((namespace, job), {}).items():
            self._remove(namespace, job, member, values)

    def _remove(self, namespace: str, job: str, member: str, values: Mapping[str, float]) -> None:
        for name in values:
            self._remove_one((namespace, job, member), name)

    @staticmethod
    def _remove_one(labels: tuple[str, str, str], name: str) -> None:
        try:
            if name.startswith("phase:"):
                MEMBER_PHASE.remove(*labels, name.removeprefix("phase:"))
            else:
                MEMBER_VALUES[name].remove(*labels)
        except KeyError:
            pass


def _values(report: MemberStatus) -> dict[str, float]:
    values: dict[str, float] = {}
    for name in MEMBER_VALUES:
        value = getattr(report, name)
        if value is not None:
            values[name] = float(value)
    if report.phase is not None:
        for phase in MEMBER_PHASES:
            values[f"phase:{phase}"] = 1.0 if report.phase.value == phase else 0.0
    return values
