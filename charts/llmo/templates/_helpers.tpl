{{/*
Shared names, labels and small decisions of the llmo chart.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "llmo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The prefix of every resource name: fullnameOverride, else the release name when it already
contains the chart name, else "<release>-<chart>". Truncated to 46 characters so that the
longest Service name, "<prefix>-operator-metrics", stays within 63.
*/}}
{{- define "llmo.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 46 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 46 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 46 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "name-version" for the helm.sh/chart label. */}}
{{- define "llmo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every resource: commonLabels, then the chart's own (which win on a clash). */}}
{{- define "llmo.labels" -}}
{{- $own := dict
    "helm.sh/chart" (include "llmo.chart" .)
    "app.kubernetes.io/name" (include "llmo.name" .)
    "app.kubernetes.io/instance" .Release.Name
    "app.kubernetes.io/version" .Chart.AppVersion
    "app.kubernetes.io/managed-by" .Release.Service
    "app.kubernetes.io/part-of" "llmo" -}}
{{- toYaml (mergeOverwrite (deepCopy (.Values.commonLabels | default dict)) $own) -}}
{{- end -}}

{{/* Selector labels of one component: pass (dict "ctx" $ "component" "operator"). */}}
{{- define "llmo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llmo.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/*
Labels of one component's resources: the common labels plus the component, plus (optionally)
extra labels given as "extra", which win.
*/}}
{{- define "llmo.componentLabels" -}}
{{- $labels := include "llmo.labels" .ctx | fromYaml -}}
{{- $_ := set $labels "app.kubernetes.io/component" .component -}}
{{- toYaml (mergeOverwrite $labels (deepCopy (.extra | default dict))) -}}
{{- end -}}

{{/*
Labels of one component's pods: podLabels (as "extra"), then the selector labels and the version,
which win so that the pods always match their workload's selector.
*/}}
{{- define "llmo.podLabels" -}}
{{- $own := include "llmo.selectorLabels" . | fromYaml -}}
{{- $_ := set $own "app.kubernetes.io/version" .ctx.Chart.AppVersion -}}
{{- toYaml (mergeOverwrite (deepCopy (.extra | default dict)) $own) -}}
{{- end -}}

{{/* The image reference: repository, then @digest when set, else :tag (default appVersion). */}}
{{- define "llmo.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Service account names. */}}
{{- define "llmo.operatorServiceAccountName" -}}
{{- default (printf "%s-operator" (include "llmo.fullname" .)) .Values.serviceAccount.operator.name -}}
{{- end -}}

{{- define "llmo.agentServiceAccountName" -}}
{{- default (printf "%s-agent" (include "llmo.fullname" .)) .Values.serviceAccount.agent.name -}}
{{- end -}}

{{/*
Which CRD flavour to install: "cel" (with x-kubernetes-validations, Kubernetes 1.25+) or
"without-cel" (1.20 to 1.24; 1.20-1.22 refuse the field). crds.cel forces one.
*/}}
{{- define "llmo.crdFlavour" -}}
{{- if eq .Values.crds.cel "always" -}}
cel
{{- else if eq .Values.crds.cel "never" -}}
without-cel
{{- else if semverCompare ">=1.25-0" .Capabilities.KubeVersion.Version -}}
cel
{{- else -}}
without-cel
{{- end -}}
{{- end -}}

{{/*
Whether to render the Prometheus Operator monitors: asked for, and either the API is served or
the user forces them. Returns "true" or "".
*/}}
{{- define "llmo.renderMonitors" -}}
{{- $m := .Values.metrics.serviceMonitor -}}
{{- if and $m.enabled (or $m.force (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")) -}}
true
{{- end -}}
{{- end -}}

{{/* The PodDisruptionBudget API of this cluster: policy/v1 from 1.21, policy/v1beta1 before. */}}
{{- define "llmo.pdbApiVersion" -}}
{{- if or (.Capabilities.APIVersions.Has "policy/v1/PodDisruptionBudget") (semverCompare ">=1.21-0" .Capabilities.KubeVersion.Version) -}}
policy/v1
{{- else -}}
policy/v1beta1
{{- end -}}
{{- end -}}

{{/* Labels and annotations spliced into each CRD's metadata (indented for that spot). */}}
{{- define "llmo.crdMetadata" -}}
{{- $labels := include "llmo.labels" . | fromYaml -}}
{{- $_ := set $labels "app.kubernetes.io/component" "crd" -}}
{{- $meta := dict "labels" $labels -}}
{{- if .Values.crds.keep -}}
{{- $_ := set $meta "annotations" (dict "helm.sh/resource-policy" "keep") -}}
{{- end -}}
{{- toYaml $meta | indent 2 -}}
{{- end -}}
