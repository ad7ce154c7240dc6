"""Deploy fixtures: the repository's manifests, and each kustomization rendered by real kubectl."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("dev", "production")
# Every kustomization a platform engineer applies with `kubectl apply -k`.
KUSTOMIZATIONS = ("deploy/base", "deploy/overlays/dev", "deploy/overlays/production")
KUSTOMIZATIONS += ("deploy/device-plugin", "crds")


def load_documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def find(documents: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one document of `kind` (and `name`); fails when there is not exactly one."""
    found = [
        d for d in documents if d["kind"] == kind and name in (None, d["metadata"].get("name"))
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def dockerfile_stages(path: Path) -> dict[str, list[str]]:
    """Instructions of each named stage of a Dockerfile (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    stages: dict[str, list[str]] = {"": []}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if match := re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.IGNORECASE):
            current = match.group(1) or f"stage{len(stages)}"
            stages[current] = []
        stages[current].append(line)
    return stages


def copied_sources(path: Path) -> list[str]:
    """The build-context paths a Dockerfile COPYs (not those copied from other stages)."""
    sources = []
    for lines in dockerfile_stages(path).values():
        for line in lines:
            words = line.split()[1:]
            if line.startswith("COPY") and not any(w.startswith("--from") for w in words):
                sources += [w for w in words[:-1] if not w.startswith("--")]
    return sources


@pytest.fixture(scope="session")
def kubectl(control_plane_bin_dir: Path) -> Path:
    """The real kubectl built with the test control plane (its kustomize is kubectl's own)."""
    return control_plane_bin_dir / "kubectl"


@pytest.fixture(scope="session")
def kustomize(kubectl: Path) -> Callable[[str | Path], list[dict[str, Any]]]:
    """Render a kustomization with `kubectl kustomize`, once per path."""
    cache: dict[str, list[dict[str, Any]]] = {}

    def render(path: str | Path) -> list[dict[str, Any]]:
        key = str(path)
        if key not in cache:
            result = subprocess.run(
                [str(kubectl), "kustomize", key],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 0, f"kubectl kustomize {key} failed:\n{result.stderr}"
            cache[key] = load_documents(result.stdout)
        return cache[key]

    return render


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return f"deploy/overlays/{request.param}"
