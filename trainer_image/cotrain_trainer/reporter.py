"""Rate-limited, framework-free status reporting: `status.members.<name>` of the job.

Owns the report of one member (its `MemberStatus` in camelCase, finite numbers only, stamped with
`lastReportTime`), the rate limit (at most one report per member per interval, default 5 s or
$COTRAIN_REPORT_INTERVAL; a member's final report, a change of its phase and a run's first step
are always sent at once), and the two sinks:

- `KubernetesSink`: a JSON merge patch `{"status": {"members": {name: report}}}` on the job's
  status subresource, with the pod's service account (in-cluster config whose paths
  $COTRAIN_SERVICEACCOUNT_DIR may move). It sends from a thread of its own, keeps only the newest
  report of each member, retries transient errors with backoff, and never raises: an unreachable
  API server must not stop training.
- `LocalSink`: the job status as a YAML file (and a line per report on a terminal).

The only module of the trainer that imports the Kubernetes client. Clocks are injectable.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TextIO

import yaml

from cotrain_operator.api.contract import (
    DEFAULT_REPORT_INTERVAL_SECONDS,
    DEFAULT_SERVICEACCOUNT_DIR,
    ENV_REPORT_INTERVAL,
    ENV_SERVICEACCOUNT_DIR,
)
from cotrain_operator.api.models import (
    GROUP,
    PLURAL,
    VERSION,
    CoTrainJobStatus,
    MemberStatus,
    dump,
)

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
# Statuses worth retrying: the API server is busy, restarting or behind a flaky proxy.
TRANSIENT_STATUSES = frozenset({0, 408, 429, 500, 502, 503, 504})

Report = dict[str, Any]


def rfc3339(seconds: float) -> str:
    """A Unix time as the API server writes times: 2024-05-01T12:00:00Z."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _finite_only(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: v for k, v in ((k, _finite_only(v)) for k, v in value.items()) if v is not None}
    return value


def member_report(status: MemberStatus, now: float) -> Report:
    """What the trainer reports for one member: status fields set, no NaN or infinity."""
    report: Report = _finite_only(dump(status))
    report["lastReportTime"] = rfc3339(now)
    return report


def report_interval(environ: Mapping[str, str] = os.environ) -> float:
    """Seconds between two reports of one member ($COTRAIN_REPORT_INTERVAL, else 5)."""
    try:
        value = float(environ.get(ENV_REPORT_INTERVAL, DEFAULT_REPORT_INTERVAL_SECONDS))
    except ValueError:
        return DEFAULT_REPORT_INTERVAL_SECONDS
    return value if math.isfinite(value) and value >= 0 else DEFAULT_REPORT_INTERVAL_SECONDS


class Sink(Protocol):
    """Where reports go. `send` must not block for long nor raise."""

    def send(self, reports: Mapping[str, Report]) -> None:
        """Deliver reports, by member name."""

    def close(self, timeout: float) -> None:
        """Deliver what is pending within `timeout` seconds, then stop."""


def _milestone(previous: MemberStatus | None, status: MemberStatus) -> bool:
    """A change worth reporting at once, whatever the interval: a new phase (Running,
    Restarting), or a run's first step (training has begun: what a user waits for after
    `kubectl apply`). A few per member per run, so the rate limit still bounds the writes."""
    if previous is None or previous.phase != status.phase:
        return True
    return not previous.step and bool(status.step)


class StatusReporter:
    """Receives every change of every member; passes at most one report per member per
    interval to the sink, each member's final report, phase changes and first step at once."""

    def __init__(
        self,
        sink: Sink,
        interval: float = DEFAULT_REPORT_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.sink = sink
        self.interval = interval
        self._clock = clock
        self._wall_clock = wall_clock
        self._last_sent: dict[str, float] = {}
        self._pending: dict[str, MemberStatus] = {}
        self._reported: dict[str, MemberStatus] = {}  # the last change seen of each member
        self._final: set[str] = set()

    def _due(self, name: str, now: float) -> bool:
        last = self._last_sent.get(name)
        return last is None or now - last >= self.interval

    def _send(self, names: Sequence[str], now: float) -> None:
        wall = self._wall_clock()
        reports = {name: member_report(self._pending.pop(name), wall) for name in names}
        for name in names:
            self._last_sent[name] = now
        if reports:
            self.sink.send(reports)

    def member_changed(self, name: str, status: MemberStatus, *, final: bool = False) -> None:
        if name in self._final:
            return
        previous = self._reported.get(name)
        self._reported[name] = status.model_copy()
        self._pending[name] = self._reported[name]
        now = self._clock()
        if final:
            self._final.add(name)
            self._send([name], now)
        elif self._due(name, now) or _milestone(previous, status):
            self._send([name], now)

    def tick(self) -> None:
        """Send what waited for the interval to pass (call it often)."""
        now = self._clock()
        self._send([name for name in self._pending if self._due(name, now)], now)

    def close(self, timeout: float = 10.0) -> None:
        """Send whatever is still pending, ignoring the interval, and close the sink."""
        self._send(list(self._pending), self._clock())
        self.sink.close(timeout)


# --------------------------------------------------------------------------------------------
# Kubernetes


def is_transient(error: BaseException) -> bool:
    """Whether a failed request is worth retrying."""
    import urllib3

    if isinstance(error, OSError | urllib3.exceptions.HTTPError):
        return True
    status = getattr(error, "status", None)
    return isinstance(status, int) and status in TRANSIENT_STATUSES


class SinkConfigError(Exception):
    """The sink cannot be set up (e.g. no service-account token): say so before training."""


class KubernetesSink:
    """Merge-patches `status.members` of one CoTrainJob, from a background thread."""

    def __init__(
        self,
        api: Any,
        namespace: str,
        job: str,
        retry_delays: Sequence[float] = (0.5, 1.0, 2.0, 4.0, 8.0),
        request_timeout: tuple[float, float] = (5.0, 15.0),
    ) -> None:
        self._api = api  # kubernetes.client.CustomObjectsApi
        self.namespace = namespace
        self.job = job
        self._retry_delays = tuple(retry_delays)
        self._request_timeout = request_timeout
        self._cond = threading.Condition()
        self._pending: dict[str, Report] = {}
        self._closing = False
        self._abandoned = False
        self._busy = False
        self.patches_sent = 0
        self.patches_failed = 0
        self._thread = threading.Thread(target=self._run, name="cotrain-reporter", daemon=True)
        self._thread.start()

    @classmethod
    def in_cluster(
        cls,
        namespace: str,
        job: str,
        environ: Mapping[str, str] = os.environ,
        **options: Any,
    ) -> KubernetesSink:
        """A sink that authenticates with the pod's service account (token, ca.crt) and finds
        the API server by KUBERNETES_SERVICE_HOST/PORT. Raises SinkConfigError when either is
        missing: a pod that cannot report should say so at once."""
        from kubernetes import client
        from kubernetes.config.config_exception import ConfigException
        from kubernetes.config.incluster_config import InClusterConfigLoader

        directory = Path(environ.get(ENV_SERVICEACCOUNT_DIR) or DEFAULT_SERVICEACCOUNT_DIR)
        configuration = client.Configuration()
        # The client's in-cluster loader, with the paths made overridable (it is untyped).
        loader = InClusterConfigLoader(  # type: ignore[no-untyped-call]
            token_filename=str(directory / "token"),
            cert_filename=str(directory / "ca.crt"),
            environ=environ,
        )
        try:
            loader.load_and_set(configuration)  # type: ignore[no-untyped-call]
        except ConfigException as error:
            raise SinkConfigError(
                f"cannot report to Kubernetes with the service account in {directory}: {error}"
            ) from error
        configuration.retries = 0  # this sink retries, with backoff, and knows what is transient
        api = client.CustomObjectsApi(client.ApiClient(configuration))
        return cls(api, namespace, job, **options)

    def send(self, reports: Mapping[str, Report]) -> None:
        with self._cond:
            self._pending.update(reports)  # a newer report of a member replaces an older one
            self._cond.notify_all()

    def close(self, timeout: float) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cond:
                self._abandoned = True
                self._cond.notify_all()
            log.warning("status reports not delivered within %.0fs; giving up on them", timeout)

    def _patch(self, reports: Mapping[str, Report]) -> None:
        self._api.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            self.job,
            {"status": {"members": dict(reports)}},
            _content_type=MERGE_PATCH,
            _request_timeout=self._request_timeout,
        )

    def _take(self) -> dict[str, Report]:
        batch, self._pending = self._pending, {}
        return batch

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._pending) or self._closing)
                if not self._pending or self._abandoned:
                    return
                batch = self._take()
            self._deliver(batch)

    def _deliver(self, batch: dict[str, Report]) -> None:
        for attempt, delay in enumerate((0.0, *self._retry_delays)):
            if delay:
                with self._cond:
                    if self._cond.wait_for(lambda: self._abandoned, timeout=delay):
                        return
                    batch.update(self._take())  # newer reports supersede the ones that failed
            try:
                self._patch(batch)
            except Exception as error:  # the API's errors must never reach the supervisor
                if not is_transient(error) or attempt == len(self._retry_delays):
                    self.patches_failed += 1
                    log.warning(
                        "cannot report status of %s/%s (members %s): %s",
                        self.namespace,
                        self.job,
                        ", ".join(sorted(batch)),
                        _describe(error),
                    )
                    return
                continue
            self.patches_sent += 1
            return


def _describe(error: BaseException) -> str:
    """HTTP status and reason, and the API server's own message (e.g. which admission policy
    refused the report, and why) when the answer carries one."""
    status = getattr(error, "status", None)
    reason = getattr(error, "reason", None)
    if status is None:
        return f"{type(error).__name__}: {error}"
    described = f"HTTP {status} {reason or ''}".strip()
    try:
        message = json.loads(getattr(error, "body", None) or "{}").get("message")
    except (ValueError, AttributeError):
        message = None
    return f"{described}: {message}" if isinstance(message, str) and message else described


# --------------------------------------------------------------------------------------------
# local


class LocalSink:
    """The job's status in a YAML file (rewritten atomically), plus a line per report."""

    def __init__(
        self,
        path: Path | None,
        status: CoTrainJobStatus | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.path = path
        self.status = status or CoTrainJobStatus()
        self.stream = stream
        self.members: dict[str, Report] = {}

    def send(self, reports: Mapping[str, Report]) -> None:
        for name, report in reports.items():
            self.members[name] = dict(report)
            if self.stream is not None:
                self.stream.write(f"{name}: {describe_report(report)}\n")
                self.stream.flush()
        self.write()

    def document(self) -> dict[str, Any]:
        document = dump(self.status)
        document["members"] = {name: self.members[name] for name in sorted(self.members)}
        return document

    def write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(yaml.safe_dump(self.document(), sort_keys=False), encoding="utf-8")
        os.replace(partial, self.path)

    def close(self, timeout: float) -> None:
        self.write()


def describe_report(report: Mapping[str, Any]) -> str:
    """One line for a terminal: phase, steps, loss, throughput, reason."""
    parts = [str(report.get("phase", "Pending"))]
    if report.get("step") is not None:
        total = report.get("totalSteps")
        parts.append(f"step {report['step']}/{total}" if total else f"step {report['step']}")
    if report.get("loss") is not None:
        parts.append(f"loss {report['loss']:.4g}")
    if report.get("samplesPerSecond") is not None:
        parts.append(f"{report['samplesPerSecond']:.0f} samples/s")
    if report.get("reason"):
        message = f": {report['message']}" if report.get("message") else ""
        parts.append(f"({report['reason']}{message})")
    return " ".join(parts)
