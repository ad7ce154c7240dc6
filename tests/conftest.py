"""Root conftest: the real control plane and the fixtures over it serve every suite."""

pytest_plugins = ["tests.controlplane.plugin", "tests.fixtures.kube_fixtures"]
