"""The CRD is generated from the models, committed, structural and a valid apiextensions/v1."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cotrain_operator.api.crd import CRD_FILE, render_crd, render_crd_yaml
from cotrain_operator.api.rules import RULES, TRANSITION_RULES

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "crds" / CRD_FILE
KUBERNETES_VERSION = "1.34"


def _schema() -> dict[str, Any]:
    return render_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


def _nodes(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from _nodes(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _nodes(schema["additionalProperties"], f"{path}.*")


def test_committed_crd_is_the_generated_one() -> None:
    assert COMMITTED.read_text() == render_crd_yaml(), (
        "crds/ is stale: run `cotrain crd > crds/" + CRD_FILE + "`"
    )


def test_crd_is_a_valid_apiextensions_v1_object() -> None:
    kubernetes_validate.validate(
        yaml.safe_load(COMMITTED.read_text()), KUBERNETES_VERSION, strict=True
    )


def test_the_validator_would_catch_a_broken_crd() -> None:
    broken = copy.deepcopy(render_crd())
    broken["spec"]["versions"][0]["servedd"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_schema_is_structural() -> None:
    for path, node in _nodes(_schema()):
        assert "$ref" not in node, path
        assert "title" not in node, path
        assert node.get("additionalProperties") is not False, path
        if node.get("x-kubernetes-int-or-string"):
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
        else:
            assert "anyOf" not in node, path
            assert node.get("type") in {
                "object",
                "array",
                "string",
                "integer",
                "number",
                "boolean",
            }, path
        assert node.get("default", 0) is not None, path


def test_every_field_has_a_description_for_kubectl_explain() -> None:
    for path, node in _nodes(_schema()):
        scalar_item = path.endswith("[]") and node.get("type") != "object"
        if path and path != ".metadata" and not path.endswith(".*") and not scalar_item:
            assert node.get("description"), f"{path} has no description"


def test_every_cel_rule_is_in_the_crd() -> None:
    cel_in_crd = [
        v["rule"] for _, node in _nodes(_schema()) for v in node.get("x-kubernetes-validations", [])
    ]
    expected = [r.cel for r in (*RULES, *TRANSITION_RULES) if r.cel is not None]
    assert sorted(cel_in_crd) == sorted(expected)


def test_names_columns_and_subresources() -> None:
    crd = render_crd()
    names = crd["spec"]["names"]
    assert names["shortNames"] == ["ctj"]
    assert "all" in names["categories"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase"
    assert columns["Mode"] == ".status.sharing.mode"
    assert columns["Ready"] == ".status.readyMembers"
    assert columns["Progress"] == ".status.progress"
    assert columns["Age"] == ".metadata.creationTimestamp"
    # Every column points at a field the schema declares.
    schema = _schema()
    for column in version["additionalPrinterColumns"]:
        node = schema
        for part in column["jsonPath"].strip(".").split("."):
            if part == "metadata":
                break
            node = node["properties"][part]


def test_members_and_conditions_are_list_maps() -> None:
    schema = _schema()
    members = schema["properties"]["spec"]["properties"]["members"]
    assert members["x-kubernetes-list-type"] == "map"
    assert members["x-kubernetes-list-map-keys"] == ["name"]
    conditions = schema["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert set(conditions["items"]["required"]) == {
        "type",
        "status",
        "lastTransitionTime",
        "reason",
        "message",
    }
