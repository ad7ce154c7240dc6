"""What `cotrain submit/status/logs` make of the API server's objects (cluster_job.py, pure) and
which log lines are a member's (console.member_lines): tables of cases, the pods from the
operator's own decisions, and a property of the member filter."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cotrain_operator.api.models import JobPhase, MemberPhase
from cotrain_trainer.cli import build_parser
from cotrain_trainer.cluster_job import (
    age,
    current_pods,
    exit_code,
    failure_lines,
    format_columns,
    job_members,
    job_row,
    member_pods,
    member_statuses,
    phase_line,
    pod_members,
)
from cotrain_trainer.console import line_member, log_source, member_lines, pod_log_line
from tests.fixtures.cluster_state import ClusterState
from tests.fixtures.jobs import a_job
from tests.fixtures.nodes import gpu_node

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def stored(status: dict[str, Any] | None = None) -> dict[str, Any]:
    """A job as the API server returns it."""
    job = a_job("demo").build()
    job["metadata"] |= {"namespace": "ns", "creationTimestamp": "2026-11-22T11:58:55Z"}
    if status is not None:
        job["status"] = status
    return job


# -------------------------------------------------------------------------------------------
# log lines

LINES = [
    ("[a] x", "a", True),
    ("[a/1] y", "a", True),
    ("[a/12] y", "a", True),
    ("[a] ", "a", True),  # an empty line of the member's own output
    ("[a]", "a", True),  # the same, once the log's trailing space is gone
    ("[ab] z", "a", False),
    ("[a-b] z", "a", False),
    ("[b/0] [a] z", "a", False),  # b printed something that looks like a's prefix
    ("[a]x", "a", False),  # no space: not our prefix
    ("[a/x] y", "a", False),
    ("2026-11-22 12:00:00 INFO cotrain_trainer.supervisor: started a", "a", False),
    ("cotrain supervise: job demo succeeded (exit 0)", "a", False),
    ("", "a", False),
    (" [a] x", "a", False),
]


@pytest.mark.parametrize(("line", "member", "kept"), LINES)
def test_a_members_lines_are_those_with_its_prefix_of_any_rank(
    line: str, member: str, kept: bool
) -> None:
    assert list(member_lines([line], member)) == ([line] if kept else [])


def test_the_writer_and_the_reader_of_the_prefix_agree() -> None:
    assert line_member(pod_log_line(log_source("torch-mlp", 3), "loss 0.2").rstrip("\n")) == (
        "torch-mlp"
    )
    assert line_member(pod_log_line(log_source("tf"), "Running").rstrip("\n")) == "tf"


member_names = st.from_regex(r"[a-z]([-a-z0-9]{0,13}[a-z0-9])?", fullmatch=True)
ranks = st.none() | st.integers(min_value=0, max_value=63)
texts = st.text(st.characters(blacklist_categories=["Cc", "Cs"]), max_size=40)


@given(
    st.lists(st.tuples(member_names, ranks, texts), max_size=20),
    st.lists(texts, max_size=5),
    member_names,
)
def test_the_filter_never_returns_another_members_line(
    written: list[tuple[str, int | None, str]], unprefixed: list[str], member: str
) -> None:
    lines = [
        pod_log_line(log_source(name, rank), text).rstrip("\n") for name, rank, text in written
    ]
    lines += [text for text in unprefixed if line_member(text) is None]
    kept = list(member_lines(lines, member))
    expected = [line for line, (name, _, _) in zip(lines, written, strict=False) if name == member]
    assert kept == expected


# -------------------------------------------------------------------------------------------
# statuses, verdicts, rows


def test_member_statuses_keep_every_field_that_validates_and_drop_the_rest() -> None:
    job = stored(
        {
            "members": {
                "torch": {"phase": "Running", "step": 5, "totalSteps": 20, "loss": 0.5},
                "tf": {"phase": "Exploded", "step": -3, "totalSteps": 20, "reason": "x" * 100},
                "odd": "not a mapping",
            }
        }
    )
    statuses = member_statuses(job)
    assert statuses["torch"].phase == MemberPhase.RUNNING
    assert (statuses["torch"].step, statuses["torch"].total_steps) == (5, 20)
    assert statuses["tf"].phase is None
    assert statuses["tf"].step is None
    assert statuses["tf"].total_steps == 20
    assert statuses["odd"].phase is None
    assert member_statuses(stored()) == {}


def test_members_come_from_the_spec_and_an_unreadable_one_is_a_clear_error() -> None:
    assert [m.name for m in job_members(stored())] == ["torch", "tf"]
    broken = stored()
    broken["spec"]["members"][1]["framework"] = "JAX"
    with pytest.raises(ValueError, match=r"spec.members\[1\].framework"):
        job_members(broken)


@pytest.mark.parametrize(
    ("phase", "code"),
    [
        (JobPhase.SUCCEEDED, 0),
        (JobPhase.FAILED, 1),
        (JobPhase.RUNNING, None),
        (JobPhase.PENDING, None),
        (JobPhase.SUSPENDED, None),
        (None, None),
    ],
)
def test_only_a_finished_job_has_an_exit_code(phase: JobPhase | None, code: int | None) -> None:
    assert exit_code(phase) == code


def cond(kind: str, status: str, reason: str, message: str) -> dict[str, str]:
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-11-22T12:00:00Z",
    }


@pytest.mark.parametrize(
    ("status", "line"),
    [
        (None, "cotrainjob demo: Unknown (no status yet: is the operator running?)"),
        (
            {"phase": "Failed", "conditions": [cond("Failed", "True", "Boom", "it broke")]},
            "cotrainjob demo: Failed (Boom: it broke)",
        ),
        (
            {
                "phase": "Pending",
                "conditions": [
                    cond("Running", "False", "NotRunning", "-"),
                    cond("Reconciling", "True", "Unschedulable", "no node has 900Gi"),
                ],
            },
            "cotrainjob demo: Pending (Unschedulable: no node has 900Gi)",
        ),
        ({"phase": "Succeeded"}, "cotrainjob demo: Succeeded"),
    ],
)
def test_the_phase_line_names_the_reason(status: dict[str, Any] | None, line: str) -> None:
    assert phase_line(stored(status)) == line


def test_a_failed_job_says_why_and_which_members_failed() -> None:
    job = stored(
        {
            "phase": "Failed",
            "conditions": [cond("Failed", "True", "MembersFailed", "tf failed")],
            "members": {
                "torch": {"phase": "Succeeded", "reason": "Completed"},
                "tf": {"phase": "Failed", "reason": "GPUOutOfMemory", "message": "CUDA OOM"},
            },
        }
    )
    assert failure_lines(job, job_members(job)) == [
        "failed: MembersFailed: tf failed",
        "  tf: GPUOutOfMemory: CUDA OOM",
    ]


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0, "0s"),
        (65, "65s"),
        (125, "2m5s"),
        (600, "10m"),
        (3 * 3600 + 60, "3h1m"),
        (8 * 3600, "8h"),
        (3 * 86400 + 3600, "3d1h"),
        (30 * 86400, "30d"),
        (-1, "0s"),
        (-5, "<invalid>"),
    ],
)
def test_ages_read_as_kubectl_prints_them(seconds: int, shown: str) -> None:
    created = (NOW - timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert age(created, NOW) == shown


def test_job_rows_are_kubectls_columns() -> None:
    running = stored({"phase": "Running", "readyMembers": "2/2", "progress": "45%"})
    new = stored()
    new["metadata"]["name"] = "just-created"
    rows = [("NAME", "PHASE", "READY", "PROGRESS", "AGE"), job_row(running, NOW), job_row(new, NOW)]
    assert rows[1] == ("demo", "Running", "2/2", "45%", "65s")
    assert rows[2] == ("just-created", "", "", "", "65s")
    assert format_columns(rows).splitlines() == [
        "NAME           PHASE     READY   PROGRESS   AGE",
        "demo           Running   2/2     45%        65s",
        "just-created                                65s",
    ]


# -------------------------------------------------------------------------------------------
# pods: the operator's own


def pods_of(builder: Any) -> list[dict[str, Any]]:
    node = gpu_node("n", sharing="time-slicing", replicas=8, renamed=True, count=4)
    cluster = ClusterState(builder.build(), node)
    cluster.settle()
    return [copy.deepcopy(pod) for pod in cluster.pods.values()]


def names(pods: list[Any]) -> list[str]:
    return [pod["metadata"]["name"] for pod in pods]


def test_a_same_gpu_pod_holds_every_member() -> None:
    pods = pods_of(a_job("job"))
    assert [pod_members(p) for p in pods] == [["torch", "tf"]]
    assert names(member_pods(pods, "tf")) == names(member_pods(pods, None)) == ["job-gpu-0"]


def test_a_pod_per_member_job_has_one_pod_per_member_and_replicas_one_each() -> None:
    pods = pods_of(a_job("job").placement(strategy="PodPerMember").member(1, replicas=2))
    assert names(member_pods(pods, "torch")) == ["job-torch-0"]
    assert names(member_pods(pods, "tf")) == ["job-tf-0-0", "job-tf-1-0"]
    assert len(member_pods(pods, None)) == 3


def test_only_the_latest_attempt_of_each_group_is_read() -> None:
    (pod,) = pods_of(a_job("job"))
    retried = copy.deepcopy(pod)
    retried["metadata"]["name"] = "job-gpu-1"
    retried["metadata"]["labels"]["cotrain.dev/attempt"] = "1"
    assert names(current_pods([retried, pod])) == ["job-gpu-1"]


def test_a_pod_whose_members_cannot_be_read_is_kept() -> None:
    (pod,) = pods_of(a_job("job"))
    pod["spec"]["containers"][0]["env"] = []
    assert pod_members(pod) is None
    assert names(member_pods([pod], "tf")) == ["job-gpu-0"]


# -------------------------------------------------------------------------------------------
# the command line


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["submit", "f.yaml"], {"follow": True, "namespace": None}),
        (["submit", "f.yaml", "--no-follow", "-n", "x"], {"follow": False, "namespace": "x"}),
        (["status"], {"job": None, "watch": False}),
        (["status", "j", "-w", "--context", "c"], {"job": "j", "watch": True, "context": "c"}),
        (["logs", "j", "m", "-f", "--tail", "5"], {"member": "m", "follow": True, "tail": 5}),
        (["logs", "j", "--kubeconfig", "k"], {"member": None, "tail": None, "kubeconfig": "k"}),
    ],
)
def test_the_cluster_commands_parse_as_kubectls_flags_read(
    argv: list[str], expected: dict[str, Any]
) -> None:
    args = vars(build_parser().parse_args(argv))
    assert {key: args[key] for key in expected} == expected
