{{/*
Labels of every object: those of the kustomize base (deploy/base), and Helm's own.
Call with (dict "component" "operator" "root" $).
*/}}
{{- define "cotrain.labels" -}}
app.kubernetes.io/name: cotrain
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: cotrain
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end }}

{{/* The operator pods' selector: as in the base, so that one selects the other's pods. */}}
{{- define "cotrain.selector" -}}
app.kubernetes.io/name: cotrain
app.kubernetes.io/component: operator
{{- end }}

{{/* repository:tag[@digest], the tag defaulting to the chart's appVersion. Call with
(dict "image" .Values.image.operator "root" $). */}}
{{- define "cotrain.image" -}}
{{- $tag := .image.tag | default .root.Chart.AppVersion -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- with .image.digest }}@{{ . }}{{ end -}}
{{- end }}

{{/* The operator's verbs in the namespaces it watches (all of them, or operator.watchNamespaces). */}}
{{- define "cotrain.namespacedRules" -}}
# Watch jobs; delete them when ttlSecondsAfterFinished expires.
- apiGroups: ["cotrain.dev"]
  resources: ["cotrainjobs"]
  verbs: ["get", "list", "watch", "delete"]
# Write status. Holding get/patch here is also what lets the operator bind the cotrain-trainer
# ClusterRole (the same two verbs, trainer.yaml) in a namespace (RBAC forbids granting more
# than you hold).
- apiGroups: ["cotrain.dev"]
  resources: ["cotrainjobs/status"]
  verbs: ["get", "patch"]
# The trainer pods of each job.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete"]
# Each namespace's trainer identity: a ServiceAccount and a RoleBinding to cotrain-trainer.
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["create"]
# Headless Services through which a data-parallel member's replicas find each other.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["rolebindings"]
  verbs: ["create"]
# Events on jobs (kubectl describe); kopf posts its own through the same API.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/* The operator's verbs on cluster-scoped objects, wherever it watches jobs. */}}
{{- define "cotrain.clusterRules" -}}
# A check at start that the trainer admission policy (trainer.yaml) is installed.
- apiGroups: ["admissionregistration.k8s.io"]
  resources: ["validatingadmissionpolicies", "validatingadmissionpolicybindings"]
  resourceNames: ["cotrain-trainer-reports-own-job"]
  verbs: ["get"]
# GPU inventory from GPU Feature Discovery labels.
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["get", "list", "watch"]
# kopf discovers and watches the resources it serves.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["get", "list", "watch"]
{{- end }}
