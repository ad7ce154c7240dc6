"""What a trainer pod may do: patch its own job's status.members, and nothing else.

Owns the trainer's identity and its limits. Every namespace with CoTrainJobs gets one
ServiceAccount, `cotrain-trainer`, and a RoleBinding to the `cotrain-trainer` ClusterRole (get and
patch on cotrainjobs/status); the operator creates both with the namespace's first trainer pod
(`build_trainer_identity`), so admitting a job costs no per-job RBAC writes. RBAC cannot say
"its own job"; the ValidatingAdmissionPolicy rendered here does (`render_trainer_access`,
committed as deploy/base/trainer.yaml): a request as cotrain-trainer must carry a token bound to a
pod (the kubelet's projected token; the API server puts the pod's name in the user's extra info),
the pod's name must be one of the job's trainer pod names, and only status.members may change.
Pure functions; `python -m cotrain_operator.reconcile.access` prints the deploy/ file (`--chart`:
the Helm chart's template of it).
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from cotrain_operator.api.models import GROUP, PLURAL, CoTrainJobStatus
from cotrain_operator.reconcile.placement import SAME_GPU_GROUP

TRAINER_SERVICE_ACCOUNT = "cotrain-trainer"
TRAINER_CLUSTER_ROLE = "cotrain-trainer"
POLICY_NAME = "cotrain-trainer-reports-own-job"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
MEMBERS_FIELD = "members"
_LABELS = {
    "app.kubernetes.io/name": "cotrain",
    "app.kubernetes.io/component": "trainer",
}
_MANAGED_LABELS = _LABELS | {"app.kubernetes.io/managed-by": "cotrain-operator"}
# The cluster-wide policy objects are installed with the operator, labelled as its other objects.
_INSTALLED_LABELS = _LABELS | {"app.kubernetes.io/part-of": "cotrain"}


def build_trainer_identity(namespace: str) -> list[dict[str, Any]]:
    """The ServiceAccount every trainer pod in `namespace` runs as, and its RoleBinding.

    Shared by the namespace's jobs and owned by none of them (no ownerReference): it outlives
    each job, as a namespace's `default` ServiceAccount does.
    """
    metadata = {"name": TRAINER_SERVICE_ACCOUNT, "namespace": namespace, "labels": _MANAGED_LABELS}
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": dict(metadata),
            "automountServiceAccountToken": True,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": dict(metadata),
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": TRAINER_CLUSTER_ROLE,
            },
            "subjects": [
                {"kind": "ServiceAccount", "name": TRAINER_SERVICE_ACCOUNT, "namespace": namespace}
            ],
        },
    ]


def operator_status_fields() -> list[str]:
    """The status fields only the operator writes: all but status.members."""
    fields = CoTrainJobStatus.model_json_schema(by_alias=True)["properties"]
    return [name for name in fields if name != MEMBERS_FIELD]


def _unchanged(field: str) -> str:
    old, new = f"oldObject.status.{field}", f"object.status.{field}"
    return (
        f"(has(oldObject.status) && has({old})) == (has(object.status) && has({new})) && "
        f"(!has(object.status) || !has({new}) || {new} == {old})"
    )


def render_trainer_access() -> list[dict[str, Any]]:
    """The ClusterRole, ValidatingAdmissionPolicy and binding of deploy/base/trainer.yaml."""
    # Pod names are <job>-<group>-<attempt> (children.pod_name); a group is SAME_GPU_GROUP or a
    # member's name, "-<replica>" added for a replicated member (placement.py). Job and member
    # names are DNS labels: nothing in them is special to a regular expression.
    pattern = (
        f'"^" + object.metadata.name + "-({SAME_GPU_GROUP}|" + '
        'object.spec.members.map(m, m.name).join("|") + ")(-[0-9]+)?-[0-9]+$"'
    )
    username = f'"system:serviceaccount:" + request.namespace + ":{TRAINER_SERVICE_ACCOUNT}"'
    validations: list[dict[str, str]] = [
        {
            "expression": 'variables.pod != ""',
            "reason": "Forbidden",
            "message": f"the {TRAINER_SERVICE_ACCOUNT} ServiceAccount reports only with a token "
            "bound to a trainer pod (the kubelet's projected token), not with a token made for "
            "the ServiceAccount alone",
        },
        {
            "expression": "variables.pod.matches(variables.podPattern)",
            "reason": "Forbidden",
            "messageExpression": '"pod " + variables.pod + " is not a trainer pod of CoTrainJob "'
            ' + object.metadata.name + ": a trainer reports only into its own job"',
        },
    ]
    validations += [
        {
            "expression": _unchanged(field),
            "reason": "Forbidden",
            "message": f"a trainer writes only status.{MEMBERS_FIELD}; "
            f"status.{field} is the operator's",
        }
        for field in operator_status_fields()
    ]
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": TRAINER_CLUSTER_ROLE, "labels": _INSTALLED_LABELS},
            "rules": [
                {
                    "apiGroups": [GROUP],
                    "resources": [f"{PLURAL}/status"],
                    "verbs": ["get", "patch"],
                }
            ],
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": POLICY_NAME, "labels": _INSTALLED_LABELS},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": [GROUP],
                            "apiVersions": ["*"],
                            "operations": ["UPDATE"],
                            "resources": [f"{PLURAL}/status"],
                        }
                    ]
                },
                "matchConditions": [
                    {
                        "name": "as-the-trainer-service-account",
                        "expression": f"request.userInfo.username == {username}",
                    }
                ],
                "variables": [
                    {
                        "name": "pod",
                        "expression": f'"{POD_NAME_EXTRA}" in request.userInfo.extra ? '
                        f'request.userInfo.extra["{POD_NAME_EXTRA}"][0] : ""',
                    },
                    {"name": "podPattern", "expression": pattern},
                ],
                "validations": validations,
            },
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": POLICY_NAME, "labels": _INSTALLED_LABELS},
            "spec": {"policyName": POLICY_NAME, "validationActions": ["Deny"]},
        },
    ]


def render_trainer_access_yaml() -> str:
    """deploy/base/trainer.yaml."""
    header = (
        "# Generated by `python -m cotrain_operator.reconcile.access` (reconcile/access.py, which\n"
        "# says why): what a trainer pod may do. Do not edit by hand.\n"
    )
    body = yaml.safe_dump_all(render_trainer_access(), sort_keys=False, width=100)
    return header + body


# What the chart's copy templates: each object's labels (the chart's, with Helm's own) and the
# binding's validation actions (values.yaml: trainerPolicy.validationActions).
_CHART_LABELS = (
    '\n    {{- include "cotrain.labels" (dict "component" "trainer" "root" $) | nindent 4 }}'
)
_CHART_ACTIONS = "\n  {{- toYaml .Values.trainerPolicy.validationActions | nindent 2 }}"


def render_trainer_access_chart() -> str:
    """deploy/helm/cotrain/templates/trainer.yaml: the same objects as a Helm template."""
    documents = render_trainer_access()
    for document in documents:
        document["metadata"]["labels"] = "@labels@"
    documents[-1]["spec"]["validationActions"] = "@actions@"
    header = (
        "# Generated by `python -m cotrain_operator.reconcile.access --chart`: deploy/base/\n"
        "# trainer.yaml as a template. Do not edit by hand.\n"
    )
    body = yaml.safe_dump_all(documents, sort_keys=False, width=100)
    body = body.replace(" '@labels@'", _CHART_LABELS).replace(" '@actions@'", _CHART_ACTIONS)
    return header + body


if __name__ == "__main__":
    chart = sys.argv[1:] == ["--chart"]
    sys.stdout.write(render_trainer_access_chart() if chart else render_trainer_access_yaml())
