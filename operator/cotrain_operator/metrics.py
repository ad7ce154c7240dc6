"""Prometheus metrics of the operator, served at :$COTRAIN_METRICS_PORT/metrics (default 8080).

Owns the metric objects; the controller and `k8s.py` update them.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

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
