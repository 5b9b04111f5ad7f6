{{/* Names, labels and addresses shared by every template. */}}

{{- define "specd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "specd.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "specd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels for one component: call with (dict "root" $ "component" "oracle"). */}}
{{- define "specd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "specd.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "specd.labels" -}}
{{ include "specd.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: specd
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ include "specd.chart" .root }}
{{- end -}}

{{- define "specd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "specd.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "specd.configMapName" -}}
{{- printf "%s-config" (include "specd.fullname" .) -}}
{{- end -}}

{{/* In-cluster DNS name of a component's Service: call with (dict "root" $ "component" "draft"). */}}
{{- define "specd.serviceHost" -}}
{{- printf "%s-%s.%s.svc.%s" (include "specd.fullname" .root) .component .root.Release.Namespace .root.Values.clusterDomain -}}
{{- end -}}

{{/* Who this worker pod is, for specctl (SPECD_ADDRESS is specctl's coordinator). */}}
{{- define "specd.workerIdentityEnv" -}}
{{- $w := index .root.Values .role -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: WORKER_ROLE
  value: {{ .role }}
- name: WORKER_ADDRESS
  value: "$(POD_IP):{{ $w.port }}"
- name: SPECD_ADDRESS
  value: {{ include "specd.coordinatorAddress" .root | quote }}
{{- end -}}

{{- define "specd.coordinatorAddress" -}}
{{- printf "%s:%d" (include "specd.serviceHost" (dict "root" . "component" "coordinator")) (int .Values.coordinator.port) -}}
{{- end -}}

{{- define "specd.raySecurityContext" -}}
allowPrivilegeEscalation: false
capabilities:
  drop:
  - ALL
{{- end -}}

{{- define "specd.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
  - ALL
{{- end -}}

{{/* Environment shared by every specd process: secret references, never secret values. */}}
{{/*
Secrets a container or pod needs. Called with (dict "root" $ "auth" (list ROLE...)): the roles whose
tokens it holds (client: SPECD_AUTH_TOKEN_FILE, admin: SPECD_ADMIN_TOKEN_FILE, worker:
SPECD_WORKER_TOKEN_FILE; specd/rpc/security.py), each mounted read-only under /etc/specd/auth/ROLE.
*/}}
{{- define "specd.authFiles" -}}
{{- $files := dict "client" "SPECD_AUTH_TOKEN_FILE" "admin" "SPECD_ADMIN_TOKEN_FILE" "worker" "SPECD_WORKER_TOKEN_FILE" -}}
{{- $auth := .root.Values.secrets.auth -}}
{{- if $auth.enabled -}}
{{- range .auth }}
{{ . }}: {{ get $files . }}
{{- end }}
{{- end -}}
{{- end -}}

{{- define "specd.secretEnv" -}}
{{- $root := .root -}}
{{- with $root.Values.secrets.huggingFace.existingSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $root.Values.secrets.huggingFace.key }}
{{- end }}
{{- range $role, $variable := include "specd.authFiles" . | fromYaml }}
- name: {{ $variable }}
  value: /etc/specd/auth/{{ $role }}/{{ (get $root.Values.secrets.auth $role).key }}
{{- end }}
{{- if $root.Values.secrets.tls.existingSecret }}
- name: SPECD_TLS_CERT_FILE
  value: /etc/specd/tls/tls.crt
- name: SPECD_TLS_KEY_FILE
  value: /etc/specd/tls/tls.key
- name: SPECD_TLS_CA_FILE
  value: /etc/specd/tls/ca.crt
{{- end }}
{{- end -}}

{{- define "specd.secretVolumeMounts" -}}
{{- range $role, $variable := include "specd.authFiles" . | fromYaml }}
- name: auth-{{ $role }}
  mountPath: /etc/specd/auth/{{ $role }}
  readOnly: true
{{- end }}
{{- if .root.Values.secrets.tls.existingSecret }}
- name: tls
  mountPath: /etc/specd/tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "specd.secretVolumes" -}}
{{- $root := .root -}}
{{- range $role, $variable := include "specd.authFiles" . | fromYaml }}
{{- $ref := get $root.Values.secrets.auth $role }}
- name: auth-{{ $role }}
  secret:
    secretName: {{ $ref.existingSecret }}
    defaultMode: 0440
    items:
    - key: {{ $ref.key }}
      path: {{ $ref.key }}
{{- end }}
{{- with $root.Values.secrets.tls.existingSecret }}
- name: tls
  secret:
    secretName: {{ . }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{/*
Refuse settings that would drop requests or that the workers would reject:
the pod must outlive drain + endpoint delay + the worker's own grace period,
and the coordinator must never ask for a depth the workers refuse.
*/}}
{{- define "specd.validate" -}}
{{- range $role := list "oracle" "draft" -}}
{{- $w := index $.Values $role -}}
{{- $needed := int $w.graceSeconds -}}
{{- if $w.drain.enabled -}}
{{- $needed = add $needed $w.drain.timeoutSeconds $w.drain.endpointDelaySeconds -}}
{{- end -}}
{{- if le (int $w.terminationGracePeriodSeconds) (int $needed) -}}
{{- fail (printf "%s.terminationGracePeriodSeconds (%d) must exceed drain.timeoutSeconds + drain.endpointDelaySeconds + graceSeconds (%d)" $role (int $w.terminationGracePeriodSeconds) (int $needed)) -}}
{{- end -}}
{{- if gt (int $.Values.coordinator.maxDepth) (int $w.maxDepth) -}}
{{- fail (printf "coordinator.maxDepth (%d) exceeds %s.maxDepth (%d): the %s would reject those rounds" (int $.Values.coordinator.maxDepth) $role (int $w.maxDepth) $role) -}}
{{- end -}}
{{- end -}}
{{- $c := .Values.coordinator -}}
{{- if le (int $c.terminationGracePeriodSeconds) (add (int $c.graceSeconds) 5) -}}
{{- fail (printf "coordinator.terminationGracePeriodSeconds (%d) must exceed graceSeconds + 5 s of endpoint delay (%d)" (int $c.terminationGracePeriodSeconds) (add (int $c.graceSeconds) 5)) -}}
{{- end -}}
{{- if and (not .Values.registration.enabled) (or (empty $c.drafts) (empty $c.oracles)) -}}
{{- fail "with registration.enabled=false the coordinator needs coordinator.drafts and coordinator.oracles" -}}
{{- end -}}
{{- if hasPrefix "fixed:" .Values.coordinator.depthPolicy -}}
{{- $k := trimPrefix "fixed:" .Values.coordinator.depthPolicy | int -}}
{{- if gt $k (int .Values.coordinator.maxDepth) -}}
{{- fail (printf "coordinator.depthPolicy %s exceeds coordinator.maxDepth (%d)" .Values.coordinator.depthPolicy (int .Values.coordinator.maxDepth)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* What the coordinator reads at start: a change rolls the head, and only the head. */}}
{{- define "specd.coordinatorChecksum" -}}
{{- .Values.coordinator | toJson | sha256sum -}}
{{- end -}}
