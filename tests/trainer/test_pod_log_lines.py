"""What a trainer pod's log says about each member (`kubectl logs`): a line per phase change and
per tenth of the steps, never one per step."""

from __future__ import annotations

import io

import pytest

from cotrain_operator.api.models import MemberPhase, MemberStatus
from cotrain_trainer.console import PodLogLines

RUNNING = MemberPhase.RUNNING


def _status(step: int | None, total: int | None, phase: MemberPhase = RUNNING) -> MemberStatus:
    return MemberStatus(
        phase=phase, step=step, total_steps=total, loss=0.5, samples_per_second=1234.0
    )


def test_three_hundred_steps_make_ten_progress_lines_and_one_per_phase() -> None:
    out = io.StringIO()
    lines = PodLogLines(out)
    lines.member_changed("torch-mlp", MemberStatus(phase=MemberPhase.PENDING))
    for step in range(0, 301):
        lines.member_changed("torch-mlp", _status(step, 300))
    lines.member_changed("torch-mlp", _status(300, 300, MemberPhase.SUCCEEDED), final=True)
    logged = out.getvalue().splitlines()
    assert all(line.startswith("[torch-mlp] ") for line in logged)
    steps = [line for line in logged if " step " in line]
    assert [line.split()[2] for line in steps] == [f"{30 * k}/300" for k in range(1, 11)]
    assert steps[0] == "[torch-mlp] step 30/300 loss 0.5000 samples/s 1,234"
    phases = [line.split(" ", 1)[1] for line in logged if " step " not in line]
    assert phases == ["Pending", "Running", "Succeeded"]


@pytest.mark.parametrize(
    ("total", "seen", "expected"),
    [
        # Progress arrives in jumps (the supervisor polls): a line when a jump crosses into a
        # new tenth, one line however many tenths it skips, none inside the first tenth.
        (300, [1, 250, 300], ["250/300", "300/300"]),
        # Fewer steps than tenths: every step crosses one.
        (3, [1, 2, 3], ["1/3", "2/3", "3/3"]),
        # A restart starts again at step 0: no new lines until the member passes its old mark.
        (300, [100, 0, 50, 130], ["100/300", "130/300"]),
    ],
)
def test_progress_lines_follow_tenths_crossed(
    total: int, seen: list[int], expected: list[str]
) -> None:
    out = io.StringIO()
    lines = PodLogLines(out)
    for step in seen:
        lines.member_changed("m", _status(step, total))
    steps = [line.split()[2] for line in out.getvalue().splitlines() if " step " in line]
    assert steps == expected


def test_a_failure_names_its_reason_and_members_keep_their_own_lines() -> None:
    out = io.StringIO()
    lines = PodLogLines(out)
    lines.member_changed("a", _status(None, None))
    lines.member_changed("b", _status(None, None))
    failed = MemberStatus(phase=MemberPhase.FAILED, reason="GPUOutOfMemory", message="over 6Gi")
    lines.member_changed("b", failed, final=True)
    assert out.getvalue().splitlines() == [
        "[a] Running",
        "[b] Running",
        "[b] Failed (GPUOutOfMemory: over 6Gi)",
    ]
