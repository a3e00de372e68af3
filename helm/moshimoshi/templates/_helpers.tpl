{{/* Names, labels and the small pieces every template shares. */}}

{{- define "moshimoshi.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-moshimoshi, or the release name alone when it already says moshimoshi. */}}
{{- define "moshimoshi.fullname" -}}
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

{{- define "moshimoshi.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "moshimoshi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: moshimoshi
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "gateway"). */}}
{{- define "moshimoshi.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moshimoshi.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "moshimoshi.componentLabels" -}}
{{ include "moshimoshi.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "moshimoshi.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "moshimoshi.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository:tag of an image block, the tag defaulting to the chart's appVersion. */}}
{{- define "moshimoshi.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* Secret and key that hold REDIS_URL. */}}
{{- define "moshimoshi.redisUrlSecret" -}}
{{- if .Values.redis.enabled -}}
{{- printf "%s-redis" (include "moshimoshi.fullname" .) -}}
{{- else if .Values.redis.existingSecret -}}
{{- .Values.redis.existingSecret -}}
{{- else -}}
{{- printf "%s-redis-url" (include "moshimoshi.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "moshimoshi.redisUrlKey" -}}
{{- if and (not .Values.redis.enabled) .Values.redis.existingSecret -}}
{{- .Values.redis.existingSecretKey -}}
{{- else -}}
redis-url
{{- end -}}
{{- end -}}

{{- define "moshimoshi.apiTokensSecret" -}}
{{- default (printf "%s-api-tokens" (include "moshimoshi.fullname" .)) .Values.apiTokens.existingSecret -}}
{{- end -}}

{{- define "moshimoshi.workerSecretName" -}}
{{- default (printf "%s-worker-secret" (include "moshimoshi.fullname" .)) .Values.workerSecret.existingSecret -}}
{{- end -}}

{{/* The env entry that gives a gateway or a worker the shared worker secret. */}}
{{- define "moshimoshi.workerSecretEnv" -}}
- name: MOSHIMOSHI_WORKER_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "moshimoshi.workerSecretName" . }}
      key: {{ if .Values.workerSecret.existingSecret }}{{ .Values.workerSecret.existingSecretKey }}{{ else }}worker-secret{{ end }}
{{- end -}}

{{/* Whether the worker and Redis NetworkPolicies can be rendered: hostNetwork gateways need
the nodes' CIDRs (their traffic carries the node's address). */}}
{{- define "moshimoshi.networkPolicies" -}}
{{- if and .Values.networkPolicy.enabled (or (ne .Values.gateway.networking.mode "hostNetwork") .Values.networkPolicy.gatewayNodeCIDRs) -}}
true
{{- end -}}
{{- end -}}

{{/* NetworkPolicyPeers of the gateways: their pods, and with hostNetwork their nodes. */}}
{{- define "moshimoshi.gatewayPeers" -}}
- podSelector:
    matchLabels:
      {{- include "moshimoshi.selectorLabels" (dict "ctx" . "component" "gateway") | nindent 6 }}
{{- if eq .Values.gateway.networking.mode "hostNetwork" }}
{{- range .Values.networkPolicy.gatewayNodeCIDRs }}
- ipBlock:
    cidr: {{ . | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "moshimoshi.hfTokenSecret" -}}
{{- default (printf "%s-hf-token" (include "moshimoshi.fullname" .)) .Values.worker.hfToken.existingSecret -}}
{{- end -}}

{{/*
A value kept across upgrades: the existing Secret's key if the release already has one,
else a fresh random string. (dict "ctx" $ "secret" NAME "key" KEY "length" N)
*/}}
{{- define "moshimoshi.persistentRandom" -}}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .secret -}}
{{- if and $existing $existing.data (hasKey $existing.data .key) -}}
{{- index $existing.data .key | b64dec -}}
{{- else -}}
{{- randAlphaNum (int .length) -}}
{{- end -}}
{{- end -}}

{{/* Pod security context shared by the gateway and the worker. */}}
{{- define "moshimoshi.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext -}}
{{- end -}}

{{- define "moshimoshi.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext -}}
{{- end -}}

{{/*
The worker's preStop hook: ask the worker to drain (POST /v1/drain with the worker secret: no
new claims, readiness off), then wait until its last call has ended or the drain grace is over. SIGTERM follows.
*/}}
{{- define "moshimoshi.workerDrainScript" -}}
import os, re, time, urllib.request
base = "http://127.0.0.1:" + os.environ.get("MOSHIMOSHI_PORT", "8081")
secret = os.environ.get("MOSHIMOSHI_WORKER_SECRET", "")
headers = {"Authorization": "Bearer " + secret} if secret else {}
try:
    urllib.request.urlopen(urllib.request.Request(base + "/v1/drain", data=b"", method="POST", headers=headers), timeout=10)
except Exception as exc:
    print("preStop: drain request failed:", exc, flush=True)
deadline = time.monotonic() + float(os.environ.get("MOSHIMOSHI_DRAIN_GRACE_SECONDS", "300"))
busy = re.compile(r"^moshimoshi_worker_slots_busy(?:\{[^}]*\})? (\S+)", re.M)
while time.monotonic() < deadline:
    try:
        found = busy.search(urllib.request.urlopen(base + "/metrics", timeout=10).read().decode())
    except Exception:
        break
    if found is None or float(found.group(1)) == 0:
        break
    time.sleep(2)
{{- end -}}
