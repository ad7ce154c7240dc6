"""Status reporting: the rate limit, the report itself, and both sinks (Kubernetes over real
HTTPS to a fake API server, and the local status file)."""

from __future__ import annotations

import json
import math
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from cotrain_operator.api.contract import ENV_SERVICEACCOUNT_DIR
from cotrain_operator.api.models import CoTrainJobStatus, JobPhase, MemberPhase, MemberStatus
from cotrain_trainer.reporter import (
    KubernetesSink,
    LocalSink,
    SinkConfigError,
    StatusReporter,
    member_report,
    report_interval,
    rfc3339,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class RecordingSink:
    def __init__(self) -> None:
        self.sent: list[dict[str, dict[str, Any]]] = []
        self.closed = False

    def send(self, reports: Any) -> None:
        self.sent.append(dict(reports))

    def close(self, timeout: float) -> None:
        self.closed = True

    def reports_of(self, name: str) -> list[dict[str, Any]]:
        return [batch[name] for batch in self.sent if name in batch]


def running(step: int) -> MemberStatus:
    return MemberStatus(phase=MemberPhase.RUNNING, step=step, total_steps=1000, loss=1.0 / step)


def test_rate_limit_under_a_fast_loop() -> None:
    clock, sink = FakeClock(), RecordingSink()
    reporter = StatusReporter(sink, interval=5.0, clock=clock, wall_clock=lambda: 1.7e9)
    for step in range(1, 1001):  # 1000 updates over 12 simulated seconds
        clock.now = (step - 1) * 0.012
        reporter.member_changed("torch", running(step))
        reporter.tick()
    assert [r["step"] for r in sink.reports_of("torch")] == [1, 418, 835]  # t = 0, 5.004, 10.008
    done = MemberStatus(phase=MemberPhase.SUCCEEDED, step=1000, total_steps=1000)
    reporter.member_changed("torch", done, final=True)  # the final one is never held back
    reports = sink.reports_of("torch")
    assert len(reports) == 4
    assert reports[-1]["phase"] == "Succeeded"
    assert reports[-1]["step"] == 1000
    reporter.member_changed("torch", running(5))  # nothing after the final report
    reporter.close()
    assert len(sink.reports_of("torch")) == 4
    assert sink.closed


def test_rate_limit_is_per_member_and_ticks_flush_what_waited() -> None:
    clock, sink = FakeClock(), RecordingSink()
    reporter = StatusReporter(sink, interval=5.0, clock=clock)
    reporter.member_changed("a", running(1))
    reporter.member_changed("b", running(1))  # another member is not held back by a's report
    clock.now = 1.0
    reporter.member_changed("a", running(2))  # waits
    reporter.tick()
    assert len(sink.sent) == 2
    clock.now = 5.0
    reporter.tick()  # no new update, but the one that waited goes out once due
    assert sink.sent[-1] == {"a": sink.sent[-1]["a"]}
    assert sink.sent[-1]["a"]["step"] == 2
    reporter.tick()
    assert len(sink.sent) == 3


def test_a_new_phase_and_a_runs_first_step_are_not_held_back() -> None:
    clock, sink = FakeClock(), RecordingSink()
    reporter = StatusReporter(sink, interval=5.0, clock=clock)

    def at(now: float, status: MemberStatus) -> None:
        clock.now = now
        reporter.member_changed("tf", status)

    at(0.0, MemberStatus(phase=MemberPhase.RUNNING))  # spawned: sent
    at(4.0, MemberStatus(phase=MemberPhase.RUNNING, step=0, total_steps=1000))  # imported: held
    at(4.5, running(1))  # the first step: sent at once, though 4.5 s < 5 s since the last
    at(5.0, running(2))  # held
    at(6.0, MemberStatus(phase=MemberPhase.RESTARTING, step=2, total_steps=1000))  # sent
    at(7.0, MemberStatus(phase=MemberPhase.RUNNING, step=0, total_steps=1000))  # a new phase
    at(8.0, running(1))  # the new run's first step
    at(8.5, running(2))  # held
    sent = [(r["phase"], r.get("step")) for r in sink.reports_of("tf")]
    assert sent == [
        ("Running", None),
        ("Running", 1),
        ("Restarting", 2),
        ("Running", 0),
        ("Running", 1),
    ]


def test_report_is_camel_case_finite_and_stamped() -> None:
    status = MemberStatus(
        phase=MemberPhase.RUNNING,
        restarts=1,
        step=10,
        total_steps=100,
        loss=math.nan,
        first_loss=math.inf,
        samples_per_second=1234.5,
        gpu_memory_bytes=2**30,
        exit_code=None,
    )
    report = member_report(status, 1_700_000_000.0)
    assert report == {
        "phase": "Running",
        "restarts": 1,
        "step": 10,
        "totalSteps": 100,
        "samplesPerSecond": 1234.5,
        "gpuMemoryBytes": 2**30,
        "lastReportTime": "2023-11-14T22:13:20Z",
    }
    assert rfc3339(0) == "1970-01-01T00:00:00Z"


@pytest.mark.parametrize(
    ("value", "seconds"), [(None, 5.0), ("0.5", 0.5), ("0", 0.0), ("soon", 5.0), ("-1", 5.0)]
)
def test_report_interval_from_env(value: str | None, seconds: float) -> None:
    environ = {} if value is None else {"COTRAIN_REPORT_INTERVAL": value}
    assert report_interval(environ) == seconds


def test_local_sink_writes_the_job_status_file(tmp_path: Path) -> None:
    path = tmp_path / "out" / "status.yaml"
    sink = LocalSink(path, CoTrainJobStatus(phase=JobPhase.RUNNING))
    sink.send({"torch": member_report(running(3), 0)})
    sink.status = CoTrainJobStatus(phase=JobPhase.SUCCEEDED)
    sink.close(1.0)
    document = yaml.safe_load(path.read_text())
    assert document["phase"] == "Succeeded"
    assert document["members"]["torch"]["step"] == 3
    assert not list(path.parent.glob("*.partial"))


# --------------------------------------------------------------------------------------------
# Kubernetes, over HTTPS


class FakeApiServer:
    """Answers PATCHes with the queued statuses (then 200) and records every request."""

    def __init__(self, directory: Path) -> None:
        if shutil.which("openssl") is None:
            pytest.skip("openssl is needed to make the fake API server's certificate")
        self.cert, key = directory / "ca.crt", directory / "key.pem"
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                "-keyout", str(key), "-out", str(self.cert), "-subj", "/CN=127.0.0.1",
                "-addext", "subjectAltName=IP:127.0.0.1",
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        self.requests: list[dict[str, Any]] = []
        self.statuses: list[int] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_PATCH(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                server.requests.append(
                    {
                        "path": self.path,
                        "headers": dict(self.headers),
                        "body": json.loads(self.rfile.read(length)),
                    }
                )
                status = server.statuses.pop(0) if server.statuses else 200
                answer = {"kind": "CoTrainJob"}
                if status != 200:
                    answer = {"kind": "Status", "status": "Failure", "message": f"no ({status})"}
                payload = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def serviceaccount(self, directory: Path) -> dict[str, str]:
        directory.mkdir()
        (directory / "token").write_text("test-token")
        shutil.copy(self.cert, directory / "ca.crt")
        return {
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(self.port),
            ENV_SERVICEACCOUNT_DIR: str(directory),
        }

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def api_server(tmp_path: Path) -> Iterator[FakeApiServer]:
    server = FakeApiServer(tmp_path)
    yield server
    server.close()


def test_kubernetes_sink_merge_patches_the_status_subresource(
    api_server: FakeApiServer, tmp_path: Path
) -> None:
    environ = api_server.serviceaccount(tmp_path / "sa")
    sink = KubernetesSink.in_cluster("team-a", "mixed", environ=environ)
    sink.send({"torch": member_report(running(7), 0)})
    sink.close(timeout=30)
    assert sink.patches_sent == 1
    [request] = api_server.requests
    assert (
        request["path"] == "/apis/cotrain.dev/v1alpha1/namespaces/team-a/cotrainjobs/mixed/status"
    )
    assert request["headers"]["Content-Type"] == "application/merge-patch+json"
    assert request["headers"]["authorization"].lower() == "bearer test-token"
    assert request["body"] == {"status": {"members": {"torch": member_report(running(7), 0)}}}


def test_kubernetes_sink_retries_transient_errors_with_the_newest_report(
    api_server: FakeApiServer, tmp_path: Path
) -> None:
    api_server.statuses = [503, 429]
    environ = api_server.serviceaccount(tmp_path / "sa")
    sink = KubernetesSink.in_cluster("ns", "job", environ=environ, retry_delays=(0.05, 0.05, 0.05))
    sink.send({"tf": member_report(running(1), 0)})
    sink.close(timeout=30)
    assert len(api_server.requests) == 3
    assert sink.patches_sent == 1
    assert sink.patches_failed == 0


def test_kubernetes_sink_does_not_retry_what_cannot_succeed(
    api_server: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    api_server.statuses = [403]
    environ = api_server.serviceaccount(tmp_path / "sa")
    sink = KubernetesSink.in_cluster("ns", "job", environ=environ, retry_delays=(0.05,))
    sink.send({"tf": member_report(running(1), 0)})
    sink.close(timeout=30)
    assert len(api_server.requests) == 1
    assert sink.patches_failed == 1
    # The API server's reason (e.g. the admission policy's message) reaches the pod's log.
    assert "cannot report status of ns/job (members tf): HTTP 403 Forbidden: no (403)" in (
        caplog.text
    )


def test_an_unreachable_api_server_never_raises(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    directory = tmp_path / "sa"
    directory.mkdir()
    (directory / "token").write_text("t")
    (directory / "ca.crt").write_text("not really a certificate, never used: nothing answers")
    environ = {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(port),
        ENV_SERVICEACCOUNT_DIR: str(directory),
    }
    sink = KubernetesSink.in_cluster("ns", "job", environ=environ, retry_delays=(0.01, 0.01))
    reporter = StatusReporter(sink, interval=0)
    reporter.member_changed("torch", running(1))
    reporter.member_changed("torch", running(2), final=True)
    reporter.close(timeout=30)
    assert sink.patches_sent == 0
    assert sink.patches_failed >= 1


def test_kubernetes_sink_without_a_service_account_says_so(tmp_path: Path) -> None:
    environ = {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": "443",
        ENV_SERVICEACCOUNT_DIR: str(tmp_path / "nothing"),
    }
    with pytest.raises(SinkConfigError, match="token file does not exist"):
        KubernetesSink.in_cluster("ns", "job", environ=environ)
