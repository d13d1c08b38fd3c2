{{/*
Names and labels shared by every template. Every helper is prefixed "darwinlm." (Helm templates
are global across a chart and its subcharts).
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "darwinlm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-<chart>" (just "<release>" when it already contains the chart name), or fullnameOverride. */}}
{{- define "darwinlm.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<chart>-<version>" for the helm.sh/chart label. */}}
{{- define "darwinlm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the operator pod; never change them (Deployment selectors are immutable). */}}
{{- define "darwinlm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "darwinlm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels of every object: selector labels, versions, and commonLabels. */}}
{{- define "darwinlm.labels" -}}
helm.sh/chart: {{ include "darwinlm.chart" . }}
{{ include "darwinlm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: darwinlm
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The ServiceAccount the operator runs as. */}}
{{- define "darwinlm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "darwinlm.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image reference. */}}
{{- define "darwinlm.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if hasPrefix "sha256:" $tag }}
{{- printf "%s@%s" .Values.image.repository $tag }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* The default image of the Job pods. */}}
{{- define "darwinlm.jobImage" -}}
{{- $tag := default .Chart.AppVersion .Values.jobImage.tag }}
{{- if hasPrefix "sha256:" $tag }}
{{- printf "%s@%s" .Values.jobImage.repository $tag }}
{{- else }}
{{- printf "%s:%s" .Values.jobImage.repository $tag }}
{{- end }}
{{- end }}

{{/* Namespaces watched in single-namespace mode (watchNamespaces, or the release namespace), one per line. */}}
{{- define "darwinlm.watchNamespaces" -}}
{{- if .Values.watchNamespaces }}
{{- range .Values.watchNamespaces }}
{{ . }}
{{- end }}
{{- else }}
{{ .Release.Namespace }}
{{- end }}
{{- end }}

{{/*
The permissions of the operator on PruningSearches and the objects it creates (namespaced rules).
Least privilege, no wildcards:
  - pruningsearches: read, patch (kopf's finalizer and annotations), delete (ttlSecondsAfterFinished),
    status; the finalizers subresource for ownerReferences with blockOwnerDeletion on its Jobs;
  - jobs: one per task, created, watched, deleted (suspend, retries); pods: read only (exit codes, reasons);
  - services: the headless Service of a multi-worker generation Job;
  - events: kopf posts one per handler outcome and state change;
  - secrets: get only, the S3 Secret named by spec.s3.secretRef (the operator reads the store).
*/}}
{{- define "darwinlm.rules" -}}
- apiGroups: ["darwinlm.io"]
  resources: ["pruningsearches"]
  verbs: ["get", "list", "watch", "patch", "update", "delete"]
- apiGroups: ["darwinlm.io"]
  resources: ["pruningsearches/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["darwinlm.io"]
  resources: ["pruningsearches/finalizers"]
  verbs: ["update"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}
