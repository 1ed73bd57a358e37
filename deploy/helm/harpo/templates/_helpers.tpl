{{/* ---------------------------------------------------------------- names and labels */}}

{{- define "harpo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{/*
Full name; kept at 40 characters because KubeRay derives longer names (head service, worker
pods, the RayJob's generated RayCluster) from it and Kubernetes caps names at 63.
*/}}
{{- define "harpo.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "harpo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "harpo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "harpo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "harpo.labels" -}}
helm.sh/chart: {{ include "harpo.chart" . }}
{{ include "harpo.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: harpo
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "harpo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "harpo.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "harpo.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | toString) }}
{{- end }}

{{- define "harpo.tokenSecretName" -}}
{{- default (printf "%s-control-token" (include "harpo.fullname" .)) .Values.control.token.existingSecret }}
{{- end }}

{{- define "harpo.claimName" -}}
{{- default (printf "%s-workspace" (include "harpo.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{/* Name of the RayCluster of mode: cluster; KubeRay names its head Service NAME-head-svc. */}}
{{- define "harpo.clusterName" -}}
{{- include "harpo.fullname" . }}
{{- end }}

{{/* ---------------------------------------------------------------- training config */}}

{{/*
The training config as the driver reads it: the user's `config` with the deployment-dependent
fields filled in (metrics and control endpoints, token source, TLS files, run directory).
*/}}
{{- define "harpo.trainConfig" -}}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- $obs := dig "observability" dict $cfg }}
{{- $_ := set $obs "metrics_host" "0.0.0.0" }}
{{- $_ := set $obs "metrics_port" (int .Values.metrics.port) }}
{{- $_ := set $cfg "observability" $obs }}
{{- if .Values.control.enabled }}
{{- $ctl := dig "control" dict $cfg }}
{{- $_ := set $ctl "host" "0.0.0.0" }}
{{- $_ := set $ctl "port" (int .Values.control.port) }}
{{- $_ := set $ctl "token_env" "HARPO_CONTROL_TOKEN" }}
{{- $_ := unset $ctl "token_file" }}
{{- if .Values.control.tls.secretName }}
{{- $_ := set $ctl "tls_cert" "/etc/harpo-tls/tls.crt" }}
{{- $_ := set $ctl "tls_key" "/etc/harpo-tls/tls.key" }}
{{- end }}
{{- $_ := set $cfg "control" $ctl }}
{{- end }}
{{- $run := dig "run" dict $cfg }}
{{- if not (hasKey $run "output_dir") }}
{{- $_ := set $run "output_dir" (printf "%s/runs/%s" (trimSuffix "/" .Values.persistence.mountPath) (default "harpo" $run.name)) }}
{{- end }}
{{- $_ := set $cfg "run" $run }}
{{- toYaml $cfg }}
{{- end }}

{{/* The exact content of /etc/harpo/config.yaml (the ConfigMap's config.yaml). */}}
{{- define "harpo.configFile" -}}
# harpo training config, rendered by the harpo chart from the values' `config`
{{ include "harpo.trainConfig" . }}
{{ end }}

{{/*
Entrypoint of a run on the long-lived cluster (mode: cluster). After `helm upgrade` the head
pod's mounted ConfigMap catches up only after the kubelet's sync period (about a minute): wait
(at most 5 minutes) until /etc/harpo/config.yaml is this revision's, then train.
*/}}
{{- define "harpo.clusterEntrypoint" -}}
{{- $sum := include "harpo.configFile" . | sha256sum -}}
i=0; until echo '{{ $sum }}  /etc/harpo/config.yaml' | sha256sum -c --status; do i=$((i+1)); if [ $i -gt 60 ]; then echo 'harpo: /etc/harpo/config.yaml on the head is not this release revision config' >&2; exit 1; fi; sleep 5; done; exec {{ include "harpo.entrypoint" . }}
{{- end }}

{{/* The Ray job's entrypoint (a shell command line). */}}
{{- define "harpo.entrypoint" -}}
{{- $args := list "harpo" "train" "/etc/harpo/config.yaml" "--address" "auto" }}
{{- range .Values.extraArgs }}
{{- $args = append $args (squote .) }}
{{- end }}
{{- join " " $args }}
{{- end }}

{{/* ---------------------------------------------------------------- pod pieces */}}

{{/* Environment of every Ray container. */}}
{{- define "harpo.env" -}}
- name: RAY_AUTH_MODE
  value: {{ .Values.rayAuthMode | quote }}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: HF_HOME
  value: /tmp/.cache/huggingface
- name: TORCHINDUCTOR_CACHE_DIR
  value: /tmp/.cache/torchinductor
- name: TRITON_CACHE_DIR
  value: /tmp/.cache/triton
- name: VLLM_CACHE_ROOT
  value: /tmp/.cache/vllm
- name: MPLCONFIGDIR
  value: /tmp/.cache/matplotlib
- name: HARPO_CONFIG
  value: /etc/harpo/config.yaml
{{- with .Values.checkpointUri }}
- name: HARPO_CHECKPOINT_URI
  value: {{ . | quote }}
{{- end }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Volume mounts of every Ray container. */}}
{{- define "harpo.volumeMounts" -}}
- name: config
  mountPath: /etc/harpo
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: ray-tmp
  mountPath: /tmp/ray
- name: dshm
  mountPath: /dev/shm
- name: workspace
  mountPath: {{ .Values.persistence.mountPath }}
{{- end }}

{{/* Volumes of every Ray pod. */}}
{{- define "harpo.volumes" -}}
- name: config
  configMap:
    name: {{ include "harpo.fullname" . }}-config
- name: tmp
  emptyDir: {}
- name: ray-tmp
  emptyDir:
    sizeLimit: {{ .Values.rayTmpSizeLimit }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shmSize }}
- name: workspace
{{- if .Values.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "harpo.claimName" . }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}

{{/* Pod-level settings shared by every pod (service account, security, pull secrets). */}}
{{- define "harpo.podCommon" -}}
serviceAccountName: {{ include "harpo.serviceAccountName" . }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Scheduling of one group: nodeSelector, tolerations, affinity. Argument: the group values. */}}
{{- define "harpo.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Container resources with GPUs. Argument: dict "root" $ "group" <values> */}}
{{- define "harpo.resources" -}}
{{- $res := deepCopy (.group.resources | default dict) }}
{{- $gpus := int (.group.gpus | default 0) }}
{{- if gt $gpus 0 }}
{{- $gpuName := .root.Values.gpuResourceName }}
{{- $limits := $res.limits | default dict }}
{{- $_ := set $limits $gpuName $gpus }}
{{- $_ := set $res "limits" $limits }}
{{- $requests := $res.requests | default dict }}
{{- $_ := set $requests $gpuName $gpus }}
{{- $_ := set $res "requests" $requests }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* `ray start` parameters of a worker group. Argument: dict "root" $ "group" <values> */}}
{{- define "harpo.workerRayStartParams" -}}
{{- $params := dict "metrics-export-port" (toString .root.Values.rayMetricsPort) }}
{{- with .group.rayResources }}
{{- /* KubeRay pastes the value into a shell command line: a quoted JSON object */}}
{{- $_ := set $params "resources" (printf "%q" (toJson .)) }}
{{- end }}
{{- range $k, $v := .group.rayStartParams }}
{{- $_ := set $params $k (toString $v) }}
{{- end }}
{{- toYaml $params }}
{{- end }}

{{/*
A worker group of the RayCluster spec.
Argument: dict "root" $ "name" <group name> "group" <values> "replicas" "min" "max"
*/}}
{{- define "harpo.workerGroup" -}}
{{- $root := .root -}}
- groupName: {{ .name }}
  replicas: {{ .replicas }}
  minReplicas: {{ .min }}
  maxReplicas: {{ .max }}
  {{- if and $root.Values.autoscaling.enabled (eq .name "rollout") }}
  idleTimeoutSeconds: {{ $root.Values.autoscaling.idleTimeoutSeconds }}
  {{- end }}
  rayStartParams:
    {{- include "harpo.workerRayStartParams" (dict "root" $root "group" .group) | nindent 4 }}
  template:
    metadata:
      labels:
        {{- include "harpo.labels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ .name }}
        {{- with .group.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with .group.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      {{- include "harpo.podCommon" $root | nindent 6 }}
      {{- with include "harpo.scheduling" .group | trim }}
      {{- . | nindent 6 }}
      {{- end }}
      containers:
        - name: ray-worker
          image: {{ include "harpo.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          resources:
            {{- include "harpo.resources" (dict "root" $root "group" .group) | nindent 12 }}
          ports:
            - name: metrics
              containerPort: {{ $root.Values.rayMetricsPort }}
              protocol: TCP
          env:
            {{- include "harpo.env" $root | nindent 12 }}
          {{- with $root.Values.envFrom }}
          envFrom:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          volumeMounts:
            {{- include "harpo.volumeMounts" $root | nindent 12 }}
      volumes:
        {{- include "harpo.volumes" $root | nindent 8 }}
{{- end }}

{{/* The RayCluster spec, shared by the RayCluster (mode: cluster) and the RayJob. */}}
{{- define "harpo.rayClusterSpec" -}}
{{- $root := . }}
{{- $v := .Values -}}
rayVersion: {{ $v.rayVersion | quote }}
enableInTreeAutoscaling: {{ $v.autoscaling.enabled }}
{{- if $v.autoscaling.enabled }}
autoscalerOptions:
  upscalingMode: {{ $v.autoscaling.upscalingMode }}
  idleTimeoutSeconds: {{ $v.autoscaling.idleTimeoutSeconds }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  resources:
    {{- toYaml $v.autoscaling.resources | nindent 4 }}
  securityContext:
    {{- toYaml $v.securityContext | nindent 4 }}
  env:
    - name: RAY_AUTH_MODE
      value: {{ $v.rayAuthMode | quote }}
    - name: HOME
      value: /tmp
  # share the head's /tmp/ray (KubeRay would otherwise give the sidecar a separate one)
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    - name: ray-tmp
      mountPath: /tmp/ray
{{- end }}
{{- with $v.gcsFaultTolerance }}{{ if .enabled }}
gcsFaultToleranceOptions:
  redisAddress: {{ .redisAddress | quote }}
  {{- with .redisPasswordSecret }}
  redisPassword:
    valueFrom:
      secretKeyRef:
        name: {{ . | quote }}
        key: password
  {{- end }}
{{- end }}{{ end }}
headGroupSpec:
  rayStartParams:
    dashboard-host: "0.0.0.0"
    metrics-export-port: {{ $v.rayMetricsPort | toString | quote }}
    {{- range $k, $val := $v.head.rayStartParams }}
    {{ $k }}: {{ $val | toString | quote }}
    {{- end }}
  template:
    metadata:
      labels:
        {{- include "harpo.labels" $root | nindent 8 }}
        app.kubernetes.io/component: head
        {{- with $v.head.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        # the config this pod was created with
        harpo.io/config-checksum: {{ include "harpo.configFile" $root | sha256sum }}
        {{- with $v.head.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      {{- include "harpo.podCommon" $root | nindent 6 }}
      # the autoscaler sidecar talks to the Kubernetes API with this pod's service account
      automountServiceAccountToken: {{ $v.autoscaling.enabled }}
      {{- with include "harpo.scheduling" $v.head | trim }}
      {{- . | nindent 6 }}
      {{- end }}
      {{- if $v.prepare.enabled }}
      initContainers:
        - name: prepare
          image: {{ include "harpo.image" $root }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          command:
            {{- toYaml $v.prepare.command | nindent 12 }}
          securityContext:
            {{- toYaml $v.securityContext | nindent 12 }}
          resources:
            {{- toYaml $v.head.resources | nindent 12 }}
          env:
            {{- include "harpo.env" $root | nindent 12 }}
          volumeMounts:
            {{- include "harpo.volumeMounts" $root | nindent 12 }}
      {{- end }}
      containers:
        - name: ray-head
          image: {{ include "harpo.image" $root }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          securityContext:
            {{- toYaml $v.securityContext | nindent 12 }}
          resources:
            {{- toYaml $v.head.resources | nindent 12 }}
          ports:
            - name: gcs-server
              containerPort: 6379
              protocol: TCP
            - name: dashboard
              containerPort: 8265
              protocol: TCP
            - name: client
              containerPort: 10001
              protocol: TCP
            - name: metrics
              containerPort: {{ $v.rayMetricsPort }}
              protocol: TCP
            - name: harpo-metrics
              containerPort: {{ $v.metrics.port }}
              protocol: TCP
            {{- if $v.control.enabled }}
            - name: harpo-control
              containerPort: {{ $v.control.port }}
              protocol: TCP
            {{- end }}
          env:
            {{- include "harpo.env" $root | nindent 12 }}
            {{- if $v.control.enabled }}
            - name: HARPO_CONTROL_TOKEN
              valueFrom:
                secretKeyRef:
                  name: {{ include "harpo.tokenSecretName" $root }}
                  key: {{ $v.control.token.secretKey }}
            {{- end }}
          {{- with $v.envFrom }}
          envFrom:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          volumeMounts:
            {{- include "harpo.volumeMounts" $root | nindent 12 }}
            {{- if and $v.control.enabled $v.control.tls.secretName }}
            - name: control-tls
              mountPath: /etc/harpo-tls
              readOnly: true
            {{- end }}
      volumes:
        {{- include "harpo.volumes" $root | nindent 8 }}
        {{- if and $v.control.enabled $v.control.tls.secretName }}
        - name: control-tls
          secret:
            secretName: {{ $v.control.tls.secretName }}
            defaultMode: 0440
        {{- end }}
workerGroupSpecs:
  {{- $rolloutMin := int $v.rollout.minReplicas }}
  {{- $rolloutMax := int $v.rollout.maxReplicas }}
  {{- $rolloutReplicas := $rolloutMin }}
  {{- if not (kindIs "invalid" $v.rollout.replicas) }}
  {{- $rolloutReplicas = int $v.rollout.replicas }}
  {{- end }}
  {{- if not $v.autoscaling.enabled }}
  {{- $rolloutMin = $rolloutReplicas }}
  {{- $rolloutMax = $rolloutReplicas }}
  {{- end }}
  {{- include "harpo.workerGroup" (dict "root" $root "name" "rollout" "group" $v.rollout "replicas" $rolloutReplicas "min" $rolloutMin "max" $rolloutMax) | nindent 2 }}
  {{- /* a fixed-size group of 0 pods is left out (its actors live in another group) */}}
  {{- $n := int $v.learner.replicas }}
  {{- if gt $n 0 }}
  {{- include "harpo.workerGroup" (dict "root" $root "name" "learner" "group" $v.learner "replicas" $n "min" $n "max" $n) | nindent 2 }}
  {{- end }}
  {{- $n = int $v.reward.replicas }}
  {{- if gt $n 0 }}
  {{- include "harpo.workerGroup" (dict "root" $root "name" "reward" "group" (merge (dict "gpus" 0) $v.reward) "replicas" $n "min" $n "max" $n) | nindent 2 }}
  {{- end }}
{{- end }}

{{/* The submitter pod's security/resources (RayJob submitterPodTemplate, mode: cluster Job). */}}
{{- define "harpo.submitterContainerCommon" -}}
image: {{ include "harpo.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
resources:
  {{- toYaml .Values.submitter.resources | nindent 2 }}
{{- end }}
