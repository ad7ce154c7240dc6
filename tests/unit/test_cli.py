"""The `cotrain` command as a user runs it: the installed entry point, in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.fixtures.jobs import a_job

ROOT = Path(__file__).resolve().parents[2]
COTRAIN = str(Path(sys.executable).with_name("cotrain"))


def cotrain(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [COTRAIN, *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def test_crd_prints_the_committed_crd() -> None:
    result = cotrain("crd")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (ROOT / "crds" / "cotrain.dev_cotrainjobs.yaml").read_text()


def test_validate_accepts_every_example() -> None:
    examples = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "examples").glob("*.yaml"))
    result = cotrain("validate", *examples)
    assert result.returncode == 0, result.stdout
    assert result.stdout.count("is valid") == len(examples)


def test_validate_names_the_field_and_the_fix(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(a_job("bad").sharing(migProfile="1g.10gb").build()))
    result = cotrain("validate", str(bad))
    assert result.returncode == 1
    assert "CoTrainJob bad is invalid" in result.stdout
    assert "spec.sharing.migProfile: migProfile is only used with mode MIG" in result.stdout
    assert "set spec.sharing.mode to MIG" in result.stdout


def test_validate_reads_stdin_and_multi_document_files() -> None:
    good = yaml.safe_dump(a_job("one").build())
    bad = yaml.safe_dump(a_job("two").member(framework="Jax").build())
    other = yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}})
    result = cotrain("validate", "-", stdin="---\n".join([good, other, bad]))
    assert result.returncode == 1
    assert "CoTrainJob one is valid" in result.stdout
    assert "spec.members[0].framework: must be one of 'PyTorch' or 'TensorFlow'" in result.stdout
    assert "Namespace" not in result.stdout


def test_validate_reports_unreadable_input(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    result = cotrain("validate", str(broken), str(tmp_path / "missing.yaml"))
    assert result.returncode == 1
    assert result.stdout.count("cannot read") == 2


def test_explain_describes_a_field_and_refuses_unknown_ones() -> None:
    result = cotrain("explain", "cotrainjob.spec.sharing.mode")
    assert result.returncode == 0
    assert "One of: Auto, Exclusive, TimeSlicing, MPS, MIG" in result.stdout
    result = cotrain("explain", "spec.members")
    assert "framework  <string> -required-" in result.stdout
    assert "computePercent" not in result.stdout  # a field of gpu, one level down
    missing = cotrain("explain", "spec.nope")
    assert missing.returncode == 1
    assert "does not exist" in missing.stdout


def test_no_subcommand_is_a_usage_error() -> None:
    assert cotrain().returncode == 2
