"""`cotrain submit` and `cotrain logs` against the real node, the real operator and the trainer
image: what a data scientist types to run and follow a job on a cluster. On a terminal the
submit draws live progress bars and ends with the summary table, exit 0; through a pipe it
prints plain lines; a job that fails exits 1 with its reason. `cotrain logs JOB MEMBER` shows
that member's lines only, though both members share one pod.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.controlplane.images import LocalImage
from tests.fixtures.cotrain_cli import Piped, Terminal, run_cli, stop_all
from tests.node.conftest import RealNode
from tests.node.running import host_operator

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "mixed-same-gpu.yaml"
TRAINING = 300.0  # a failsafe for a whole job on the node; every wait ends on the CLI's output
MEMBERS = ("torch-mlp", "tf-mlp")


@pytest.fixture(autouse=True)
def _no_cli_left_running() -> Iterator[None]:
    yield
    stop_all()


def _example(tmp_path: Path, name: str, fail: bool = False) -> Path:
    document = yaml.safe_load(EXAMPLE.read_text())
    document["metadata"]["name"] = name
    if fail:
        # A member whose own command exits non-zero, with no retries: the job Fails.
        member = document["spec"]["members"][0]
        for builtin in ("model", "steps", "batchSize", "learningRate"):
            member.pop(builtin)
        member["command"] = ["python", "-c", "import sys; print('no data'); sys.exit(3)"]
        document["spec"]["runPolicy"] = {"backoffLimit": 0}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_submit_on_a_terminal_draws_bars_and_ends_with_the_summary(
    time_slicing_node: RealNode,
    trainer_image: LocalImage,
    restricted_namespace: str,
    tmp_path: Path,
) -> None:
    cp, ns = time_slicing_node.control_plane, restricted_namespace
    with host_operator(time_slicing_node, trainer_image, ns, tmp_path / "operator"):
        terminal = Terminal(
            cp.kubeconfig, "submit", str(EXAMPLE), "-n", ns, timeout=TRAINING
        )  # fmt: skip
        terminal.expect(rb"following cotrainjob")
        terminal.expect(rb"\x1b\[")  # a live display, not lines
        terminal.expect(rb"\xe2\x94\x81")  # the bar's ━
        terminal.expect(rb"300/300")
        code = terminal.finish()
    text = terminal.text()
    assert code == 0, text
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    summary = plain[plain.rindex("framework") :]  # the table's header, after the bars
    for member in MEMBERS:
        assert re.search(rf"{member}\s.*Succeeded.*300/300", summary), summary

    # The same pod ran both members; each one's own lines, by name (-f: the stream the API
    # server follows, which ends with the container that has ended).
    logs = run_cli(cp.kubeconfig, "logs", "mixed-same-gpu", "torch-mlp", "-f", "-n", ns)
    assert logs.returncode == 0, logs.stderr
    lines = logs.stdout.splitlines()
    assert lines, logs.stderr
    assert all(line.startswith("[torch-mlp] ") for line in lines), lines[:20]
    assert any("step 300/300" in line for line in lines), lines[-20:]
    both = run_cli(cp.kubeconfig, "logs", "mixed-same-gpu", "-n", ns)
    assert both.returncode == 0, both.stderr
    prefixes = {line.split(" ", 1)[0] for line in both.stdout.splitlines()}
    assert {"[torch-mlp]", "[tf-mlp]"} <= prefixes, sorted(prefixes)[:20]


def test_submit_through_a_pipe_prints_lines_and_exits_with_the_jobs_outcome(
    time_slicing_node: RealNode,
    trainer_image: LocalImage,
    restricted_namespace: str,
    tmp_path: Path,
) -> None:
    cp, ns = time_slicing_node.control_plane, restricted_namespace
    with host_operator(time_slicing_node, trainer_image, ns, tmp_path / "operator"):
        good = Piped(
            cp.kubeconfig, "submit", str(_example(tmp_path, "piped")), "-n", ns, timeout=TRAINING
        )
        good.expect("created")
        code, output = good.finish()
        assert code == 0, output
        assert "\x1b[" not in output
        for member in MEMBERS:
            assert f"[{member}] Succeeded" in output, output
            assert re.search(rf"{member}\s.*Succeeded.*300/300", output), output

        bad = Piped(
            cp.kubeconfig,
            "submit",
            str(_example(tmp_path, "fails", fail=True)),
            "-n",
            ns,
            timeout=TRAINING,
        )
        code, output = bad.finish()
    assert code == 1, output
    assert "Failed" in output, output
    assert "torch-mlp" in output, output
