"""Root conftest: the real control plane plugin is available to every suite."""

pytest_plugins = ["tests.controlplane.plugin"]
