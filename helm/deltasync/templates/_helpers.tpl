{{/*
Names. The chart's resources are <fullname> (the client Service and the
StatefulSet), <fullname>-headless (the pods' stable names), <fullname>-primary,
<fullname>-metrics, <fullname>-tls and <fullname>-dashboard.
*/}}

{{- define "deltasync.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every resource name; short enough for pod names and DNS labels. */}}
{{- define "deltasync.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "deltasync.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "deltasync.selectorLabels" -}}
app.kubernetes.io/name: {{ include "deltasync.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "deltasync.labels" -}}
helm.sh/chart: {{ include "deltasync.chart" . }}
{{ include "deltasync.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "deltasync.headless" -}}
{{ include "deltasync.fullname" . }}-headless
{{- end }}

{{- define "deltasync.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "deltasync.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "deltasync.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "deltasync.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "deltasync.fullname" .)) .Values.tls.secretName }}
{{- end }}

{{- define "deltasync.scheme" -}}
{{- ternary "https" "http" .Values.tls.enabled }}
{{- end }}

{{/* The stable DNS name of pod $ordinal: <fullname>-N.<headless>.<ns>.svc.<domain>. */}}
{{- define "deltasync.podHost" -}}
{{- $ := index . 0 }}
{{- printf "%s-%d.%s.%s.svc.%s" (include "deltasync.fullname" $) (int (index . 1)) (include "deltasync.headless" $) $.Release.Namespace $.Values.clusterDomain }}
{{- end }}

{{/* The URL every pod is given as --replicate-from: the primary pod's. */}}
{{- define "deltasync.primaryUrl" -}}
{{- printf "%s://%s:%d" (include "deltasync.scheme" .) (include "deltasync.podHost" (list . .Values.primaryOrdinal)) (int .Values.server.port) }}
{{- end }}

{{/* Port the kubelet probes: the main port, or the plaintext health-only port under TLS. */}}
{{- define "deltasync.probePort" -}}
{{- ternary .Values.server.healthPort .Values.server.port .Values.tls.enabled | int }}
{{- end }}

{{/* --conflict-strategy from the map: collection=strategy,... (sorted). */}}
{{- define "deltasync.conflictStrategy" -}}
{{- $parts := list }}
{{- range $collection, $strategy := .Values.server.conflictStrategy }}
{{- $parts = append $parts (printf "%s=%s" $collection $strategy) }}
{{- end }}
{{- join "," $parts }}
{{- end }}

{{/*
Consistency checks the schema cannot express; each fails the render with a
message naming the values to change.
*/}}
{{- define "deltasync.validate" -}}
{{- $v := .Values }}
{{- if ge (int $v.primaryOrdinal) (int $v.replicaCount) }}
{{- fail (printf "primaryOrdinal (%d) must be below replicaCount (%d)" (int $v.primaryOrdinal) (int $v.replicaCount)) }}
{{- end }}
{{- if and (gt (int $v.syncReplicas) 0) (ge (int $v.syncReplicas) (int $v.replicaCount)) }}
{{- fail (printf "syncReplicas (%d) must be below replicaCount (%d): a Push waits for that many replicas besides the primary" (int $v.syncReplicas) (int $v.replicaCount)) }}
{{- end }}
{{- if lt (int $v.terminationGracePeriodSeconds) (add (int $v.server.shutdownGraceSeconds) 5) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be at least server.shutdownGraceSeconds (%d) + 5, so a pod drains and flushes before it is killed" (int $v.terminationGracePeriodSeconds) (int $v.server.shutdownGraceSeconds)) }}
{{- end }}
{{- if and $v.tls.enabled (not $v.tls.certManager.enabled) (not $v.tls.secretName) }}
{{- fail "tls.enabled needs tls.secretName (a Secret with tls.crt, tls.key and ca.crt) or tls.certManager.enabled" }}
{{- end }}
{{- if and $v.tls.certManager.enabled (not $v.tls.certManager.issuerRef.name) }}
{{- fail "tls.certManager.enabled needs tls.certManager.issuerRef.name" }}
{{- end }}
{{- if and (or $v.tls.clientAuth $v.tls.certManager.enabled) (not $v.tls.enabled) }}
{{- fail "tls.clientAuth and tls.certManager.enabled need tls.enabled" }}
{{- end }}
{{- if and $v.auth.enabled (not $v.auth.secretName) }}
{{- fail "auth.enabled needs auth.secretName (a Secret holding the auth file under auth.key)" }}
{{- end }}
{{- if and $v.auth.enabled $v.tests.enabled (not $v.tests.tokenSecret.name) }}
{{- fail "auth.enabled: the helm test pod needs tests.tokenSecret.name (a token allowed to write tests.collection), or set tests.enabled=false" }}
{{- end }}
{{- if and $v.metrics.enabled $v.metrics.dashboard.enabled (not (.Files.Get "dashboards/deltasync.json")) }}
{{- fail "metrics.dashboard.enabled: the chart has no dashboards/deltasync.json; set metrics.dashboard.enabled=false" }}
{{- end }}
{{- if and $v.metrics.serviceMonitor.enabled (not $v.metrics.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled" }}
{{- end }}
{{- end }}
