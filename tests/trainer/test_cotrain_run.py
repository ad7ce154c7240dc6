"""`cotrain run` and `cotrain supervise` as a user (or a pod) runs them: the installed entry
point, in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from cotrain_operator.api.contract import EXIT_MEMBERS_FAILED
from cotrain_trainer.report import EVENT_COMPLETED, EVENT_STARTED, EVENT_STEP, read_events
from tests.fixtures.jobs import a_job
from tests.trainer.builders import a_plan, a_script

ROOT = Path(__file__).resolve().parents[2]
COTRAIN = str(Path(sys.executable).with_name("cotrain"))
PNG = b"\x89PNG\r\n\x1a\n"


def write_job(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(document))
    return path


def reduced_example(tmp_path: Path, steps: int) -> Path:
    """examples/mixed-same-gpu.yaml with fewer steps."""
    document = yaml.safe_load((ROOT / "examples" / "mixed-same-gpu.yaml").read_text())
    for member in document["spec"]["members"]:
        member["steps"] = steps
    return write_job(tmp_path / "mixed-same-gpu.yaml", document)


def lifetime(progress: Path) -> tuple[float, float]:
    """When a member's process began (before it imported its framework) and when it completed,
    from its progress file."""
    lines = [json.loads(line) for line in progress.read_text().splitlines()]
    start = next(e["launched"] for e in lines if e["event"] == EVENT_STARTED)
    end = [e["time"] for e in lines if e["event"] == EVENT_COMPLETED][-1]
    return float(start), float(end)


@pytest.mark.slow
def test_run_trains_pytorch_and_tensorflow_side_by_side(tmp_path: Path) -> None:
    job, out = reduced_example(tmp_path, steps=150), tmp_path / "out"
    started = time.monotonic()
    result = subprocess.run(
        [COTRAIN, "run", str(job), "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=180,
        check=False,
    )
    assert time.monotonic() - started < 180
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no GPU found" in result.stdout
    assert "members run on the CPU" in result.stdout
    status = yaml.safe_load((out / "status.yaml").read_text())
    assert status["phase"] == "Succeeded"
    assert status["readyMembers"] == "2/2"
    assert status["progress"] == "100%"
    assert set(status["members"]) == {"torch-mlp", "tf-mlp"}
    for name, member in status["members"].items():
        assert member["phase"] == "Succeeded", name
        assert member["reason"] == "Completed"
        assert member["step"] == member["totalSteps"] == 150
        assert member["loss"] < member["firstLoss"], name
        assert member["samplesPerSecond"] > 0
    assert (out / "loss.png").read_bytes().startswith(PNG)
    for line in ("status:", "plot:", "torch-mlp", "tf-mlp", "→"):
        assert line in result.stdout
    # Both member processes were alive at once: each began before the other completed.
    torch_started, torch_done = lifetime(out / "progress" / "torch-mlp.jsonl")
    tf_started, tf_done = lifetime(out / "progress" / "tf-mlp.jsonl")
    assert max(torch_started, tf_started) < min(torch_done, tf_done)


def test_run_refuses_an_invalid_job_before_starting_anything(tmp_path: Path) -> None:
    job = write_job(tmp_path / "bad.yaml", a_job("bad").sharing(migProfile="1g.10gb").build())
    result = subprocess.run(
        [COTRAIN, "run", str(job), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "spec.sharing.migProfile: migProfile is only used with mode MIG" in result.stdout
    assert not (tmp_path / "out").exists()


ENDLESS = """
import time
from cotrain_trainer import report
with report.session(total_steps=100000):
    for step in range(1, 100001):
        time.sleep(0.01)
        report.step(step=step, loss=10.0 / step, samples=8, total_steps=100000)
"""


def endless_job(name: str) -> dict[str, Any]:
    document = a_job(name).build()
    for member in document["spec"]["members"]:
        member.pop("steps", None)
        member["command"] = ["python", "-c", ENDLESS]  # `python` is the trainer's, first on PATH
    return document


def wait_for_steps(progress_dir: Path, members: int, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        files = list(progress_dir.glob("*.jsonl"))
        if len(files) == members and all(
            any(e.event == EVENT_STEP for e in read_events(f)) for f in files
        ):
            return
        time.sleep(0.1)
    raise AssertionError("the members never reported a step")


def test_ctrl_c_stops_the_members_and_still_writes_status_and_plot(tmp_path: Path) -> None:
    job, out = write_job(tmp_path / "endless.yaml", endless_job("endless")), tmp_path / "out"
    process = subprocess.Popen(
        [COTRAIN, "run", str(job), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COTRAIN_REPORT_INTERVAL": "0.2"},
    )
    try:
        wait_for_steps(out / "progress", 2, process)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, output
    status = yaml.safe_load((out / "status.yaml").read_text())
    assert status["phase"] == "Failed"
    for name, member in status["members"].items():
        assert member["phase"] == "Failed", name
        assert member["reason"] == "Stopped"
        assert member["message"].startswith("stopped by SIGINT")
        assert member["step"] > 0
    assert (out / "loss.png").read_bytes().startswith(PNG)
    assert "Stopped" in output


def supervise(
    tmp_path: Path, plan_json: str, extra_env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    env = {**os.environ, "COTRAIN_POD_PLAN": plan_json, "COTRAIN_REPORT": "local"}
    env.update(extra_env or {})
    return subprocess.Popen(
        [COTRAIN, "supervise", "--work-dir", str(tmp_path / "work"), "--status-file",
         str(tmp_path / "status.yaml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )  # fmt: skip


def test_supervise_runs_the_pod_plan_and_exits_as_the_operator_expects(tmp_path: Path) -> None:
    good = a_plan(a_script("hello", "print('hello from a member')")).model_dump_json(by_alias=True)
    process = supervise(tmp_path, good)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "[hello] hello from a member" in output  # member output, prefixed, in the pod's log
    assert yaml.safe_load((tmp_path / "status.yaml").read_text())["phase"] == "Succeeded"

    bad = a_plan(a_script("crash", "raise SystemExit(2)")).model_dump_json(by_alias=True)
    process = supervise(tmp_path, bad)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == EXIT_MEMBERS_FAILED, output  # failed for good: no pod retry
    member = yaml.safe_load((tmp_path / "status.yaml").read_text())["members"]["crash"]
    assert member["reason"] == "BackoffLimitExceeded"
    assert member["exitCode"] == 2


def test_supervise_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    plan = a_plan(a_script("endless", ENDLESS)).model_dump_json(by_alias=True)
    process = supervise(tmp_path, plan, {"COTRAIN_REPORT_INTERVAL": "0.2"})
    try:
        wait_for_steps(tmp_path / "work" / "progress", 1, process)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, output
    member = yaml.safe_load((tmp_path / "status.yaml").read_text())["members"]["endless"]
    assert (member["phase"], member["reason"]) == ("Failed", "Stopped")
    events = [e.event for e in read_events(tmp_path / "work" / "progress" / "endless.jsonl")]
    assert events[0] == EVENT_STARTED
    assert EVENT_COMPLETED not in events


def test_supervise_in_a_pod_without_a_service_account_says_so(tmp_path: Path) -> None:
    plan = a_plan(a_script("hello", "pass")).model_dump_json(by_alias=True)
    process = supervise(
        tmp_path,
        plan,
        {
            "COTRAIN_REPORT": "kubernetes",
            "COTRAIN_SERVICEACCOUNT_DIR": str(tmp_path / "none"),
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": "6443",
        },
    )
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "cannot report to Kubernetes" in output
