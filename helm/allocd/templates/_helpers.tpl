{{/* Names and labels. */}}
{{- define "allocd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "allocd.fullname" -}}
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

{{- define "allocd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "allocd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "allocd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "allocd.labels" -}}
helm.sh/chart: {{ include "allocd.chart" . }}
{{ include "allocd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: {{ .Values.mode }}
{{- end }}

{{- define "allocd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "allocd.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "allocd.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Fails on a mode the chart does not know; returns nothing. */}}
{{- define "allocd.checkMode" -}}
{{- if not (has .Values.mode (list "deployment" "sidecar")) }}
{{- fail (printf "mode must be deployment or sidecar, got %q" .Values.mode) }}
{{- end }}
{{- end }}

{{/* Does the chart render a workload? Not for a sidecar without app containers (config only). */}}
{{- define "allocd.hasWorkload" -}}
{{- if or (eq .Values.mode "deployment") .Values.sidecar.appContainers }}true{{ end }}
{{- end }}

{{/* The most pods that may send at once: the rate limit is split among them. */}}
{{- define "allocd.maxPods" -}}
{{- if and (eq .Values.mode "deployment") .Values.autoscaling.enabled }}
{{- .Values.autoscaling.maxReplicas | int }}
{{- else }}
{{- .Values.replicaCount | int }}
{{- end }}
{{- end }}

{{/* Paths where secrets are mounted (directories; one file per key). */}}
{{- define "allocd.paths" -}}
config: /etc/allocd/allocd.toml
apiKey: /var/run/secrets/allocd/api-key
sasl: /var/run/secrets/allocd/kafka-sasl
tls: /var/run/secrets/allocd/kafka-tls
ingest: /var/run/secrets/allocd/ingest
{{- end }}

{{/*
The effective config: .Values.config plus what the chart derives (secret file paths, the rate-limit share,
sidecar settings). Returned as YAML; callers use `include "allocd.config" . | fromYaml`.
*/}}
{{- define "allocd.config" -}}
{{- $v := .Values }}
{{- $paths := include "allocd.paths" . | fromYaml }}
{{- $cfg := deepCopy (default dict $v.config) }}
{{- range $section := list "kafka" "api" "pipeline" "server" "sidecar" "events" }}
{{- if not (kindIs "map" (get $cfg $section)) }}
{{- $_ := set $cfg $section dict }}
{{- end }}
{{- end }}
{{- if $v.apiKey.existingSecret }}
{{- $_ := set $cfg.api "api_key_file" (printf "%s/%s" $paths.apiKey $v.apiKey.key) }}
{{- end }}
{{- if kindIs "invalid" (index $cfg.api "records_per_second") }}
{{- $pods := include "allocd.maxPods" . | int }}
{{- if lt $pods 1 }}
{{- fail "replicaCount (or autoscaling.maxReplicas) must be at least 1" }}
{{- end }}
{{- /* rounded down to 1/1000 so the sum over all pods never exceeds the organisation's limit */}}
{{- $share := divf (floor (mulf (divf $v.rateLimit.orgRecordsPerSecond $pods) 1000)) 1000 }}
{{- $_ := set $cfg.api "records_per_second" $share }}
{{- end }}
{{- with $v.kafkaAuth.sasl }}
{{- if .existingSecret }}
{{- $_ := set $cfg.kafka "sasl_password_file" (printf "%s/%s" $paths.sasl .passwordKey) }}
{{- end }}
{{- end }}
{{- with $v.kafkaAuth.tls }}
{{- if .existingSecret }}
{{- $_ := set $cfg.kafka "ssl_cafile" (printf "%s/%s" $paths.tls .caKey) }}
{{- if .certKey }}
{{- $_ := set $cfg.kafka "ssl_certfile" (printf "%s/%s" $paths.tls .certKey) }}
{{- end }}
{{- if .keyKey }}
{{- $_ := set $cfg.kafka "ssl_keyfile" (printf "%s/%s" $paths.tls .keyKey) }}
{{- end }}
{{- end }}
{{- end }}
{{- if eq $v.mode "sidecar" }}
{{- $_ := set $cfg.sidecar "enabled" true }}
{{- $_ := set $cfg.sidecar "spool_dir" $v.sidecar.spool.mountPath }}
{{- with $v.sidecar.sharedSecret }}
{{- if .existingSecret }}
{{- $_ := set $cfg.sidecar "shared_secret_file" (printf "%s/%s" $paths.ingest .key) }}
{{- end }}
{{- end }}
{{- if kindIs "invalid" (index $cfg.pipeline "flush_on_shutdown") }}
{{- $_ := set $cfg.pipeline "flush_on_shutdown" true }}
{{- end }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* The metrics/health port from the config (allocd's default 9464). */}}
{{- define "allocd.port" -}}
{{- $cfg := include "allocd.config" . | fromYaml }}
{{- (get $cfg.server "port") | default 9464 | int }}
{{- end }}

{{/* terminationGracePeriodSeconds: the drain deadline plus a margin (plus the app's own, in sidecar mode). */}}
{{- define "allocd.terminationGracePeriodSeconds" -}}
{{- $cfg := include "allocd.config" . | fromYaml }}
{{- $timeout := (get $cfg.pipeline "shutdown_timeout_seconds") | default 30 | float64 | ceil | int }}
{{- $margin := .Values.terminationGracePeriodMarginSeconds | int }}
{{- if lt $margin 1 }}
{{- fail "terminationGracePeriodMarginSeconds must be at least 1: the grace period must exceed the shutdown timeout" }}
{{- end }}
{{- $total := add $timeout $margin }}
{{- if eq .Values.mode "sidecar" }}
{{- $total = add $total (.Values.sidecar.appTerminationGracePeriodSeconds | int) }}
{{- end }}
{{- $total }}
{{- end }}

{{/*
TOML rendering. "allocd.toml.table" takes (dict "path" LIST "table" MAP): the table's scalars and arrays
under a [path] header, then each sub-table, recursively. Keys come out sorted; null values are left out.
*/}}
{{- define "allocd.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{- define "allocd.toml.value" -}}
{{- if kindIs "slice" . }}
{{- range . }}
{{- if or (kindIs "map" .) (kindIs "slice" .) }}
{{- fail "allocd config: arrays may hold only strings, numbers and booleans" }}
{{- end }}
{{- end }}
{{- end }}
{{- toJson . }}
{{- end }}

{{- define "allocd.toml.table" -}}
{{- $path := .path }}
{{- $table := .table }}
{{- $scalars := list }}
{{- $tables := list }}
{{- range $key, $value := $table }}
{{- if kindIs "map" $value }}
{{- $tables = append $tables $key }}
{{- else if not (kindIs "invalid" $value) }}
{{- $scalars = append $scalars $key }}
{{- end }}
{{- end }}
{{- if and $path $scalars }}
{{- $keys := list }}
{{- range $path }}{{ $keys = append $keys (include "allocd.toml.key" .) }}{{ end }}
[{{ join "." $keys }}]
{{- end }}
{{- range $scalars }}
{{ include "allocd.toml.key" . }} = {{ include "allocd.toml.value" (get $table .) }}
{{- end }}
{{- range $tables }}
{{ include "allocd.toml.table" (dict "path" (append $path .) "table" (get $table .)) }}
{{- end }}
{{- end }}

{{- define "allocd.configToml" -}}
{{- $cfg := include "allocd.config" . | fromYaml }}
{{- $out := "# Rendered by the allocd Helm chart from .Values.config; ALLOCD_<SECTION>_<KEY> environment variables win.\n" }}
{{- range $section := list "kafka" "api" "pipeline" "server" "sidecar" "events" }}
{{- $out = printf "%s\n%s\n" $out (include "allocd.toml.table" (dict "path" (list $section) "table" (get $cfg $section))) }}
{{- end }}
{{- regexReplaceAll "\n{3,}" $out "\n\n" | trim }}
{{- end }}

{{/* Volumes shared by every workload shape. */}}
{{- define "allocd.volumes" -}}
- name: config
  configMap:
    name: {{ include "allocd.fullname" . }}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- with .Values.apiKey }}
{{- if .existingSecret }}
- name: api-key
  secret:
    secretName: {{ .existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ .key }}
        path: {{ .key }}
{{- end }}
{{- end }}
{{- with .Values.kafkaAuth.sasl }}
{{- if .existingSecret }}
- name: kafka-sasl
  secret:
    secretName: {{ .existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ .passwordKey }}
        path: {{ .passwordKey }}
{{- end }}
{{- end }}
{{- with .Values.kafkaAuth.tls }}
{{- if .existingSecret }}
- name: kafka-tls
  secret:
    secretName: {{ .existingSecret }}
    defaultMode: 0440
    items:
      {{- range $key := compact (list .caKey .certKey .keyKey) }}
      - key: {{ $key }}
        path: {{ $key }}
      {{- end }}
{{- end }}
{{- end }}
{{- if and (eq .Values.mode "sidecar") .Values.sidecar.sharedSecret.existingSecret }}
- name: ingest-secret
  secret:
    secretName: {{ .Values.sidecar.sharedSecret.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ .Values.sidecar.sharedSecret.key }}
        path: {{ .Values.sidecar.sharedSecret.key }}
{{- end }}
{{- if eq .Values.mode "sidecar" }}
- name: spool
{{- if .Values.sidecar.spool.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.sidecar.spool.existingClaim }}
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.sidecar.spool.sizeLimit }}
{{- end }}
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The allocd container (name, image, args, ports, probes, mounts, security). */}}
{{- define "allocd.container" -}}
{{- $paths := include "allocd.paths" . | fromYaml }}
{{- $port := include "allocd.port" . | int -}}
- name: allocd
  image: {{ include "allocd.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: ["run", "--config", {{ $paths.config | quote }}]
  {{- if and (eq .Values.mode "sidecar") .Values.sidecar.native }}
  restartPolicy: Always
  {{- end }}
  ports:
    - name: metrics
      containerPort: {{ $port }}
      protocol: TCP
  {{- if or .Values.kafkaAuth.sasl.usernameKey .Values.extraEnv }}
  env:
    {{- with .Values.kafkaAuth.sasl }}
    {{- if and .existingSecret .usernameKey }}
    - name: ALLOCD_KAFKA_SASL_USERNAME
      valueFrom:
        secretKeyRef:
          name: {{ .existingSecret }}
          key: {{ .usernameKey }}
    {{- end }}
    {{- end }}
    {{- with .Values.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  {{- with .Values.probes.startup }}
  {{- if .enabled }}
  startupProbe:
    httpGet:
      path: /healthz
      port: metrics
    periodSeconds: {{ .periodSeconds }}
    failureThreshold: {{ .failureThreshold }}
    timeoutSeconds: {{ .timeoutSeconds }}
  {{- end }}
  {{- end }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: metrics
    periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
    failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
    timeoutSeconds: {{ .Values.probes.liveness.timeoutSeconds }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: metrics
    periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
    failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
    timeoutSeconds: {{ .Values.probes.readiness.timeoutSeconds }}
  {{- with .Values.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: config
      mountPath: {{ dir $paths.config }}
      readOnly: true
    - name: tmp
      mountPath: /tmp
    {{- if .Values.apiKey.existingSecret }}
    - name: api-key
      mountPath: {{ $paths.apiKey }}
      readOnly: true
    {{- end }}
    {{- if .Values.kafkaAuth.sasl.existingSecret }}
    - name: kafka-sasl
      mountPath: {{ $paths.sasl }}
      readOnly: true
    {{- end }}
    {{- if .Values.kafkaAuth.tls.existingSecret }}
    - name: kafka-tls
      mountPath: {{ $paths.tls }}
      readOnly: true
    {{- end }}
    {{- if eq .Values.mode "sidecar" }}
    - name: spool
      mountPath: {{ .Values.sidecar.spool.mountPath }}
    {{- if .Values.sidecar.sharedSecret.existingSecret }}
    - name: ingest-secret
      mountPath: {{ $paths.ingest }}
      readOnly: true
    {{- end }}
    {{- end }}
    {{- with .Values.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
