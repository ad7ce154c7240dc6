"""The Tiltfile, run by a real Starlark interpreter (starlark-rust, via starlark-pyo3).

Tilt itself is not here, so its builtins are stand-ins with Tilt's signatures (a misspelt
keyword fails the call) that record what the Tiltfile asks for; `kustomize` really renders the
overlay with kubectl. The test then checks what Tilt would do: which images it builds from
what, what it applies, and what it watches.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import starlark  # starlark-pyo3 (starlark-rust), a dev dependency
import yaml

from tests.deploy.conftest import ROOT, copied_sources, dockerfile_stages, find, load_documents

TRIGGER_MODE_AUTO, TRIGGER_MODE_MANUAL = 1, 2


@dataclass
class Tilt:
    """What the Tiltfile asked Tilt to do."""

    builds: dict[str, dict[str, Any]] = field(default_factory=dict)
    restart: dict[str, dict[str, Any]] = field(default_factory=dict)
    local_resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    applied: list[Any] = field(default_factory=list)
    watched: list[str] = field(default_factory=list)
    kinds: dict[str, dict[str, Any]] = field(default_factory=dict)
    image_json_paths: list[dict[str, Any]] = field(default_factory=list)
    loads: list[str] = field(default_factory=list)


def builtins(tilt: Tilt, kubectl: Path) -> dict[str, Callable[..., Any]]:
    """Tilt's builtins that the Tiltfile may use, as recording stand-ins."""

    def version_settings(check_updates: bool = True, constraint: str = "") -> None:
        assert constraint

    def docker_build(
        ref: str,
        context: str,
        build_args: dict[str, str] | None = None,
        dockerfile: str = "Dockerfile",
        dockerfile_contents: str = "",
        live_update: list[Any] | None = None,
        match_in_env_vars: bool = False,
        ignore: list[str] | None = None,
        only: list[str] | None = None,
        entrypoint: list[str] | str | None = None,
        target: str = "",
        ssh: str = "",
        network: str = "",
        secret: str = "",
        extra_tag: str = "",
        container_args: list[str] | None = None,
        cache_from: list[str] | None = None,
        pull: bool = False,
        platform: str = "",
        extra_hosts: list[str] | None = None,
    ) -> None:
        assert ref not in tilt.builds, f"{ref} built twice"
        tilt.builds[ref] = {
            "context": context,
            "dockerfile": dockerfile,
            "target": target,
            "only": only or [],
            "live_update": live_update or [],
            "entrypoint": entrypoint,
        }

    def sync(local_path: str, remote_path: str) -> dict[str, str]:
        return {"step": "sync", "local": local_path, "remote": remote_path}

    def local_resource(
        name: str,
        cmd: str | list[str] = "",
        deps: list[str] | None = None,
        trigger_mode: int = TRIGGER_MODE_AUTO,
        resource_deps: list[str] | None = None,
        ignore: list[str] | None = None,
        auto_init: bool = True,
        serve_cmd: str = "",
        cmd_bat: str = "",
        serve_cmd_bat: str = "",
        allow_parallel: bool = False,
        links: list[Any] | None = None,
        tags: list[str] | None = None,
        env: dict[str, str] | None = None,
        serve_env: dict[str, str] | None = None,
        readiness_probe: Any = None,
        dir: str = "",
        serve_dir: str = "",
        labels: list[str] | None = None,
    ) -> None:
        tilt.local_resources[name] = {"cmd": cmd, "deps": deps or [], "auto_init": auto_init}

    def k8s_image_json_path(
        paths: str | list[str],
        api_version: str = "",
        kind: str = "",
        name: str = "",
        namespace: str = "",
    ) -> None:
        tilt.image_json_paths.append({"paths": paths, "kind": kind, "name": name})

    def kustomize(
        path: str, kustomize_bin: str | None = None, flags: list[str] | None = None
    ) -> str:
        result = subprocess.run(
            [str(kubectl), "kustomize", path], cwd=ROOT, capture_output=True, text=True, check=True
        )
        return result.stdout

    def decode_yaml_stream(text: str) -> list[dict[str, Any]]:
        return load_documents(text)

    def encode_yaml_stream(objects: list[dict[str, Any]]) -> str:
        return yaml.safe_dump_all(objects)

    def k8s_yaml(yaml_text: str | list[str], allow_duplicates: bool = False) -> None:
        tilt.applied.append(yaml_text)

    def watch_file(file_path: str) -> None:
        tilt.watched.append(file_path)

    def port_forward(
        local_port: int,
        container_port: int | None = None,
        name: str | None = None,
        link_path: str | None = None,
        host: str | None = None,
    ) -> dict[str, Any]:
        return {"local": local_port, "container": container_port, "name": name}

    def k8s_resource(
        workload: str = "",
        new_name: str = "",
        port_forwards: list[Any] | None = None,
        extra_pod_selectors: list[Any] | None = None,
        trigger_mode: int = TRIGGER_MODE_AUTO,
        resource_deps: list[str] | None = None,
        objects: list[str] | None = None,
        auto_init: bool = True,
        pod_readiness: str = "",
        links: list[Any] | None = None,
        labels: list[str] | None = None,
        discovery_strategy: str = "",
    ) -> None:
        name = new_name or workload
        assert name not in tilt.resources, f"resource {name} configured twice"
        tilt.resources[name] = {
            "workload": workload,
            "objects": objects or [],
            "resource_deps": resource_deps or [],
            "trigger_mode": trigger_mode,
            "auto_init": auto_init,
            "port_forwards": port_forwards or [],
        }

    def k8s_kind(
        kind: str,
        api_version: str | None = None,
        image_json_path: Any = None,
        image_object: Any = None,
        pod_readiness: str = "",
    ) -> None:
        tilt.kinds[kind] = {"api_version": api_version}

    def listdir(directory: str, recursive: bool = False) -> list[str]:
        return sorted(str(p) for p in (ROOT / directory).iterdir())

    def read_yaml(path: str, default: Any = None) -> Any:
        return yaml.safe_load(Path(path).read_text())

    return {name: value for name, value in locals().items() if callable(value)}


def restart_process(tilt: Tilt, docker_build: Callable[..., None]) -> Callable[..., None]:
    """ext://restart_process's docker_build_with_restart, with its documented signature."""

    def docker_build_with_restart(
        ref: str,
        context: str,
        entrypoint: list[str] | str,
        live_update: list[Any],
        base_suffix: str = "-base",
        restart_file: str = "/.restart-proc",
        **kwargs: Any,
    ) -> None:
        assert live_update, "the extension needs at least one live_update step"
        docker_build(ref, context, live_update=live_update, entrypoint=entrypoint, **kwargs)
        tilt.restart[ref] = {"restart_file": restart_file, "entrypoint": entrypoint}

    return docker_build_with_restart


@pytest.fixture(scope="module")
def tilt(control_plane_bin_dir: Path) -> Tilt:
    recorded = Tilt()
    stand_ins = builtins(recorded, control_plane_bin_dir / "kubectl")
    module = starlark.Module()
    for name, function in stand_ins.items():
        module.add_callable(name, function)
    module["TRIGGER_MODE_AUTO"] = TRIGGER_MODE_AUTO
    module["TRIGGER_MODE_MANUAL"] = TRIGGER_MODE_MANUAL

    extension = starlark.Module()
    extension.add_callable(
        "docker_build_with_restart", restart_process(recorded, stand_ins["docker_build"])
    )
    frozen_extension = extension.freeze()

    def load(name: str) -> Any:
        recorded.loads.append(name)
        assert name == "ext://restart_process", f"unexpected load({name!r})"
        return frozen_extension

    # Tilt's dialect: go.starlark.net with top-level control flow and global reassignment.
    dialect = starlark.Dialect.extended()
    source = (ROOT / "Tiltfile").read_text()
    ast = starlark.parse("Tiltfile", source, dialect)
    starlark.eval(
        module,
        ast,
        starlark.Globals.extended_by([starlark.LibraryExtension.StructType]),
        starlark.FileLoader(load),
    )
    return recorded


def test_builds_both_images_from_the_repository(tilt: Tilt) -> None:
    assert set(tilt.builds) == {"ghcr.io/cotrain/operator", "ghcr.io/cotrain/trainer"}
    operator = tilt.builds["ghcr.io/cotrain/operator"]
    trainer = tilt.builds["ghcr.io/cotrain/trainer"]
    assert (operator["context"], operator["dockerfile"]) == (".", "operator/Dockerfile")
    assert (trainer["context"], trainer["dockerfile"]) == (".", "trainer_image/Dockerfile")
    assert operator["target"] == "dev"
    assert "dev" in dockerfile_stages(ROOT / "operator/Dockerfile")
    for build in (operator, trainer):
        for path in build["only"]:
            assert (ROOT / path).exists(), path


@pytest.mark.parametrize("image", ["operator", "trainer"])
def test_each_dockerfile_copies_only_what_tilt_sends(tilt: Tilt, image: str) -> None:
    build = tilt.builds[f"ghcr.io/cotrain/{image}"]
    copies = copied_sources(ROOT / build["dockerfile"])
    assert "pyproject.toml" in copies
    for source in copies:
        assert any(source.startswith(prefix.rstrip("/")) for prefix in build["only"]), source


def test_applies_the_dev_overlay_writable_only_for_live_update(
    tilt: Tilt, kustomize: Callable[[str], list[dict[str, Any]]]
) -> None:
    applied = [
        load_documents(text) for text in tilt.applied if isinstance(text, str) and "\n" in text
    ]
    (overlay,) = [docs for docs in applied if any(d["kind"] == "Deployment" for d in docs)]
    expected = kustomize("deploy/overlays/dev")
    operator = find(overlay, "Deployment", "cotrain-operator")
    container = operator["spec"]["template"]["spec"]["containers"][0]
    # live_update writes into the container; that one field is all Tilt changes.
    assert container["securityContext"]["readOnlyRootFilesystem"] is False
    container["securityContext"]["readOnlyRootFilesystem"] = True
    assert overlay == expected


def test_operator_code_is_synced_into_the_installed_package_and_restarted(tilt: Tilt) -> None:
    build = tilt.builds["ghcr.io/cotrain/operator"]
    restart = tilt.restart["ghcr.io/cotrain/operator"]
    stages = dockerfile_stages(ROOT / "operator/Dockerfile")
    python = re.search(r"python:(\d+\.\d+)", "\n".join(stages[""])).group(1)  # type: ignore[union-attr]
    (step,) = build["live_update"]
    assert step == {
        "step": "sync",
        "local": "operator/cotrain_operator",
        "remote": f"/opt/venv/lib/python{python}/site-packages/cotrain_operator",
    }
    # The restart re-runs the image's own entrypoint, and its trigger file is one the operator's
    # user may write (the dev stage hands it /opt/venv) on no volume.
    entrypoint = next(line for line in stages["base"] if line.startswith("ENTRYPOINT"))
    assert restart["entrypoint"] == yaml.safe_load(entrypoint.split(None, 1)[1])
    assert restart["restart_file"].startswith("/opt/venv/")
    assert any("--chown=65532:65532 /opt/venv" in line for line in stages["dev"])
    assert tilt.loads == ["ext://restart_process"]


def test_the_crd_is_regenerated_when_the_api_changes_and_applied_again(tilt: Tilt) -> None:
    crd = tilt.local_resources["crd"]
    assert "crd > crds/cotrain.dev_cotrainjobs.yaml" in crd["cmd"]
    assert crd["deps"] == ["operator/cotrain_operator/api"]
    assert "crds/cotrain.dev_cotrainjobs.yaml" in tilt.watched
    setup = tilt.resources["cotrain-setup"]
    assert "cotrainjobs.cotrain.dev:customresourcedefinition" in setup["objects"]
    assert setup["resource_deps"] == ["crd"]
    assert tilt.resources["cotrain-operator"]["resource_deps"] == ["cotrain-setup"]


def test_the_crd_command_writes_the_committed_crd(tilt: Tilt, tmp_path: Path) -> None:
    """Tilt's "crd" command, run for real (in a scratch directory, with this venv's CLI)."""
    (tmp_path / "crds").mkdir()
    cli = Path(sys.executable).with_name("cotrain")
    subprocess.run(
        ["sh", "-c", tilt.local_resources["crd"]["cmd"]],
        cwd=tmp_path,
        env={**os.environ, "COTRAIN_CLI": str(cli)},
        check=True,
        timeout=120,
    )
    written = (tmp_path / "crds/cotrain.dev_cotrainjobs.yaml").read_text()
    assert written == (ROOT / "crds/cotrain.dev_cotrainjobs.yaml").read_text()
    assert sorted(p.name for p in (tmp_path / "crds").iterdir()) == ["cotrain.dev_cotrainjobs.yaml"]


def test_the_trainer_image_tilt_builds_reaches_the_operators_env(
    tilt: Tilt, kustomize: Callable[[str], list[dict[str, Any]]]
) -> None:
    (located,) = tilt.image_json_paths
    assert (located["kind"], located["name"]) == ("Deployment", "cotrain-operator")
    match = re.fullmatch(
        r'\{\.spec\.template\.spec\.containers\[\*\]\.env\[\?\(@\.name=="(\w+)"\)\]\.value\}',
        located["paths"],
    )
    assert match, located["paths"]
    operator = find(kustomize("deploy/overlays/dev"), "Deployment", "cotrain-operator")
    env = {
        e["name"]: e["value"] for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env[match.group(1)].startswith("ghcr.io/cotrain/trainer:")


def test_every_example_is_a_manual_resource(tilt: Tilt) -> None:
    assert tilt.kinds == {"CoTrainJob": {"api_version": "cotrain.dev/v1alpha1"}}
    examples = sorted((ROOT / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        assert str(path) in tilt.applied
        name = yaml.safe_load(path.read_text())["metadata"]["name"]
        resource = tilt.resources[name]
        assert resource["trigger_mode"] == TRIGGER_MODE_MANUAL
        assert resource["auto_init"] is False
        assert resource["resource_deps"] == ["cotrain-operator"]
