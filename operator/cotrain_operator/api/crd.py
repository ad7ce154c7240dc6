"""Renders the CoTrainJob CustomResourceDefinition from the pydantic models.

Owns turning pydantic's JSON schema into a Kubernetes structural schema: `$ref`s inlined, titles
and nulls dropped, exclusive bounds in OpenAPI v3.0 form, quantities as int-or-string, and each
model's CEL rules from `rules.py` attached to its node. `cotrain crd` prints the result and a test
fails when `crds/cotrain.dev_cotrainjobs.yaml` differs from it.
"""

from __future__ import annotations

import inspect
from typing import Any

import yaml
from pydantic import BaseModel

from cotrain_operator.api import models
from cotrain_operator.api.models import (
    API_VERSION,
    CATEGORIES,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    CoTrainJob,
    CoTrainJobSpec,
    CoTrainJobStatus,
)
from cotrain_operator.api.rules import cel_validations

CRD_NAME = f"{PLURAL}.{GROUP}"
CRD_FILE = f"{GROUP}_{PLURAL}.yaml"

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {
        "name": "Phase",
        "type": "string",
        "jsonPath": ".status.phase",
        "description": "The job's phase.",
    },
    {
        "name": "Mode",
        "type": "string",
        "jsonPath": ".status.sharing.mode",
        "description": "The resolved GPU sharing mode.",
    },
    {
        "name": "Placement",
        "type": "string",
        "jsonPath": ".spec.placement.strategy",
        "description": "SameGPU or PodPerMember.",
        "priority": 1,
    },
    {
        "name": "Ready",
        "type": "string",
        "jsonPath": ".status.readyMembers",
        "description": "Running or succeeded members / all members.",
    },
    {
        "name": "Progress",
        "type": "string",
        "jsonPath": ".status.progress",
        "description": "Steps done / steps planned, over all members.",
    },
    {
        "name": "Node",
        "type": "string",
        "jsonPath": ".status.sharing.node",
        "description": "The node the job runs on.",
        "priority": 1,
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

_DROPPED_KEYS = {"title", "$defs"}


def _model_classes() -> dict[str, type[BaseModel]]:
    return {
        name: value
        for name, value in vars(models).items()
        if isinstance(value, type) and issubclass(value, BaseModel)
    }


class _Renderer:
    """Walks one pydantic JSON schema and emits its structural equivalent."""

    def __init__(self, definitions: dict[str, Any]) -> None:
        self.definitions = definitions
        self.classes = _model_classes()

    def node(self, schema: dict[str, Any]) -> dict[str, Any]:
        schema = dict(schema)
        if "$ref" in schema:
            name = schema.pop("$ref").rsplit("/", 1)[-1]
            resolved = self.node(self.definitions[name])
            if name in self.classes:
                rules = cel_validations(self.classes[name])
                if rules:
                    resolved["x-kubernetes-validations"] = rules
            # Siblings of a $ref (the field's description, default, ...) win over the class's.
            return {**resolved, **self.node(schema)}
        if "anyOf" in schema and not schema.get("x-kubernetes-int-or-string"):
            branches = [b for b in schema.pop("anyOf") if b.get("type") != "null"]
            if len(branches) != 1:
                raise ValueError(f"cannot render a union of {branches} structurally")
            return {**self.node(branches[0]), **self.node(schema)}
        rendered: dict[str, Any] = {}
        for key, value in schema.items():
            if key in _DROPPED_KEYS or (key == "default" and value is None):
                continue
            if key == "properties":
                rendered[key] = {name: self.node(sub) for name, sub in value.items()}
            elif key == "items" or (key == "additionalProperties" and isinstance(value, dict)):
                rendered[key] = self.node(value)
            elif key == "additionalProperties":
                continue  # unknown fields are pruned or refused by the server, not schema'd
            elif key in ("exclusiveMinimum", "exclusiveMaximum"):
                bound = "minimum" if key == "exclusiveMinimum" else "maximum"
                rendered[bound] = value
                rendered[key] = True
            else:
                rendered[key] = value
        return rendered


def object_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of one model."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    renderer = _Renderer(raw.get("$defs", {}))
    schema = renderer.node(raw)
    rules = cel_validations(model)
    if rules:
        schema["x-kubernetes-validations"] = rules
    return schema


def render_crd() -> dict[str, Any]:
    """The CoTrainJob CRD as a Kubernetes object."""
    root: dict[str, Any] = {
        "type": "object",
        "description": inspect.cleandoc(CoTrainJob.__doc__ or ""),
        "properties": {
            "apiVersion": {"type": "string", "description": f"{API_VERSION}"},
            "kind": {"type": "string", "description": KIND},
            "metadata": {"type": "object"},
            "spec": object_schema(CoTrainJobSpec),
            "status": object_schema(CoTrainJobStatus),
        },
        "required": ["spec"],
    }
    root_rules = cel_validations(CoTrainJob)
    if root_rules:
        root["x-kubernetes-validations"] = root_rules
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {
                "app.kubernetes.io/name": "cotrain",
                "app.kubernetes.io/part-of": "cotrain",
            },
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": list(CATEGORIES),
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def render_crd_yaml() -> str:
    """The CRD as the YAML committed under crds/."""
    header = "# Generated by `cotrain crd` from cotrain_operator.api; do not edit by hand.\n"
    body = yaml.safe_dump(render_crd(), sort_keys=False, width=100, allow_unicode=True)
    return header + body
