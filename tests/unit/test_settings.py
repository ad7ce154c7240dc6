"""The operator's settings (`settings.py`): read once from the environment, each one checked with
a message that names the variable and the fix, the part decisions read handed to `decide()`;
no other module of the operator reads the environment, and the deployment manifest lists every
variable with its default."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cotrain_operator.settings import DecisionSettings, Settings, SettingsError, describe

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "operator" / "cotrain_operator"


def test_an_empty_environment_gives_the_defaults() -> None:
    assert Settings.from_env({}) == Settings()
    assert Settings.from_env({"COTRAIN_WORKERS": "  "}) == Settings()  # blank: unset
    assert Settings().decisions == DecisionSettings()


@pytest.mark.parametrize(
    ("env", "value", "field", "expected"),
    [
        ("COTRAIN_WORKERS", "4", "workers", 4),
        ("COTRAIN_API_THREADS", "32", "api_threads", 32),
        ("COTRAIN_STATUS_REFRESH_SECONDS", "0", "status_refresh_seconds", 0.0),
        ("COTRAIN_STATUS_REFRESH_SECONDS", "2.5", "status_refresh_seconds", 2.5),
        ("COTRAIN_WORKER_IDLE_SECONDS", "5", "worker_idle_seconds", 5.0),
        ("COTRAIN_WATCH_TIMEOUT", "60", "watch_timeout_seconds", 60),
        ("COTRAIN_METRICS_PORT", "0", "metrics_port", 0),
        ("COTRAIN_KUEUE", "true", "kueue", True),
        ("COTRAIN_KUEUE", "YES", "kueue", True),
        ("COTRAIN_KUEUE", "0", "kueue", False),
        ("COTRAIN_TRAINER_IMAGE", "registry.example/t:1", "trainer_image", "registry.example/t:1"),
        ("COTRAIN_DEFAULT_CPU_THREADS", "8", "default_cpu_threads", 8),
    ],
)
def test_each_variable_sets_its_setting(env: str, value: str, field: str, expected: object) -> None:
    settings = Settings.from_env({env: value})
    assert getattr(settings, field) == expected
    others = {k: v for k, v in vars(settings).items() if k != field}
    assert others == {k: v for k, v in vars(Settings()).items() if k != field}


def test_decisions_carry_the_image_and_the_threads() -> None:
    settings = Settings.from_env(
        {"COTRAIN_TRAINER_IMAGE": "r/t:2", "COTRAIN_DEFAULT_CPU_THREADS": "3"}
    )
    assert settings.decisions == DecisionSettings(trainer_image="r/t:2", default_cpu_threads=3)


@pytest.mark.parametrize(
    ("env", "value", "says"),
    [
        ("COTRAIN_WORKERS", "four", "not a whole number; set it to a whole number (default 16)"),
        ("COTRAIN_WORKERS", "2.5", "not a whole number"),
        ("COTRAIN_WORKERS", "0", "below 1; set it to 1 or more"),
        ("COTRAIN_API_THREADS", "-3", "below 1"),
        ("COTRAIN_STATUS_REFRESH_SECONDS", "soon", "not a number; set it to a number"),
        ("COTRAIN_STATUS_REFRESH_SECONDS", "-1", "below 0"),
        ("COTRAIN_METRICS_PORT", "70000", "not a port; set it to 1-65535, or 0 for no metrics"),
        ("COTRAIN_KUEUE", "maybe", "not a yes or no; set it to true or false"),
    ],
)
def test_a_bad_value_names_the_variable_and_the_fix(env: str, value: str, says: str) -> None:
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({env: value})
    assert str(refused.value).startswith(f"{env}={value!r}: ")
    assert says in str(refused.value)


def test_no_other_module_reads_the_environment() -> None:
    readers = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if re.search(r"os\.environ|os\.getenv|getenv\(", path.read_text())
    )
    # __main__ hands the environment to Settings.from_env; credentials.py finds the API server
    # and the ServiceAccount the kubelet describes there (KUBERNETES_SERVICE_HOST, KUBECONFIG).
    assert readers == ["__main__.py", "credentials.py"]


def test_the_deployment_lists_every_variable_with_its_default() -> None:
    manifest = (ROOT / "deploy" / "base" / "deployment.yaml").read_text()
    listed = dict(re.findall(r"#\s+(COTRAIN_[A-Z_]+)=(\S+)", manifest))
    assert listed == {env: default for env, default, _ in describe()}


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"COTRAIN_WORKERS": "0"}, "cotrain-operator: COTRAIN_WORKERS='0': below 1"),
        ({"KUBECONFIG": "/nonexistent/kubeconfig"}, "cotrain-operator: no credentials"),
    ],
)
def test_the_operator_stops_at_start_with_one_line(env: dict[str, str], says: str) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("COTRAIN_", "KUBE"))}
    clean["HOME"] = "/nonexistent"  # no ~/.kube/config either
    done = subprocess.run(
        [sys.executable, "-m", "cotrain_operator"],
        env={**clean, "PYTHONPATH": str(ROOT / "operator"), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.startswith(says)
    assert "Traceback" not in done.stderr
