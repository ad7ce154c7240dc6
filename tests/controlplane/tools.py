"""The Go tools that setup builds beside the control plane (kstatus, helm), found for a test.

Each lives in a small module of ours (`<name>-module/`, built by its build.sh through
go-binary.sh) and is cached by its inputs; a test only asks where the build is and fails with
the command to run when there is none: nothing is built inside a test's time limit.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


class ToolNotBuiltError(RuntimeError):
    """The tool's build for the current inputs is missing: run `bash .ci/setup --tests`."""


def built_tool(name: str) -> Path:
    """The path of tests/controlplane/<name>-module's binary for the current inputs."""
    found = subprocess.run(
        ["bash", str(HERE / f"{name}-module" / "build.sh"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if found.returncode != 0:
        missing = f"{name} is not built: bash .ci/setup --tests"
        raise ToolNotBuiltError(found.stderr.strip() or missing)
    return Path(found.stdout.strip().splitlines()[-1])
