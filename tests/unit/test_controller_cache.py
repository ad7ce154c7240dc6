"""What the controller keeps of each job and pod: the object as the API server sent it, less
`metadata.managedFields`, with nothing shared with the event it came in (kopf's body), and its
keys and short strings interned so that 1,000 cached pods hold one copy of each; the watch's
echo of a version already cached is not copied again."""

from __future__ import annotations

import copy
import json
import sys
from typing import Any

from cotrain_operator.controller import _cached


def a_pod(name: str) -> dict[str, Any]:
    # Through JSON, as a watch event brings it: every document has its own strings.
    return json.loads(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "namespace": "team-a",
                    "labels": {"cotrain.dev/job": "j"},
                    "managedFields": [{"manager": "cotrain-operator", "fieldsV1": {"f:spec": {}}}],
                    "resourceVersion": "12",
                },
                "spec": {"containers": [{"name": "trainer", "env": [{"name": "COTRAIN_X"}]}]},
                "status": {"phase": "Pending", "message": "x" * 100},
            }
        )
    )


def test_the_cache_keeps_the_object_less_its_managed_fields() -> None:
    pod = a_pod("p")
    cached = _cached(pod)
    expected = copy.deepcopy(pod)
    del expected["metadata"]["managedFields"]
    assert cached == expected
    assert list(cached) == list(pod)  # the keys' order too
    assert "managedFields" in pod["metadata"]  # the event is untouched


def test_nothing_is_shared_with_the_event() -> None:
    pod = a_pod("p")
    cached = _cached(pod)
    pod["spec"]["containers"][0]["env"].append({"name": "LATER"})
    pod["metadata"]["labels"]["other"] = "x"
    assert cached["spec"]["containers"][0]["env"] == [{"name": "COTRAIN_X"}]
    assert cached["metadata"]["labels"] == {"cotrain.dev/job": "j"}


def test_two_pods_share_their_keys_and_short_values() -> None:
    one, two = _cached(a_pod("p1")), _cached(a_pod("p2"))
    key_one = next(k for k in one["metadata"] if k == "resourceVersion")
    key_two = next(k for k in two["metadata"] if k == "resourceVersion")
    assert key_one is key_two
    assert key_one is sys.intern("resourceVersion")
    assert one["metadata"]["namespace"] is two["metadata"]["namespace"]
    env_one = one["spec"]["containers"][0]["env"][0]["name"]
    assert env_one is two["spec"]["containers"][0]["env"][0]["name"]
    # A long string is kept as it came: interning what is seldom repeated buys nothing.
    assert one["status"]["message"] is not two["status"]["message"]


def test_the_echo_of_a_cached_version_keeps_the_cached_object() -> None:
    from cotrain_operator.controller import Controller

    controller = Controller(api=None, workers=1)  # type: ignore[arg-type]  (no call is made)
    pod = a_pod("p")
    pod["metadata"]["labels"] = {"cotrain.dev/job": "j"}
    pod["metadata"]["uid"] = "u1"
    controller.on_pod("ADDED", pod)
    kept = controller.pods[("team-a", "j")]["p"]
    controller.on_pod("MODIFIED", a_pod("p") | {"metadata": pod["metadata"]})
    assert controller.pods[("team-a", "j")]["p"] is kept  # the same version: not copied again
    newer = copy.deepcopy(pod)
    newer["metadata"]["resourceVersion"] = "13"
    newer["status"]["phase"] = "Running"
    controller.on_pod("MODIFIED", newer)
    assert controller.pods[("team-a", "j")]["p"]["status"]["phase"] == "Running"
    other = copy.deepcopy(newer)
    other["metadata"]["uid"] = "u2"  # a new pod of the same name, at the same version number
    other["status"]["phase"] = "Pending"
    controller.on_pod("ADDED", other)
    assert controller.pods[("team-a", "j")]["p"]["metadata"]["uid"] == "u2"
