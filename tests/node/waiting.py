"""Waiting on the real node's API: the one poll loop and JSON read the node tests share."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

from tests.controlplane.cluster import ControlPlane

T = TypeVar("T")


def until(what: str, probe: Callable[[], T | None], timeout: float = 120) -> T:
    """``probe()``'s first truthy answer, polled twice a second; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def get_json(cp: ControlPlane, path: str) -> dict[str, Any]:
    status, body = cp.get(path)
    assert status == 200, body
    return json.loads(body)  # type: ignore[no-any-return]
