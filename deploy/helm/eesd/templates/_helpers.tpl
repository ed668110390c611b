{{/* The three roles, in the order they are rendered. */}}
{{- define "eesd.roles" -}}controller drafter verifier{{- end -}}

{{/* Python module each role's image runs. */}}
{{- define "eesd.module" -}}
{{- get (dict "controller" "controller" "drafter" "drafter_service" "verifier" "verifier_service") . -}}
{{- end -}}

{{- define "eesd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped prefix of every object name; short enough for "-controller" and pod suffixes. */}}
{{- define "eesd.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains (include "eesd.name" .) .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "eesd.name" .) | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "eesd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "eesd.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Selector labels of one component. Argument: dict "root" $ "role" <component>. */}}
{{- define "eesd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "eesd.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .role }}
{{- end -}}

{{/* Labels of every object of one component. Argument: dict "root" $ "role" <component>. */}}
{{- define "eesd.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{ include "eesd.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: eesd
{{- end -}}

{{/*
The label selector the controller watches EndpointSlices with. EndpointSlices carry the labels of their
Service, so this matches the role's headless Service of this release and nothing else.
*/}}
{{- define "eesd.discoverySelector" -}}
app.kubernetes.io/component={{ .role }},app.kubernetes.io/instance={{ .root.Release.Name }}
{{- end -}}

{{/*
A role's effective service config (YAML): its `config` values plus the wiring the chart computes for the
controller where left empty. Argument: dict "root" $ "role" <role>.
*/}}
{{- define "eesd.config" -}}
{{- $root := .root -}}
{{- $v := index $root.Values .role -}}
{{- $cfg := deepCopy $v.config -}}
{{- $fn := include "eesd.fullname" $root -}}
{{- if eq .role "controller" -}}
  {{- if not $cfg.redisUrl -}}
    {{- if $root.Values.redis.enabled -}}
      {{- $_ := set $cfg "redisUrl" (printf "redis://%s-redis:%d/0" $fn (int $root.Values.redis.port)) -}}
    {{- else -}}
      {{- $_ := set $cfg "redisUrl" "memory://" -}}
    {{- end -}}
  {{- end -}}
  {{- if and $root.Values.redis.caSecret (not $cfg.redisCaFile) -}}
    {{- $_ := set $cfg "redisCaFile" "/etc/eesd/redis-ca/ca.crt" -}}
  {{- end -}}
  {{- if and (hasPrefix "memory://" $cfg.redisUrl) (or (gt (int $v.replicas) 1) $v.autoscaling.enabled) -}}
    {{- fail "controller: memory:// keeps sessions in one process; run one replica or use Redis" -}}
  {{- end -}}
  {{- range $peer := list "drafter" "verifier" -}}
    {{- $pv := index $root.Values $peer -}}
    {{- if and $pv.enabled (not (index $cfg (printf "%ss" $peer))) -}}
      {{- $_ := set $cfg (printf "%ss" $peer) (printf "%s-%s:%d" $fn $peer (int $pv.config.port)) -}}
    {{- end -}}
    {{- if not (index $cfg (printf "%sSelector" $peer)) -}}
      {{- $_ := set $cfg (printf "%sSelector" $peer) (include "eesd.discoverySelector" (dict "root" $root "role" $peer)) -}}
    {{- end -}}
  {{- end -}}
  {{- if not $cfg.namespace -}}
    {{- $_ := set $cfg "namespace" $root.Release.Namespace -}}
  {{- end -}}
{{- end -}}
{{- if and (hasKey $cfg "modelDir") (not $cfg.modelDir) -}}
  {{- $_ := set $cfg "modelDir" $root.Values.model.dir -}}
{{- end -}}
{{- if and (eq .role "drafter") (not $cfg.verifiers) -}}
  {{- $_ := set $cfg "verifiers" (printf "%s-verifier:%d" $fn (int $root.Values.verifier.config.port)) -}}
{{- end -}}
{{- $tls := $root.Values.tls -}}
{{- if $tls.enabled -}}
  {{- /* The Secret's files (mounted at /etc/eesd/tls), mutual TLS inside the release, probes in plain text. */ -}}
  {{- range $key, $file := dict "tlsCertFile" "tls.crt" "tlsKeyFile" "tls.key" "tlsCaFile" "ca.crt" -}}
    {{- if not (index $cfg $key) -}}
      {{- $_ := set $cfg $key (printf "/etc/eesd/tls/%s" $file) -}}
    {{- end -}}
  {{- end -}}
  {{- if not $cfg.tlsClientAuth -}}
    {{- $_ := set $cfg "tlsClientAuth" (ternary $tls.clientAuth $tls.internalClientAuth (eq .role "controller")) -}}
  {{- end -}}
  {{- $_ := set $cfg "internalTls" true -}}
  {{- if not $cfg.internalServerName -}}
    {{- $_ := set $cfg "internalServerName" (printf "%s-internal" $fn) -}}
  {{- end -}}
  {{- /* Nodes: only the release's own certificate may call them, not any other certificate of the CA. */ -}}
  {{- if and (ne .role "controller") $cfg.tlsClientAuth (not $cfg.tlsClientNames) -}}
    {{- $_ := set $cfg "tlsClientNames" $cfg.internalServerName -}}
  {{- end -}}
  {{- if not (int $cfg.healthPort) -}}
    {{- $_ := set $cfg "healthPort" (add (int $cfg.metricsPort) 100) -}}
  {{- end -}}
{{- end -}}
{{- if hasKey $cfg "device" -}}
  {{- if and (gt (int $v.gpus) 0) (ne $cfg.device "cuda") -}}
    {{- fail (printf "%s: gpus > 0 needs config.device cuda" .role) -}}
  {{- end -}}
  {{- if and (eq (int $v.gpus) 0) (eq $cfg.device "cuda") -}}
    {{- fail (printf "%s: config.device cuda needs gpus > 0" .role) -}}
  {{- end -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* A role's ConfigMap: its config as EESD_* variables, unset (empty) fields left out. */}}
{{- define "eesd.configmap" -}}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "eesd.fullname" .root }}-{{ .role }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "eesd.labels" . | nindent 4 }}
data:
  {{- range $key, $value := include "eesd.config" . | fromYaml }}
  {{- if ne (toString $value) "" }}
  EESD_{{ $key | snakecase | upper }}: {{ toString $value | quote }}
  {{- end }}
  {{- end }}
{{- end -}}

{{- define "eesd.image" -}}
{{- $tag := .image.tag | default (printf "%s-%s" .appVersion (ternary "cuda" "cpu" (gt (int .gpus) 0))) -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}

{{/*
One role's Deployment; the same template serves the controller, the drafter and the verifier, whose
differences come from their values (gpus, config.modelDir) and their role (API token, auth secret).
Argument: dict "root" $ "role" <role>.
*/}}
{{- define "eesd.deployment" -}}
{{- $root := .root -}}
{{- $role := .role -}}
{{- $v := index $root.Values $role -}}
{{- $cfg := include "eesd.config" . | fromYaml -}}
{{- $fn := include "eesd.fullname" $root -}}
{{- $resources := deepCopy $v.resources -}}
{{- if gt (int $v.gpus) 0 -}}
  {{- $_ := set $resources "limits" (merge (dict $root.Values.gpuResourceName (int $v.gpus)) ($resources.limits | default dict)) -}}
{{- end -}}
{{- /* The kubelet's gRPC probes speak plain text only: with TLS they use the health port. */ -}}
{{- $grpc := dict "grpc" (dict "port" (int (ternary $cfg.healthPort $cfg.port (gt (int $cfg.healthPort) 0)))) -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $fn }}-{{ $role }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "eesd.labels" . | nindent 4 }}
spec:
  {{- if not $v.autoscaling.enabled }}
  replicas: {{ $v.replicas }}
  {{- end }}
  revisionHistoryLimit: 3
  strategy:
    type: RollingUpdate
    rollingUpdate:
      {{- toYaml $v.rollingUpdate | nindent 6 }}
  selector:
    matchLabels:
      {{- include "eesd.selectorLabels" . | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "eesd.labels" . | nindent 8 }}
        {{- with $v.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        # Rolls the pods when their config changes.
        checksum/config: {{ include "eesd.configmap" . | sha256sum }}
        {{- with $v.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      {{- if eq $role "controller" }}
      serviceAccountName: {{ include "eesd.serviceAccountName" $root }}
      {{- end }}
      # Only the controller talks to the Kubernetes API (discovery).
      automountServiceAccountToken: {{ eq $role "controller" }}
      terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      {{- with $v.runtimeClassName }}
      runtimeClassName: {{ . }}
      {{- end }}
      {{- if and $root.Values.model.source (hasKey $cfg "modelDir") }}
      # The checkpoint is fetched into the model volume at first start (eesd/fetch.py): the verifier's pods
      # fetch it (idempotent, atomic), the other roles wait for it.
      initContainers:
        - name: model
          image: {{ include "eesd.image" (dict "image" $v.image "gpus" $v.gpus "appVersion" $root.Chart.AppVersion) }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          {{- if eq $role "verifier" }}
          command: ["python", "-m", "eesd.fetch", "--source", {{ $root.Values.model.source | quote }}, "--dest", {{ $cfg.modelDir | quote }}]
          {{- else }}
          command: ["python", "-m", "eesd.fetch", "--wait", "--dest", {{ $cfg.modelDir | quote }}]
          {{- end }}
          env:
            - name: HOME
              value: /tmp
            - name: HF_HOME
              value: /tmp/hf
            {{- if and (eq $role "verifier") $root.Values.model.hfTokenSecret }}
            - name: HF_TOKEN
              valueFrom:
                secretKeyRef:
                  name: {{ $root.Values.model.hfTokenSecret }}
                  key: HF_TOKEN
            {{- end }}
            {{- /* The role's own variables (HF_ENDPOINT for a mirror, a proxy) apply to the fetch too. */}}
            {{- with $v.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            - name: model
              mountPath: /models
              readOnly: {{ ne $role "verifier" }}
      {{- end }}
      containers:
        - name: {{ $role }}
          image: {{ include "eesd.image" (dict "image" $v.image "gpus" $v.gpus "appVersion" $root.Chart.AppVersion) }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          command: ["python", "-m", {{ include "eesd.module" $role | quote }}]
          envFrom:
            - configMapRef:
                name: {{ $fn }}-{{ $role }}
          env:
            # Libraries that cache to $HOME write to the writable /tmp, not the read-only root.
            - name: HOME
              value: /tmp
            {{- if ne $role "controller" }}
            # Handshakes and metrics name the pod, not the 0.0.0.0 it listens on.
            - name: EESD_NODE_ID
              valueFrom:
                fieldRef:
                  fieldPath: metadata.name
            {{- end }}
            {{- if and (eq $role "controller") $root.Values.auth.enabled }}
            - name: EESD_AUTH_TOKEN
              valueFrom:
                secretKeyRef:
                  name: {{ $root.Values.auth.existingSecret | default (printf "%s-auth" $fn) }}
                  key: {{ $root.Values.auth.secretKey }}
            {{- end }}
            {{- if $root.Values.internalAuth.enabled }}
            # Sent by the controller and the drafters, required by drafters and verifiers.
            - name: EESD_INTERNAL_TOKEN
              valueFrom:
                secretKeyRef:
                  name: {{ $root.Values.internalAuth.existingSecret | default (printf "%s-internal" $fn) }}
                  key: {{ $root.Values.internalAuth.secretKey }}
            {{- end }}
            {{- with $v.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          ports:
            - name: grpc
              containerPort: {{ int $cfg.port }}
              protocol: TCP
            - name: metrics
              containerPort: {{ int $cfg.metricsPort }}
              protocol: TCP
            {{- if gt (int $cfg.httpPort) 0 }}
            - name: http
              containerPort: {{ int $cfg.httpPort }}
              protocol: TCP
            {{- end }}
            {{- if gt (int $cfg.healthPort) 0 }}
            - name: health
              containerPort: {{ int $cfg.healthPort }}
              protocol: TCP
            {{- end }}
          # grpc.health.v1 answers SERVING only once the model is loaded.
          startupProbe:
            {{- toYaml (merge (deepCopy $v.probes.startup) $grpc) | nindent 12 }}
          readinessProbe:
            {{- toYaml (merge (deepCopy $v.probes.readiness) $grpc) | nindent 12 }}
          livenessProbe:
            {{- toYaml (merge (deepCopy $v.probes.liveness) $grpc) | nindent 12 }}
          lifecycle:
            preStop:
              sleep:
                seconds: {{ $v.preStopSleepSeconds }}
          resources:
            {{- toYaml $resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            - name: shm
              mountPath: /dev/shm
            {{- if hasKey $cfg "modelDir" }}
            - name: model
              mountPath: /models
              readOnly: true
            {{- end }}
            {{- if and (eq $role "controller") $root.Values.redis.caSecret }}
            - name: redis-ca
              mountPath: /etc/eesd/redis-ca
              readOnly: true
            {{- end }}
            {{- if $root.Values.tls.enabled }}
            # A Secret volume: a renewed certificate appears here and is served from the next connection on.
            - name: tls
              mountPath: /etc/eesd/tls
              readOnly: true
            {{- end }}
            {{- with $v.extraVolumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        - name: tmp
          emptyDir: {}
        - name: shm
          emptyDir:
            medium: Memory
            sizeLimit: {{ $v.shmSize }}
        {{- if hasKey $cfg "modelDir" }}
        - name: model
          {{- with $root.Values.model.volume }}
          {{- toYaml . | nindent 10 }}
          {{- else }}
          persistentVolumeClaim:
            claimName: {{ $root.Values.model.claimName }}
            # Writable only where the checkpoint is fetched (the verifier's init container); mounts stay read-only.
            readOnly: {{ not (and $root.Values.model.source (eq $role "verifier")) }}
          {{- end }}
        {{- end }}
        {{- if and (eq $role "controller") $root.Values.redis.caSecret }}
        - name: redis-ca
          secret:
            secretName: {{ $root.Values.redis.caSecret }}
            items:
              - key: ca.crt
                path: ca.crt
        {{- end }}
        {{- if $root.Values.tls.enabled }}
        - name: tls
          secret:
            secretName: {{ $root.Values.tls.secretName | default (printf "%s-tls" $fn) }}
        {{- end }}
        {{- with $v.extraVolumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
{{- end -}}
