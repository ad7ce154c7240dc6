"""The line a trainer pod's log gets at each member's first step: how long its start-up took
and where the time went (Python and CoTrain's imports, its framework's import and caps, the
step). The start-up bench (bench/startup_bench.py) reads it too."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest

from cotrain_trainer.console import first_step_line
from tests.trainer.builders import a_member, a_plan, a_script, supervise


@pytest.mark.parametrize(
    ("times", "expected"),
    [
        # spawned, launched, started, first
        (
            (100.0, 100.5, 103.25, 104.0),
            "first step 4.00 s after its process was started (Python and CoTrain 0.50 s, "
            "framework and caps 2.75 s, first step 0.75 s)",
        ),
        # A member's own command reports no launch: only the whole.
        ((100.0, None, 101.0, 102.5), "first step 2.50 s after its process was started"),
        ((100.0, None, None, 102.5), "first step 2.50 s after its process was started"),
        # Times out of order (a clock stepped): the parts would lie, so only the whole.
        ((100.0, 99.0, 101.0, 102.0), "first step 2.00 s after its process was started"),
        ((100.0, 100.5, 103.0, 102.0), "first step 2.00 s after its process was started"),
    ],
)
def test_the_line_splits_start_up_only_when_the_times_agree(
    times: tuple[float, float | None, float | None, float], expected: str
) -> None:
    assert first_step_line(*times) == expected


PARTS = re.compile(
    r"^\[(?P<member>[\w-]+)\] first step (?P<total>[\d.]+) s after its process was started"
    r" \(Python and CoTrain (?P<python>[\d.]+) s, framework and caps (?P<framework>[\d.]+) s,"
    r" first step (?P<step>[\d.]+) s\)$"
)


def test_a_pod_log_says_each_members_start_up_once(tmp_path: Path) -> None:
    echo = io.StringIO()
    member = a_member("torch", model="MLP", steps=40, batchSize=16)
    script = a_script("script", "print('no progress reported')")
    result = supervise(a_plan(member, script), tmp_path, echo=echo)
    assert result.succeeded, result.members
    lines = [line for line in echo.getvalue().splitlines() if "first step" in line]
    assert len(lines) == 1, lines  # the built-in member's; a script that reports no step has none
    found = PARTS.match(lines[0])
    assert found, lines[0]
    parts = {k: float(v) for k, v in found.groupdict().items() if k != "member"}
    assert found["member"] == "torch"
    assert parts["framework"] > 0  # torch's import is never free
    assert abs(parts["python"] + parts["framework"] + parts["step"] - parts["total"]) < 0.02


def test_a_restarted_member_says_it_again(tmp_path: Path) -> None:
    echo = io.StringIO()
    # Fails after its first step on its first run, succeeds on the second.
    code = (
        "import os, sys\n"
        "from cotrain_trainer import report\n"
        "w = report.writer(); w.started(2); w.step(1, loss=1.0)\n"
        "marker = os.path.join(os.environ['FLAKY_MARKER_DIR'], 'ran')\n"
        "if not os.path.exists(marker):\n"
        "    open(marker, 'w').close(); sys.exit(1)\n"
        "w.step(2, loss=0.5); w.close()\n"
    )
    member = a_member(
        "flaky",
        command=[sys.executable, "-c", code],
        env=[{"name": "FLAKY_MARKER_DIR", "value": str(tmp_path)}],
    )
    result = supervise(a_plan(member, backoff_limit=1), tmp_path / "work", echo=echo)
    assert result.succeeded, result.members
    lines = [line for line in echo.getvalue().splitlines() if "] first step" in line]
    assert len(lines) == 2, echo.getvalue()
