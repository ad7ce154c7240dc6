"""`cotrain submit` and `cotrain status` against the real API server, run as a user runs them: a
subprocess with KUBECONFIG, its stdout a pipe or a terminal (a pty). No operator runs over these
namespaces ("cli*"): the test plays it, writing the job's status through the status subresource
as the operator and the trainers do, each write made only once the CLI has said it is following.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cotrain_operator.api.contract import (
    LABEL_ATTEMPT,
    LABEL_GROUP,
    LABEL_JOB,
    TRAINER_CONTAINER,
)
from tests.controlplane.cluster import ControlPlane, free_port
from tests.fixtures.cotrain_cli import Piped, Terminal, run_cli, stop_all
from tests.fixtures.faultproxy import running_proxy, write_proxy_kubeconfig
from tests.fixtures.kube import Kube, wait_for

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "mixed-same-gpu.yaml"
FOLLOWING = "following cotrainjob"


@pytest.fixture
def namespace_prefix() -> str:
    return "cli"  # outside the shared operator's "t*": these tests play the operator


@pytest.fixture(autouse=True)
def _no_cli_left_running() -> Iterator[None]:
    yield
    stop_all()


def example(tmp_path: Path, name: str = "mixed-same-gpu") -> Path:
    document = yaml.safe_load(EXAMPLE.read_text())
    document["metadata"]["name"] = name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def submitted(cluster: ControlPlane, namespace: str, path: Path) -> None:
    """`cotrain submit --no-follow` of `path`, which must succeed."""
    applied = run_cli(cluster.kubeconfig, "submit", str(path), "-n", namespace, "--no-follow")
    assert applied.returncode == 0, applied.stderr


def condition(kind: str, reason: str, message: str) -> dict[str, Any]:
    return {
        "type": kind,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-11-22T12:00:00Z",
    }


def report(phase: str, step: int, total: int = 300, **extra: Any) -> dict[str, Any]:
    return {"phase": phase, "step": step, "totalSteps": total, "loss": 2.0 - step / 300} | extra


@pytest.fixture
def status_writer(kube: Kube, namespace: str) -> Callable[..., None]:
    def write(name: str, **status: Any) -> None:
        kube.patch_job_status(namespace, name, status)

    return write


def test_submit_through_a_pipe_applies_follows_and_ends_with_the_summary(
    cluster: ControlPlane,
    kube: Kube,
    namespace: str,
    tmp_path: Path,
    status_writer: Callable[..., None],
) -> None:
    cli = Piped(cluster.kubeconfig, "submit", str(example(tmp_path)), "-n", namespace)
    assert cli.expect("mixed-same-gpu ") == (
        f"cotrainjobs.cotrain.dev/mixed-same-gpu created in namespace {namespace}\n"
    )
    cli.expect(FOLLOWING)
    managers = [
        m["manager"] for m in kube.job(namespace, "mixed-same-gpu")["metadata"]["managedFields"]
    ]
    assert managers == ["cotrain-cli"]

    status_writer("mixed-same-gpu", phase="Pending")
    cli.expect("cotrainjob mixed-same-gpu: Pending")
    running = {"torch-mlp": report("Running", 0), "tf-mlp": report("Running", 0)}
    status_writer("mixed-same-gpu", phase="Running", members=running)
    cli.expect("[tf-mlp] Running")
    status_writer("mixed-same-gpu", members={"torch-mlp": report("Running", 150)})
    cli.expect("[torch-mlp] step 150/300")
    done = {
        "torch-mlp": report("Succeeded", 300, reason="Completed", samplesPerSecond=1234.0),
        "tf-mlp": report("Succeeded", 300, reason="Completed"),
    }
    status_writer(
        "mixed-same-gpu",
        phase="Succeeded",
        members=done,
        conditions=[condition("Succeeded", "AllMembersSucceeded", "both members finished")],
    )
    code, output = cli.finish()
    assert code == 0, output
    assert "\x1b[" not in output
    assert "[tf-mlp] step 300/300" in output
    table = output[output.index("member") :]
    assert re.search(r"torch-mlp\s+PyTorch\s+Succeeded\s+300/300", table), output
    assert re.search(r"tf-mlp\s+TensorFlow\s+Succeeded\s+300/300", table), output
    assert "1,234" in table
    assert (
        "cotrainjob mixed-same-gpu: Succeeded (AllMembersSucceeded: both members finished)"
        in output
    )


def test_a_submitted_job_that_fails_exits_1_with_its_reasons(
    cluster: ControlPlane, namespace: str, tmp_path: Path, status_writer: Callable[..., None]
) -> None:
    cli = Piped(cluster.kubeconfig, "submit", str(example(tmp_path, "doomed")), "-n", namespace)
    cli.expect(FOLLOWING)
    status_writer(
        "doomed",
        phase="Failed",
        members={
            "torch-mlp": report("Succeeded", 300, reason="Completed"),
            "tf-mlp": report("Failed", 12, reason="GPUOutOfMemory", message="CUDA out of memory"),
        },
        conditions=[condition("Failed", "MembersFailed", "member tf-mlp failed")],
    )
    code, output = cli.finish()
    assert code == 1, output
    assert "\x1b[" not in output
    assert "cotrainjob doomed: Failed (MembersFailed: member tf-mlp failed)" in output
    assert "failed: MembersFailed: member tf-mlp failed" in output
    assert "  tf-mlp: GPUOutOfMemory: CUDA out of memory" in output
    assert re.search(r"tf-mlp\s+TensorFlow\s+Failed\s+12/300", output), output


def test_resubmitting_is_unchanged_or_configured_and_never_forces_a_conflict(
    cluster: ControlPlane, kube: Kube, namespace: str, tmp_path: Path
) -> None:
    path = example(tmp_path, "again")
    first = run_cli(cluster.kubeconfig, "submit", str(path), "-n", namespace, "--no-follow")
    assert first.returncode == 0, first.stderr
    assert "cotrainjobs.cotrain.dev/again created" in first.stdout
    second = run_cli(cluster.kubeconfig, "submit", str(path), "-n", namespace, "--no-follow")
    assert "cotrainjobs.cotrain.dev/again unchanged" in second.stdout, second
    document = yaml.safe_load(path.read_text())
    document["spec"]["members"][0]["steps"] = 200
    path.write_text(yaml.safe_dump(document))
    third = run_cli(cluster.kubeconfig, "submit", str(path), "-n", namespace, "--no-follow")
    assert "cotrainjobs.cotrain.dev/again configured" in third.stdout, third

    # Someone else takes over the run policy; the file says otherwise: a conflict, not forced.
    patch = json.dumps({"spec": {"runPolicy": {"backoffLimit": 5}}})
    cluster.kubectl(
        "patch", "cotrainjob", "again", "-n", namespace, "--type=merge",
        "--field-manager=someone-else", "-p", patch,
    )  # fmt: skip
    document["spec"]["runPolicy"] = {"backoffLimit": 1}
    path.write_text(yaml.safe_dump(document))
    conflict = run_cli(cluster.kubeconfig, "submit", str(path), "-n", namespace, "--no-follow")
    assert conflict.returncode == 1
    assert "Traceback" not in conflict.stderr
    (line,) = conflict.stderr.splitlines()
    assert "someone-else" in line
    assert "--force-conflicts" in line
    assert kube.job(namespace, "again")["spec"]["runPolicy"]["backoffLimit"] == 5


def test_an_invalid_file_is_refused_before_any_request(tmp_path: Path) -> None:
    document = yaml.safe_load(EXAMPLE.read_text())
    document["spec"]["members"][1]["name"] = "torch-mlp"
    path = tmp_path / "dup.yaml"
    path.write_text(yaml.safe_dump(document))
    ran = run_cli(tmp_path / "no-such-kubeconfig", "submit", str(path))
    assert ran.returncode == 1
    assert "CoTrainJob is invalid" in ran.stdout


def test_status_watch_on_a_terminal_draws_progress_bars_to_the_end(
    cluster: ControlPlane, namespace: str, tmp_path: Path, status_writer: Callable[..., None]
) -> None:
    submitted(cluster, namespace, example(tmp_path, "bars"))
    term = Terminal(cluster.kubeconfig, "status", "bars", "-w", "-n", namespace)
    term.expect(FOLLOWING.encode())
    status_writer("bars", phase="Running", members={"torch-mlp": report("Running", 30)})
    term.expect(rb"30/300")
    status_writer("bars", members={"torch-mlp": report("Running", 150)})
    term.expect(rb"150/300")
    status_writer(
        "bars",
        phase="Succeeded",
        members={
            "torch-mlp": report("Succeeded", 300, reason="Completed"),
            "tf-mlp": report("Succeeded", 300, reason="Completed"),
        },
    )
    assert term.finish() == 0, term.text()
    text = term.text()
    assert "\x1b[" in text
    assert "━" in text
    final = text[text.rindex("member") :]
    assert re.search(r"torch-mlp\s+PyTorch\s+\S*Succeeded\S*\s+300/300", final), text


def test_ctrl_c_stops_following_and_leaves_the_job_running(
    cluster: ControlPlane, kube: Kube, namespace: str, tmp_path: Path
) -> None:
    cli = Piped(cluster.kubeconfig, "submit", str(example(tmp_path, "left")), "-n", namespace)
    cli.expect(FOLLOWING)
    cli.process.send_signal(signal.SIGINT)
    code, output = cli.finish()
    assert code == 130, output
    assert f"keeps running in namespace {namespace}" in output
    assert f"cotrain status left -w -n {namespace}" in output
    assert kube.job(namespace, "left")["metadata"]["name"] == "left"


def test_status_lists_jobs_shows_one_and_says_when_one_is_missing(
    cluster: ControlPlane, kube: Kube, namespace: str, status_writer: Callable[..., None]
) -> None:
    for name in ("alpha", "beta"):
        document = yaml.safe_load(EXAMPLE.read_text())
        document["metadata"]["name"] = name
        kube.create_job(namespace, document)
    status_writer("alpha", phase="Running", readyMembers="2/2", progress="45%",
                  members={"torch-mlp": report("Running", 135)})  # fmt: skip
    listed = run_cli(cluster.kubeconfig, "status", "-n", namespace)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["NAME", "PHASE", "READY", "PROGRESS", "AGE"]
    assert lines[1].split()[:4] == ["alpha", "Running", "2/2", "45%"]
    assert lines[2].split()[0] == "beta"

    shown = run_cli(cluster.kubeconfig, "status", "alpha", "-n", namespace)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"torch-mlp\s+PyTorch\s+Running\s+135/300", shown.stdout), shown.stdout
    assert re.search(r"tf-mlp\s+TensorFlow\s+Pending", shown.stdout), shown.stdout
    assert "cotrainjob alpha: Running" in shown.stdout

    missing = run_cli(cluster.kubeconfig, "status", "gamma", "-n", namespace)
    assert missing.returncode == 1
    assert missing.stderr == (
        f"cotrain: cotrainjob gamma not found in namespace {namespace} "
        "(`cotrain status` lists the namespace's jobs)\n"
    )
    watched = run_cli(cluster.kubeconfig, "status", "gamma", "-w", "-n", namespace)
    assert (watched.returncode, watched.stderr) == (1, missing.stderr)


def kubeconfig(
    path: Path, cluster: ControlPlane, contexts: dict[str, tuple[str, str | None]], current: str
) -> Path:
    """A kubeconfig of `contexts`: name -> (server, namespace), as the admin."""
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": name,
                        "cluster": {
                            "server": server,
                            "certificate-authority": str(cluster.ca_file),
                        },
                    }
                    for name, (server, _) in contexts.items()
                ],
                "users": [{"name": "admin", "user": {"token": cluster.token}}],
                "contexts": [
                    {
                        "name": name,
                        "context": {"cluster": name, "user": "admin"}
                        | ({"namespace": ns} if ns else {}),
                    }
                    for name, (_, ns) in contexts.items()
                ],
                "current-context": current,
            }
        )
    )
    return path


@pytest.fixture
def one_job(kube: Kube, namespace: str) -> str:
    document = yaml.safe_load(EXAMPLE.read_text())
    kube.create_job(namespace, document)
    return str(document["metadata"]["name"])


def test_context_and_namespace_are_chosen_as_kubectl_chooses_them(
    cluster: ControlPlane, namespace: str, tmp_path: Path, one_job: str
) -> None:
    wrong = f"https://127.0.0.1:{free_port()}"
    both = kubeconfig(
        tmp_path / "both",
        cluster,
        {"broken": (wrong, None), "right": (cluster.server, namespace)},
        current="broken",
    )
    unreachable = run_cli(None, "status", "--kubeconfig", str(both))
    assert unreachable.returncode == 1
    (line,) = unreachable.stderr.splitlines()
    assert f"cannot reach the API server {wrong}" in line
    assert "context broken" in line

    chosen = run_cli(None, "status", "--kubeconfig", str(both), "--context", "right")
    assert chosen.returncode == 0, chosen.stderr
    assert chosen.stdout.splitlines()[1].split()[0] == one_job  # the context's namespace
    elsewhere = run_cli(
        None, "status", "--kubeconfig", str(both), "--context", "right", "-n", "default"
    )
    assert (elsewhere.returncode, elsewhere.stdout) == (0, "")
    assert elsewhere.stderr == "No CoTrainJob in namespace default.\n"

    unknown = run_cli(None, "status", "--kubeconfig", str(both), "--context", "nope")
    assert unknown.returncode == 1
    assert "context 'nope' is not in kubeconfig" in unknown.stderr
    assert "broken, right" in unknown.stderr


def test_kubeconfig_lists_merge_and_the_first_current_context_wins(
    cluster: ControlPlane, namespace: str, tmp_path: Path, one_job: str
) -> None:
    right = kubeconfig(tmp_path / "a", cluster, {"right": (cluster.server, namespace)}, "right")
    wrong = f"https://127.0.0.1:{free_port()}"
    broken = kubeconfig(tmp_path / "b", cluster, {"broken": (wrong, None)}, "broken")
    merged = f"{right}{os.pathsep}{tmp_path / 'absent'}{os.pathsep}{broken}"
    listed = run_cli(merged, "status")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[1].split()[0] == one_job
    other = run_cli(merged, "status", "--context", "broken")
    assert other.returncode == 1
    assert f"cannot reach the API server {wrong}" in other.stderr

    nothing = run_cli(tmp_path / "absent", "status")
    assert nothing.returncode == 1
    assert nothing.stderr.startswith("cotrain: no kubeconfig: none found at KUBECONFIG=")


def test_logs_of_an_unknown_member_lists_the_members(
    cluster: ControlPlane, namespace: str, one_job: str
) -> None:
    ran = run_cli(cluster.kubeconfig, "logs", one_job, "nobody", "-n", namespace)
    assert ran.returncode == 1
    assert ran.stderr == (
        f"cotrain: cotrainjob {one_job} has no member 'nobody'; its members: torch-mlp, tf-mlp\n"
    )
    pending = run_cli(cluster.kubeconfig, "logs", one_job, "tf-mlp", "-n", namespace)
    assert pending.returncode == 1
    assert f"cotrainjob {one_job} has no trainer pod holding member tf-mlp yet" in pending.stderr


def test_a_follow_survives_a_dropped_watch_and_an_expired_resource_version(
    cluster: ControlPlane, namespace: str, tmp_path: Path, status_writer: Callable[..., None]
) -> None:
    submitted(cluster, namespace, example(tmp_path, "resumed"))
    jobs = f"/apis/cotrain.dev/v1alpha1/namespaces/{namespace}/cotrainjobs"
    with running_proxy(cluster.server, cluster.ca_file) as proxy:
        through = write_proxy_kubeconfig(tmp_path / "proxy.kubeconfig", proxy, cluster.token)
        cli = Piped(through, "status", "resumed", "-w", "-n", namespace)
        cli.expect(FOLLOWING)
        wait_for("the CLI's watch open", lambda: proxy.open_watches() == 1)
        # The watch cut, as a load balancer cuts it; its resumption answered 410 Gone, as when
        # the server has compacted the version it resumes from: the CLI lists again.
        gone = proxy.fail("GET", f"^{jobs}$", 410)
        assert proxy.drop_watches() == 1
        wait_for("the 410 answered", lambda: gone.hits == 1)
        wait_for("a new watch open", lambda: proxy.open_watches() == 1)
        status_writer("resumed", phase="Running", members={"torch-mlp": report("Running", 60)})
        cli.expect("[torch-mlp] step 60/300")
        status_writer(
            "resumed",
            phase="Succeeded",
            members={
                "torch-mlp": report("Succeeded", 300, reason="Completed"),
                "tf-mlp": report("Succeeded", 300, reason="Completed"),
            },
        )
        code, output = cli.finish()
        watches = [r for r in proxy.requests("GET", f"^{jobs}$") if r.watch]
        lists = [r for r in proxy.requests("GET", f"^{jobs}$") if not r.watch]
    assert code == 0, output
    assert len(watches) >= 3, watches  # the first, the one answered 410, the one after
    assert len(lists) >= 2, lists  # the first list, and the list after the 410
    assert "Traceback" not in output


def test_refused_credentials_and_missing_rights_are_one_line_each(
    cluster: ControlPlane, namespace: str, tmp_path: Path, one_job: str
) -> None:
    def as_token(token: str, name: str) -> Path:
        path = kubeconfig(tmp_path / name, cluster, {"c": (cluster.server, namespace)}, "c")
        document = json.loads(path.read_text())
        document["users"] = [{"name": "admin", "user": {"token": token}}]
        path.write_text(json.dumps(document))
        return path

    refused = run_cli(as_token("not-a-token", "bogus"), "status", one_job)
    assert refused.returncode == 1
    (line,) = refused.stderr.splitlines()
    assert "refused the credentials of context c (401 Unauthorized)" in line

    # A ServiceAccount with no role at all: authenticated, and forbidden.
    nobody = cluster.service_account_token(namespace, "nobody")
    forbidden = run_cli(as_token(nobody, "nobody"), "status", one_job)
    assert forbidden.returncode == 1
    (line,) = forbidden.stderr.splitlines()
    assert line.startswith("cotrain: forbidden to "), line
    assert f"namespace {namespace}" in line, line
    assert "ask for RBAC on cotrainjobs.cotrain.dev" in line


@pytest.mark.parametrize("follow", [[], ["-f"]], ids=["read", "follow"])
def test_logs_read_and_follow_a_pod_that_has_no_log_yet(
    cluster: ControlPlane, kube: Kube, namespace: str, one_job: str, follow: list[str]
) -> None:
    # A trainer pod not yet on a node: the API server answers its log with nothing (and a
    # follow ends). Both requests are made as they are on a node: the follow's without a read
    # timeout, which the client must accept.
    labels = {LABEL_JOB: one_job, LABEL_GROUP: "gpu", LABEL_ATTEMPT: "0"}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{one_job}-gpu-0", "labels": labels},
        "spec": {
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 1000,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": TRAINER_CONTAINER,
                    "image": "cotrain.local/none:0",
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }
    kube.core.create_namespaced_pod(namespace, pod)
    ran = run_cli(cluster.kubeconfig, "logs", one_job, *follow, "-n", namespace)
    assert (ran.returncode, ran.stdout, ran.stderr) == (0, "", "")
