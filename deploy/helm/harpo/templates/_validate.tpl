{{/*
Cross-field checks that values.schema.json cannot express. Each failure names the values
involved, what they are and what is allowed. Included once, from configmap.yaml.
*/}}
{{- define "harpo.validate" -}}
{{- $v := .Values }}
{{- $errors := list }}

{{- /* rollout: minReplicas ≤ replicas ≤ maxReplicas */}}
{{- $min := int $v.rollout.minReplicas }}
{{- $max := int $v.rollout.maxReplicas }}
{{- if gt $min $max }}
{{- $errors = append $errors (printf "rollout.minReplicas (%d) must be ≤ rollout.maxReplicas (%d)" $min $max) }}
{{- end }}
{{- if not (kindIs "invalid" $v.rollout.replicas) }}
{{- $r := int $v.rollout.replicas }}
{{- if or (lt $r $min) (gt $r $max) }}
{{- $errors = append $errors (printf "rollout.replicas (%d) must lie between rollout.minReplicas (%d) and rollout.maxReplicas (%d)" $r $min $max) }}
{{- end }}
{{- end }}

{{- /* checkpoints must survive the pod */}}
{{- if and (not $v.persistence.enabled) (not $v.checkpointUri) }}
{{- $errors = append $errors "checkpoints would be lost with the pods: set persistence.enabled=true (a PVC) or checkpointUri (an object store)" }}
{{- end }}
{{- if and $v.gcsFaultTolerance.enabled (not $v.gcsFaultTolerance.redisAddress) }}
{{- $errors = append $errors "gcsFaultTolerance.enabled needs gcsFaultTolerance.redisAddress (host:port of the Redis that keeps the GCS state)" }}
{{- end }}
{{- if and $v.persistence.enabled (not $v.persistence.existingClaim) (not $v.persistence.size) }}
{{- $errors = append $errors "persistence.size is required when the chart creates the claim (persistence.existingClaim is empty)" }}
{{- end }}

{{- /* the chart owns the endpoints the Service and the probes rely on */}}
{{- $cfg := $v.config | default dict }}
{{- $obs := dig "observability" dict $cfg }}
{{- if and (hasKey $obs "metrics_port") (ne (toString (int $obs.metrics_port)) (toString (int $v.metrics.port))) }}
{{- $errors = append $errors (printf "config.observability.metrics_port (%v) differs from metrics.port (%v): set only metrics.port, the chart writes it into the config" $obs.metrics_port $v.metrics.port) }}
{{- end }}
{{- if $v.control.enabled }}
{{- $ctl := dig "control" dict $cfg }}
{{- if and (hasKey $ctl "port") (ne (toString (int $ctl.port)) (toString (int $v.control.port))) }}
{{- $errors = append $errors (printf "config.control.port (%v) differs from control.port (%v): set only control.port, the chart writes it into the config" $ctl.port $v.control.port) }}
{{- end }}
{{- if and $v.control.token.value $v.control.token.existingSecret }}
{{- $errors = append $errors "give either control.token.value or control.token.existingSecret, not both" }}
{{- end }}
{{- end }}

{{- /* actors pinned by Ray custom resources need enough of them in the worker groups */}}
{{- $demand := dict }}
{{- $askers := dict }}
{{- range $role := list "rollout" "learner" "reward" }}
{{- $section := dig $role dict $cfg }}
{{- $count := 0 }}
{{- if eq $role "reward" }}
{{- $count = int (dig "scorers" 1 $section) }}
{{- else }}
{{- $count = int (dig "workers" (ternary 2 1 (eq $role "rollout")) $section) }}
{{- end }}
{{- range $res, $need := (dig "resources" dict $section) }}
{{- $_ := set $demand $res (addf (get $demand $res | default 0.0) (mulf $count $need)) }}
{{- $_ := set $askers $res (append (get $askers $res | default list) (printf "config.%s: %d × %v" $role $count $need)) }}
{{- end }}
{{- end }}
{{- range $res, $need := $demand }}
{{- $supply := 0.0 }}
{{- $offers := list }}
{{- range $role := list "rollout" "learner" "reward" }}
{{- $group := index $v $role }}
{{- $pods := ternary (int $group.maxReplicas) (int (default 0 $group.replicas)) (eq $role "rollout") }}
{{- $per := index ($group.rayResources | default dict) $res | default 0 }}
{{- if $per }}
{{- $supply = addf $supply (mulf $pods $per) }}
{{- $offers = append $offers (printf "%s: %d pods × %v" $role $pods $per) }}
{{- end }}
{{- end }}
{{- if lt (float64 $supply) (float64 $need) }}
{{- $errors = append $errors (printf "Ray resource %q: the actors need %v (%s) but the worker groups offer only %v (%s); raise the groups' replicas/maxReplicas or rayResources.%s" $res $need (join ", " (get $askers $res)) $supply (join ", " (default (list "none") $offers)) $res) }}
{{- end }}
{{- end }}

{{- /* Ray's worker processes take ports 10002-19999 */}}
{{- $mp := int $v.rayMetricsPort }}
{{- if and (ge $mp 10002) (le $mp 19999) }}
{{- $errors = append $errors (printf "rayMetricsPort (%d) lies in Ray's worker port range 10002-19999; choose a port outside it (Ray's default is 8080)" $mp) }}
{{- end }}

{{- /* the entrypoint is a shell command line: single-quoted arguments */}}
{{- range $v.extraArgs }}
{{- if contains "'" (toString .) }}
{{- $errors = append $errors (printf "extraArgs: %q contains a single quote, which the job's shell command line cannot carry" (toString .)) }}
{{- end }}
{{- end }}

{{- if $errors }}
{{- fail (printf "\n\nharpo chart: invalid values:\n  - %s\n" (join "\n  - " $errors)) }}
{{- end }}
{{- end }}
