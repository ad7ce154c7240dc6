"""operator/Dockerfile, read without Docker: what it installs, who it runs as, what it starts.

No image is built here (CI has no Docker engine); these checks keep the Dockerfile, pyproject.toml
and the Deployment in agreement.
"""

from __future__ import annotations

import json
import re
import tomllib

from tests.deploy.conftest import (
    DEPLOY,
    ROOT,
    copied_sources,
    dockerfile_stages,
    find,
    load_documents,
)

DOCKERFILE = ROOT / "operator/Dockerfile"
ML_FRAMEWORKS = ("torch", "tensorflow", "keras", "jax")


def instruction(stage: list[str], keyword: str) -> list[str]:
    return [line.split(None, 1)[1] for line in stage if line.split(None, 1)[0] == keyword]


def test_the_image_is_python_slim_and_its_default_stage_is_the_runtime() -> None:
    stages = dockerfile_stages(DOCKERFILE)
    (base,) = [line for line in stages[""] if line.startswith("ARG PYTHON_IMAGE=")]
    assert base.startswith("ARG PYTHON_IMAGE=python:3.11-slim")
    assert list(stages)[-1] == "runtime"
    for name in ("builder", "base"):
        assert stages[name][0].startswith("FROM ${PYTHON_IMAGE} AS"), name


def test_it_installs_the_operator_extra_and_no_ml_framework() -> None:
    stages = dockerfile_stages(DOCKERFILE)
    (install,) = [run for run in instruction(stages["builder"], "RUN") if "pip install" in run]
    assert "'.[operator]'" in install
    assert "trainer]" not in install
    operator_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["operator"]
    assert not [d for d in operator_extra if d.lower().startswith(ML_FRAMEWORKS)]
    # The build itself fails if one sneaks in through a dependency.
    assert "find_spec(m) for m in ('torch', 'tensorflow', 'kubernetes')" in install


def test_every_copied_path_exists() -> None:
    sources = copied_sources(DOCKERFILE)
    assert {".ci/constraints.txt", "pyproject.toml", "README.md", "operator/"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), source


def test_it_runs_as_the_non_root_user_the_deployment_expects() -> None:
    stages = dockerfile_stages(DOCKERFILE)
    for stage in ("dev", "runtime"):
        (user,) = instruction(stages[stage], "USER")
        uid, gid = (int(part) for part in user.split(":"))
        assert uid != 0
        assert gid != 0
    deployment = find(
        load_documents((DEPLOY / "base/deployment.yaml").read_text()),
        "Deployment",
        "cotrain-operator",
    )
    security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"]) == (uid, gid)
    # Only the dev stage lets that user write the installed package (for Tilt's live_update).
    assert not any("--chown" in line for line in stages["runtime"])


def test_its_entrypoint_is_the_deployments_command() -> None:
    stages = dockerfile_stages(DOCKERFILE)
    (entrypoint,) = instruction(stages["base"], "ENTRYPOINT")
    deployment = find(
        load_documents((DEPLOY / "base/deployment.yaml").read_text()),
        "Deployment",
        "cotrain-operator",
    )
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert json.loads(entrypoint) == container["command"] == ["python", "-m", "cotrain_operator"]
    exposed = " ".join(instruction(stages["base"], "EXPOSE"))
    assert {int(p) for p in re.findall(r"\d+", exposed)} == {
        p["containerPort"] for p in container["ports"]
    }
