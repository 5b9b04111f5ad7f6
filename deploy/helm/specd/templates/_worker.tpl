{{/*
One gRPC worker (oracle or draft): its Deployment, its headless Service and its
PodDisruptionBudget. Call with (dict "root" $ "role" "oracle").
A session's KV cache lives in one replica, so the coordinator must know every replica by
its own address: the "register" sidecar registers the pod (name and IP) with the
coordinator, and the preStop hook drains it there. The Service is headless for the same
reason (per-pod DNS records, metrics scraping), never a load balancer in front of sessions.
*/}}
{{- define "specd.worker" -}}
{{- $root := .root -}}
{{- $role := .role -}}
{{- $w := index $root.Values $role -}}
{{- $name := printf "%s-%s" (include "specd.fullname" $root) $role -}}
{{- $ctx := dict "root" $root "component" $role -}}
{{- $prefix := printf "SPECD_%s_" (upper $role) -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $name }}
  labels:
    {{- include "specd.labels" $ctx | nindent 4 }}
spec:
  replicas: {{ $w.replicas }}
  revisionHistoryLimit: 5
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: {{ $w.updateStrategy.maxSurge }}
      maxUnavailable: {{ $w.updateStrategy.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "specd.selectorLabels" $ctx | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "specd.selectorLabels" $ctx | nindent 8 }}
        {{- with $w.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        # Settings are read at start: roll the pods when this role's settings change.
        checksum/config: {{ toJson $w | sha256sum }}
        checksum/scripts: {{ ($root.Files.Glob "files/*.sh").AsConfig | sha256sum }}
        prometheus.io/scrape: "true"
        prometheus.io/port: {{ $w.metricsPort | quote }}
        {{- with $w.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "specd.serviceAccountName" $root }}
      automountServiceAccountToken: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
      {{- range . }}
      - name: {{ . }}
      {{- end }}
      {{- end }}
      terminationGracePeriodSeconds: {{ $w.terminationGracePeriodSeconds }}
      securityContext:
        runAsNonRoot: true
        runAsUser: 10001
        runAsGroup: 10001
        fsGroup: 10001
        seccompProfile:
          type: RuntimeDefault
      {{- with $w.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $w.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $w.tolerations }}
      tolerations:
      {{- toYaml . | nindent 6 }}
      {{- end }}
      containers:
      - name: {{ $role }}
        image: "{{ $root.Values.image.worker.repository }}:{{ $root.Values.image.worker.tag }}"
        imagePullPolicy: {{ $root.Values.image.worker.pullPolicy }}
        command: ["specd", "serve", {{ $role | quote }}]
        ports:
        - name: grpc
          containerPort: {{ $w.port }}
          protocol: TCP
        - name: metrics
          containerPort: {{ $w.metricsPort }}
          protocol: TCP
        envFrom:
        - configMapRef:
            name: {{ include "specd.configMapName" $root }}
        env:
        - name: {{ $prefix }}HOST
          value: "0.0.0.0"
        - name: {{ $prefix }}PORT
          value: {{ $w.port | quote }}
        - name: {{ $prefix }}METRICS_PORT
          value: {{ $w.metricsPort | quote }}
        - name: HF_HOME
          value: /var/cache/specd/huggingface
        {{- include "specd.workerIdentityEnv" (dict "root" $root "role" $role) | nindent 8 }}
        - name: DRAIN_MIGRATE
          value: {{ $w.drain.migrate | quote }}
        - name: DRAIN_TIMEOUT_SECONDS
          value: {{ $w.drain.timeoutSeconds | quote }}
        - name: ENDPOINT_DELAY_SECONDS
          value: {{ $w.drain.endpointDelaySeconds | quote }}
        {{- with include "specd.secretEnv" (dict "root" $root "auth" (list "worker" "admin")) | trim }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- with $w.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        # grpc.health.v1 on the gRPC port, overall status (service ""): SERVING once the
        # model is loaded, NOT_SERVING from SIGTERM on.
        startupProbe:
          grpc:
            port: {{ $w.port }}
            service: ""
          periodSeconds: {{ $w.startupProbe.periodSeconds }}
          failureThreshold: {{ $w.startupProbe.failureThreshold }}
        readinessProbe:
          grpc:
            port: {{ $w.port }}
            service: ""
          periodSeconds: {{ $w.readinessProbe.periodSeconds }}
          failureThreshold: {{ $w.readinessProbe.failureThreshold }}
        livenessProbe:
          grpc:
            port: {{ $w.port }}
            service: ""
          periodSeconds: {{ $w.livenessProbe.periodSeconds }}
          failureThreshold: {{ $w.livenessProbe.failureThreshold }}
          timeoutSeconds: {{ $w.livenessProbe.timeoutSeconds }}
        lifecycle:
          preStop:
            exec:
              {{- if $w.drain.enabled }}
              command: ["/bin/sh", "/etc/specd/scripts/drain.sh"]
              {{- else }}
              command: ["sleep", {{ $w.drain.endpointDelaySeconds | quote }}]
              {{- end }}
        resources:
          {{- toYaml $w.resources | nindent 10 }}
        securityContext:
          {{- include "specd.containerSecurityContext" $root | nindent 10 }}
        volumeMounts:
        - name: cache
          mountPath: /var/cache/specd
        - name: tmp
          mountPath: /tmp
        - name: scripts
          mountPath: /etc/specd/scripts
          readOnly: true
        {{- with include "specd.secretVolumeMounts" (dict "root" $root "auth" (list "worker" "admin")) | trim }}
        {{- . | nindent 8 }}
        {{- end }}
      {{- if $root.Values.registration.enabled }}
      - name: register
        image: "{{ $root.Values.image.worker.repository }}:{{ $root.Values.image.worker.tag }}"
        imagePullPolicy: {{ $root.Values.image.worker.pullPolicy }}
        command: ["/bin/sh", "/etc/specd/scripts/register.sh"]
        env:
        {{- include "specd.workerIdentityEnv" (dict "root" $root "role" $role) | nindent 8 }}
        - name: REGISTER_INTERVAL_SECONDS
          value: {{ $root.Values.registration.intervalSeconds | quote }}
        {{- with include "specd.secretEnv" (dict "root" $root "auth" (list "admin")) | trim }}
        {{- . | nindent 8 }}
        {{- end }}
        resources:
          {{- toYaml $root.Values.registration.resources | nindent 10 }}
        securityContext:
          {{- include "specd.containerSecurityContext" $root | nindent 10 }}
        volumeMounts:
        - name: scripts
          mountPath: /etc/specd/scripts
          readOnly: true
        - name: tmp
          mountPath: /tmp
        {{- with include "specd.secretVolumeMounts" (dict "root" $root "auth" (list "admin")) | trim }}
        {{- . | nindent 8 }}
        {{- end }}
      {{- end }}
      volumes:
      - name: cache
        {{- if $w.cache.existingClaim }}
        persistentVolumeClaim:
          claimName: {{ $w.cache.existingClaim }}
        {{- else }}
        emptyDir:
          sizeLimit: {{ $w.cache.sizeLimit }}
        {{- end }}
      - name: tmp
        emptyDir:
          sizeLimit: 1Gi
      - name: scripts
        configMap:
          name: {{ include "specd.fullname" $root }}-scripts
          defaultMode: 0555
      {{- with include "specd.secretVolumes" (dict "root" $root "auth" (list "worker" "admin")) | trim }}
      {{- . | nindent 6 }}
      {{- end }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ $name }}
  labels:
    {{- include "specd.labels" $ctx | nindent 4 }}
spec:
  clusterIP: None
  selector:
    {{- include "specd.selectorLabels" $ctx | nindent 4 }}
  ports:
  - name: grpc
    port: {{ $w.port }}
    targetPort: grpc
    protocol: TCP
  - name: metrics
    port: {{ $w.metricsPort }}
    targetPort: metrics
    protocol: TCP
{{- if $w.podDisruptionBudget.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ $name }}
  labels:
    {{- include "specd.labels" $ctx | nindent 4 }}
spec:
  {{- if hasKey $w.podDisruptionBudget "minAvailable" }}
  minAvailable: {{ $w.podDisruptionBudget.minAvailable }}
  {{- else }}
  maxUnavailable: {{ $w.podDisruptionBudget.maxUnavailable }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "specd.selectorLabels" $ctx | nindent 6 }}
{{- end }}
{{- end -}}
