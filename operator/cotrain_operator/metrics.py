"""Prometheus metrics of the operator, served at :$COTRAIN_METRICS_PORT/metrics (default 8080).

Owns the metric objects; the controller and `k8s.py` update them, and `MemberSeries` keeps the
values of each job's per-member series in step with its status (the series are made from them
at each scrape).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Metric, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

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
# most 96 per job (8 members). They are made at each scrape from the values kept here, as
# kube-state-metrics makes its series: a labelled child per series would cost ~1 KiB each
# (~9 MiB for 1,111 members) and a lock on every update.
MEMBER_LABELS = ["namespace", "job", "member"]
MEMBER_VALUES = {
    "step": ("cotrain_member_step", "Optimizer steps the member has done"),
    "total_steps": ("cotrain_member_total_steps", "Optimizer steps the member plans"),
    "loss": ("cotrain_member_loss", "The member's training loss at its last report"),
    "samples_per_second": (
        "cotrain_member_samples_per_second", "The member's training throughput"
    ),
    "gpu_memory_bytes": (
        "cotrain_member_gpu_memory_bytes",
        "Device memory the member's process holds, as its framework counts it (0 on the CPU)",
    ),
    "gpu_memory_peak_bytes": (
        "cotrain_member_gpu_memory_peak_bytes", "Peak device memory of the member's process"
    ),
    "restarts": ("cotrain_member_restarts", "Restarts of the member so far"),
}  # fmt: skip
MEMBER_PHASE = (
    "cotrain_member_phase",
    "1 for the member's phase (Pending, Running, Restarting, Succeeded, Failed), 0 for the others",
)
MEMBER_PHASES = tuple(phase.value for phase in MemberPhase)

# (namespace, job) -> member -> its values, as `_values` makes them. One table for the process,
# as the registry is one: every `MemberSeries` writes here. Each job's entry is replaced whole,
# never changed in place, so a scrape (in the metrics server's thread) reads a consistent one.
_MEMBERS: dict[tuple[str, str], dict[str, dict[str, float]]] = {}


class MemberSeries:
    """The per-member series of every job, set from the members' validated reports and removed
    with the job (or a member no longer in it)."""

    def update(self, namespace: str, job: str, members: Mapping[str, MemberStatus]) -> None:
        values = {member: _values(report) for member, report in members.items()}
        if values:
            _MEMBERS[namespace, job] = values
        else:
            _MEMBERS.pop((namespace, job), None)

    def forget(self, namespace: str, job: str) -> None:
        _MEMBERS.pop((namespace, job), None)


class _MemberCollector(Collector):
    def describe(self) -> Iterator[Metric]:
        return self._families([])

    def collect(self) -> Iterator[Metric]:
        return self._families(list(_MEMBERS.items()))

    @staticmethod
    def _families(
        jobs: list[tuple[tuple[str, str], dict[str, dict[str, float]]]],
    ) -> Iterator[Metric]:
        for name, (metric, documentation) in MEMBER_VALUES.items():
            family = GaugeMetricFamily(metric, documentation, labels=MEMBER_LABELS)
            for (namespace, job), members in jobs:
                for member, values in members.items():
                    if name in values:
                        family.add_metric([namespace, job, member], values[name])
            yield family
        family = GaugeMetricFamily(*MEMBER_PHASE, labels=[*MEMBER_LABELS, "phase"])
        for (namespace, job), members in jobs:
            for member, values in members.items():
                for phase in MEMBER_PHASES:
                    if (value := values.get(f"phase:{phase}")) is not None:
                        family.add_metric([namespace, job, member, phase], value)
        yield family


REGISTRY.register(_MemberCollector())


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
