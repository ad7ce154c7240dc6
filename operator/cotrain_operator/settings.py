"""The operator's settings: every one of them, its environment variable, default and bounds.

Owns reading them, once, at start (`Settings.from_env`, from `__main__`), into one frozen object
that is handed to what needs it; nothing else in the operator reads the environment. `decide()`
gets the part it reads (`DecisionSettings`) the way it gets `now`. deploy/base/deployment.yaml
lists the same variables, and tests/unit/test_settings.py holds the two to each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class SettingsError(ValueError):
    """A setting's value is unusable: the message names the variable, the value and the fix."""


def _setting(env: str, default: Any, about: str, minimum: float | None = None) -> Any:
    return field(default=default, metadata={"env": env, "about": about, "minimum": minimum})


@dataclass(frozen=True)
class DecisionSettings:
    """What `decide()` reads besides the objects it is given."""

    trainer_image: str = "ghcr.io/cotrain/trainer:0.1.0"
    default_cpu_threads: int = 2


@dataclass(frozen=True)
class Settings:
    workers: int = _setting("COTRAIN_WORKERS", 16, "jobs reconciled at once", 1)
    api_threads: int = _setting(
        "COTRAIN_API_THREADS",
        16,
        "API requests in flight at once, each holding a thread and a pooled connection",
        1,
    )
    status_refresh_seconds: float = _setting(
        "COTRAIN_STATUS_REFRESH_SECONDS",
        10.0,
        "a status patch that only refreshes progress or sharing waits this long after the "
        "job's last status write (phases, conditions and members are written at once)",
        0,
    )
    worker_idle_seconds: float = _setting(
        "COTRAIN_WORKER_IDLE_SECONDS",
        1.0,
        "kopf keeps an idle object's worker task this long (kopf's default: 5)",
        0,
    )
    watch_timeout_seconds: int = _setting(
        "COTRAIN_WATCH_TIMEOUT",
        300,
        "the API server ends each watch after this long, and kopf opens it again",
        1,
    )
    metrics_port: int = _setting(
        "COTRAIN_METRICS_PORT", 8080, "Prometheus metrics at :PORT/metrics; 0: none", 0
    )
    kueue: bool = _setting(
        "COTRAIN_KUEUE",
        False,
        "queue jobs labelled kueue.x-k8s.io/queue-name with Kueue (deploy/components/kueue)",
    )
    trainer_image: str = _setting(
        "COTRAIN_TRAINER_IMAGE",
        DecisionSettings.trainer_image,
        "the trainer pods' image, for members that name none",
    )
    default_cpu_threads: int = _setting(
        "COTRAIN_DEFAULT_CPU_THREADS",
        DecisionSettings.default_cpu_threads,
        "CPU threads a pod's members share when the job's members say nothing of theirs",
        1,
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """The settings the environment gives, the defaults for the rest; SettingsError for
        a value that is not of its kind or below its minimum."""
        values: dict[str, Any] = {}
        for item in dataclasses.fields(cls):
            raw = environ.get(item.metadata["env"])
            if raw is not None and raw.strip() != "":
                values[item.name] = _parse(item, raw.strip())
        return cls(**values)

    @property
    def decisions(self) -> DecisionSettings:
        return DecisionSettings(
            trainer_image=self.trainer_image, default_cpu_threads=self.default_cpu_threads
        )


def _parse(item: dataclasses.Field[Any], raw: str) -> Any:
    env, minimum = item.metadata["env"], item.metadata["minimum"]
    kind = {"int": int, "float": float, "bool": bool, "str": str}[str(item.type)]
    fix = f"{env}={raw!r}"
    if kind is bool:
        lowered = raw.lower()
        if lowered not in ("1", "true", "yes", "0", "false", "no"):
            raise SettingsError(f"{fix}: not a yes or no; set it to true or false")
        return lowered in ("1", "true", "yes")
    if kind is str:
        return raw
    try:
        value = kind(raw)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise SettingsError(
            f"{fix}: not {what}; set it to {what} (default {item.default})"
        ) from None
    if minimum is not None and value < minimum:
        raise SettingsError(f"{fix}: below {minimum:g}; set it to {minimum:g} or more")
    if env == "COTRAIN_METRICS_PORT" and value > 65535:
        raise SettingsError(f"{fix}: not a port; set it to 1-65535, or 0 for no metrics")
    return value


def describe() -> list[tuple[str, str, str]]:
    """(variable, default as it would be written in the environment, meaning) of every
    setting, for the docs and their test."""
    return [
        (item.metadata["env"], _written(item.default), item.metadata["about"])
        for item in dataclasses.fields(Settings)
    ]


def _written(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
