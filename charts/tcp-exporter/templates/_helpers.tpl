{{/* The operator's name: tcp-exporter-operator, as `kubectl apply -k manifests/` names it. */}}
{{- define "tcp-exporter.name" -}}
{{- .Values.nameOverride | default "tcp-exporter-operator" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tcp-exporter.serviceAccountName" -}}
{{- .Values.serviceAccount.name | default (include "tcp-exporter.name" .) -}}
{{- end -}}

{{- define "tcp-exporter.labels" -}}
app.kubernetes.io/name: {{ include "tcp-exporter.name" . }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: tcp-exporter
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "tcp-exporter.selector" -}}
app.kubernetes.io/name: {{ include "tcp-exporter.name" . }}
{{- end -}}

{{- define "tcp-exporter.image" -}}
{{- printf "%s:%s" .repository (.tag | default $.appVersion) -}}
{{- end -}}
