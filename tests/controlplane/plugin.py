"""pytest plugin: a real local Kubernetes control plane (etcd + kube-apiserver
+ kube-controller-manager) per test session.

Load it with ``-p tests.controlplane.plugin`` or from the root conftest.py:
``pytest_plugins = ["tests.controlplane.plugin"]``.

Fixtures (all session-scoped):
  control_plane_bin_dir  built (or cached) binaries; builds on first use
  control_plane          the running ControlPlane (admin kubeconfig/token, kubectl())
  kube_api               kubernetes.client.ApiClient as admin for control_plane
  control_plane_factory  start(**kw) -> an extra, independent ControlPlane
  kueue                  a real Kueue running against control_plane (built by setup)

Environment:
  COTRAIN_CONTROLPLANE_BIN       use binaries from this dir, skip build.sh
  COTRAIN_CACHE                  cache root for build.sh (default ~/.cache/cotrain)
  COTRAIN_ALLOW_NO_CONTROLPLANE=1  skip (instead of fail) the tests that need the control
                                 plane when there is no Go toolchain and no binaries
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.controlplane.cluster import (
    ControlPlane,
    build_control_plane,
    go_available,
    start_control_plane,
)
from tests.controlplane.kueue import Kueue, running_kueue


@contextlib.contextmanager
def _capture_disabled(config: pytest.Config) -> Iterator[None]:
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is None:
        yield
        return
    with capman.global_and_fixture_disabled():
        yield


@pytest.fixture(scope="session")
def control_plane_bin_dir(request: pytest.FixtureRequest) -> Path:
    if not os.environ.get("COTRAIN_CONTROLPLANE_BIN") and not go_available():
        msg = "no Go toolchain to build the test control plane (set COTRAIN_CONTROLPLANE_BIN)"
        # A skipped test must never pass for a run that was meant to test: skipping is opt-in.
        if os.environ.get("COTRAIN_ALLOW_NO_CONTROLPLANE") != "1":
            pytest.fail(msg)
        pytest.skip(msg)
    # Show build.sh's progress: the first build takes many minutes.
    with _capture_disabled(request.config):
        return build_control_plane(log=sys.stderr)


@pytest.fixture(scope="session")
def control_plane(
    control_plane_bin_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ControlPlane]:
    workdir = tmp_path_factory.mktemp("controlplane")
    cp = start_control_plane(workdir, control_plane_bin_dir)
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def kube_api(control_plane: ControlPlane):
    """A kubernetes.client.ApiClient authenticated as the admin (system:masters)."""
    api = control_plane.api_client()
    try:
        yield api
    finally:
        api.close()


@pytest.fixture(scope="session")
def control_plane_factory(
    control_plane_bin_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., ControlPlane]]:
    """start(**kwargs for start_control_plane) -> a new ControlPlane; all stopped at session end."""
    started: list[ControlPlane] = []

    def start(**kwargs) -> ControlPlane:
        cp = start_control_plane(
            tmp_path_factory.mktemp("controlplane"), control_plane_bin_dir, **kwargs
        )
        started.append(cp)
        return cp

    try:
        yield start
    finally:
        for cp in started:
            cp.stop()


@pytest.fixture(scope="session")
def kueue(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kueue]:
    """A real Kueue (built by setup from sigs.k8s.io/kueue) running against ``control_plane``."""
    with running_kueue(control_plane, tmp_path_factory.mktemp("kueue")) as running:
        yield running
