"""The GPU proof script (bench/gpu_check.py) on a machine without a GPU: it says so and exits 0."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pynvml
import pytest

from tests.trainer.builders import PYTHON

ROOT = Path(__file__).resolve().parents[2]


def test_without_a_gpu_the_proof_script_says_so_and_exits_0(tmp_path: Path) -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver: the script would run the proof")
    result = subprocess.run(
        [PYTHON, str(ROOT / "bench" / "gpu_check.py"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("no GPU: NVML: "), result.stdout
    assert "nothing to prove here" in lines[0]
    assert not (tmp_path / "out").exists()  # nothing run, nothing written
