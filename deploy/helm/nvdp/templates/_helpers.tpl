{{/*
Names and labels.
*/}}
{{- define "nvdp.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "nvdp.fullname" -}}
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

{{- define "nvdp.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride -}}
{{- end -}}

{{- define "nvdp.selectorLabels" -}}
{{- if .Values.selectorLabelsOverride -}}
{{- toYaml .Values.selectorLabelsOverride -}}
{{- else -}}
app.kubernetes.io/name: {{ include "nvdp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- end -}}

{{/*
The MPS host's pods: never matched by the plugin's selector (two DaemonSets sharing pods fight over them).
*/}}
{{- define "nvdp.mpsHostSelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-mps-host" (include "nvdp.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "nvdp.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "nvdp.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/*
The image. nvdp's own repository (also the release workflow's, .github/workflows/release.yaml) and tag (appVersion,
a bare version: nvdp's tags never start with "v") unless the values name another. Upstream values must not produce
a reference that does not exist, so:
  - an image.repository whose last path component is k8s-device-plugin (NVIDIA's nvcr.io/nvidia/k8s-device-plugin,
    the fork's ghcr.io/nebuly-ai/k8s-device-plugin, or a mirror of either) is another plugin's image: nvdp's
    repository and tag are used instead;
  - an upstream-style tag ("v0.14.5", "v0.17.0-ubi9") on nvdp's own repository is replaced by appVersion.
"nvdp.imageReplaced" says what was replaced (for NOTES.txt), empty when the values' image is used as given.
*/}}
{{- define "nvdp.defaultRepository" -}}ghcr.io/nvdp/nvdp{{- end -}}

{{- define "nvdp.imageReplaced" -}}
{{- $repo := toString (.Values.image.repository | default "") -}}
{{- $tag := toString (.Values.image.tag | default "") -}}
{{- if eq (last (splitList "/" $repo)) "k8s-device-plugin" -}}
image.repository={{ $repo }}{{ with $tag }} (image.tag={{ . }}){{ end }} is another plugin's image
{{- else if and (eq ($repo | default (include "nvdp.defaultRepository" .)) (include "nvdp.defaultRepository" .)) (regexMatch "^v[0-9]" $tag) -}}
image.tag={{ $tag }} is an upstream tag (nvdp's tags are bare versions)
{{- end -}}
{{- end -}}

{{- define "nvdp.image" -}}
{{- if include "nvdp.imageReplaced" . -}}
{{- printf "%s:%s" (include "nvdp.defaultRepository" .) (.Chart.AppVersion | toString) -}}
{{- else -}}
{{- printf "%s:%s" (.Values.image.repository | default (include "nvdp.defaultRepository" .)) (.Values.image.tag | default .Chart.AppVersion | toString) -}}
{{- end -}}
{{- end -}}

{{/*
Configs. "nvdp.configMapName" is empty when no named configs are used.
*/}}
{{- define "nvdp.configMapName" -}}
{{- if .Values.config.name -}}
{{- .Values.config.name -}}
{{- else if .Values.config.map -}}
{{- printf "%s-configs" (include "nvdp.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/*
The config for unlabelled nodes: config.default, else (inline map only) the key `default`, else the only key.
Empty when none can be inferred (an external ConfigMap without config.default: nvdp's fallbacks decide).
*/}}
{{- define "nvdp.defaultConfig" -}}
{{- if .Values.config.default -}}
{{- .Values.config.default -}}
{{- else if .Values.config.map -}}
{{- if hasKey .Values.config.map "default" -}}
default
{{- else if eq (len .Values.config.map) 1 -}}
{{- keys .Values.config.map | first -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
"true" when some config may select a MIG strategy other than none. The top-level migStrategy wins over config
files (env beats file). Inline configs are read; the content of an external ConfigMap is unknown, so it may.
*/}}
{{- define "nvdp.migPossible" -}}
{{- if .Values.migStrategy -}}
{{- if ne .Values.migStrategy "none" -}}true{{- end -}}
{{- else if .Values.config.name -}}
true
{{- else -}}
{{- $possible := false -}}
{{- range $name, $content := .Values.config.map -}}
{{- $flags := get (fromYaml (toString $content)) "flags" -}}
{{- if and (kindIs "map" $flags) (ne (toString (get $flags "migStrategy" | default "none")) "none") -}}{{- $possible = true -}}{{- end -}}
{{- end -}}
{{- if $possible -}}true{{- end -}}
{{- end -}}
{{- end -}}

{{/* "true" when nvdp talks to the Kubernetes API (and so gets a service account): a config, Events, or DRA. */}}
{{- define "nvdp.apiAccess" -}}
{{- if or (include "nvdp.configMapName" .) .Values.events.enabled (include "nvdp.labelSink" .) .Values.dra.enabled -}}true{{- end -}}
{{- end -}}

{{/*
Where the GFD labels go through the API (docs/labels.md): "node" (labels.direct), "node-feature-api" (gfd.enabled),
or "" (no API: the NFD feature file of sharingLabels, as before).
*/}}
{{- define "nvdp.labelSink" -}}
{{- if dig "labels" "direct" false (.Values | toJson | fromJson) -}}node
{{- else if dig "gfd" "enabled" false (.Values | toJson | fromJson) -}}node-feature-api
{{- end -}}
{{- end -}}

{{/*
"true" when nvdp may record Events about its Node: it has API access (a config or events.enabled). RBAC then
allows create (only) on core/v1 events in the `default` namespace, the only one the API server accepts for a Node.
*/}}
{{- define "nvdp.eventsAllowed" -}}
{{- include "nvdp.apiAccess" . -}}
{{- end -}}

{{/* The pod's annotations: podAnnotations over the Prometheus scrape annotations (metrics.scrapeAnnotations). */}}
{{- define "nvdp.podAnnotations" -}}
{{- $annotations := dict -}}
{{- if and .Values.metrics.enabled .Values.metrics.scrapeAnnotations -}}
{{- $_ := set $annotations "prometheus.io/scrape" "true" -}}
{{- $_ := set $annotations "prometheus.io/port" (toString .Values.metrics.port) -}}
{{- $_ := set $annotations "prometheus.io/path" "/metrics" -}}
{{- end -}}
{{- $annotations = merge (deepCopy (.Values.podAnnotations | default dict)) $annotations -}}
{{- if $annotations -}}
{{- toYaml $annotations -}}
{{- end -}}
{{- end -}}

{{/*
"true" when nvdp may use a CDI device list strategy (and so needs the host's CDI directory and driver root): the
top-level deviceListStrategy names one (env beats file); else an inline config does; else cdi.enabled says so (an
external ConfigMap's content is unknown to the chart).
*/}}
{{- define "nvdp.hasCdiStrategy" -}}
{{- $list := . -}}
{{- range (ternary $list (splitList "," (toString $list)) (kindIs "slice" $list)) -}}
{{- if hasPrefix "cdi-" (toString .) -}}true{{- end -}}
{{- end -}}
{{- end -}}

{{- define "nvdp.cdiPossible" -}}
{{- if .Values.deviceListStrategy -}}
{{- include "nvdp.hasCdiStrategy" .Values.deviceListStrategy -}}
{{- else if dig "enabled" false (.Values.cdi | default dict) -}}
true
{{- else -}}
{{- range $name, $content := .Values.config.map -}}
{{- $flags := get (fromYaml (toString $content)) "flags" -}}
{{- $plugin := and (kindIs "map" $flags) (get $flags "plugin") -}}
{{- if and (kindIs "map" $plugin) (get $plugin "deviceListStrategy") -}}
{{- include "nvdp.hasCdiStrategy" (get $plugin "deviceListStrategy") -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The host directory of IMEX channel nodes to mount (at the same path) so that nvdp can check channel 0, or empty:
needed when a channel is requested (imex.channelIDs, else an inline config's imex.channelIDs) and the dev root is
the host's / (another dev or driver root is mounted whole already).
*/}}
{{- define "nvdp.imexChannelsMount" -}}
{{- $imex := .Values.imex | default dict -}}
{{- $wanted := false -}}
{{- if not (kindIs "invalid" $imex.channelIDs) -}}
{{- $wanted = not (empty $imex.channelIDs) -}}
{{- else -}}
{{- range $name, $content := .Values.config.map -}}
{{- $section := get (fromYaml (toString $content)) "imex" -}}
{{- if and (kindIs "map" $section) (get $section "channelIDs") -}}{{- $wanted = true -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- $devRoot := .Values.nvidiaDevRoot | default .Values.nvidiaDriverRoot | default "/" | toString -}}
{{- if and $wanted (eq $devRoot "/") -}}
/dev/nvidia-caps-imex-channels
{{- end -}}
{{- end -}}

{{- define "nvdp.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "nvdp.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
The container's securityContext, least privilege first:
  - a non-empty .Values.securityContext is used verbatim;
  - compatWithCPUManager: privileged (the CPU manager rewrites device cgroups; upstream's rule);
  - MPS without shmFromHost: privileged, because nvdp's tmpfs at <mps.root>/shm must propagate to the host
    (Bidirectional mount propagation is refused for unprivileged containers);
  - MIG: all capabilities dropped but CAP_SYS_ADMIN (the runtime gives MIG monitor devices only to such containers);
  - MPS with shmFromHost: CAP_SYS_ADMIN (NVML compute mode) plus CAP_SETUID, CAP_SETGID and CAP_KILL (the MPS
    control daemon starts and stops one server per client UID).
  With CAP_SYS_ADMIN allowPrivilegeEscalation stays unset: the API rejects false together with it;
  - otherwise nothing at all: all capabilities dropped, no privilege escalation.
*/}}
{{- define "nvdp.securityContext" -}}
{{- if .Values.securityContext -}}
{{- toYaml .Values.securityContext -}}
{{- else if .Values.compatWithCPUManager -}}
privileged: true
{{- else if and .Values.mps.enabled (not .Values.mps.shmFromHost) -}}
privileged: true
{{- else if or .Values.mps.enabled (include "nvdp.migPossible" .) -}}
capabilities:
  drop: ["ALL"]
  {{- if .Values.mps.enabled }}
  add: ["SYS_ADMIN", "SETUID", "SETGID", "KILL"]
  {{- else }}
  add: ["SYS_ADMIN"]
  {{- end }}
seccompProfile:
  type: RuntimeDefault
{{- else -}}
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
{{- end -}}

{{/*
Checks that make `helm install` fail with a message naming the value to change.
*/}}
{{- define "nvdp.validate" -}}
{{- $ns := include "nvdp.namespace" . -}}
{{- if hasKey .Values "namespace" -}}
{{- fail "the value 'namespace' is not used: install with --namespace, or set namespaceOverride" -}}
{{- end -}}
{{- if and (eq $ns "default") (not .Values.allowDefaultNamespace) -}}
{{- fail "installing into the 'default' namespace: pick another namespace (e.g. --namespace nvdp --create-namespace) or set allowDefaultNamespace=true" -}}
{{- end -}}
{{- if not .Values.devicePlugin.enabled -}}
{{- fail "devicePlugin.enabled=false asks for a GPU-Feature-Discovery-only install, which nvdp has no mode for: remove devicePlugin.enabled (nvdp writes the sharing labels itself; install GFD's own chart for its other labels)" -}}
{{- end -}}
{{- if dig "nfd" "enabled" false (.Values | toJson | fromJson) -}}
{{- fail "nfd.enabled=true asks for upstream's node-feature-discovery subchart, which this chart does not bundle: install NFD from its own chart (oci://registry.k8s.io/nfd/charts/node-feature-discovery) and remove nfd.enabled, or set labels.direct=true to have nvdp label its Node without NFD" -}}
{{- end -}}
{{- if .Values.legacyDaemonsetAPI -}}
{{- fail "legacyDaemonsetAPI=true (extensions/v1beta1) is gone from Kubernetes: remove legacyDaemonsetAPI" -}}
{{- end -}}
{{- if and .Values.deviceDiscoveryStrategy (not (has .Values.deviceDiscoveryStrategy (list "auto" "nvml"))) -}}
{{- fail (printf "deviceDiscoveryStrategy=%s: nvdp discovers GPUs through NVML only; remove deviceDiscoveryStrategy or set it to auto or nvml" .Values.deviceDiscoveryStrategy) -}}
{{- end -}}
{{- if and .Values.config.name .Values.config.map (not .Values.config.create) -}}
{{- fail "config.name and config.map are both set: keep config.map (inline configs) or config.name (an existing ConfigMap), not both" -}}
{{- end -}}
{{- if and .Values.config.create (not .Values.config.name) -}}
{{- fail "config.create=true needs config.name, the ConfigMap to create" -}}
{{- end -}}
{{- if and .Values.config.readFromAPI (not (include "nvdp.configMapName" .)) -}}
{{- fail "config.readFromAPI=true needs config.map or config.name" -}}
{{- end -}}
{{- if .Values.config.map -}}
{{- range $name, $content := .Values.config.map -}}
{{- if not (regexMatch "^[-._a-zA-Z0-9]+$" $name) -}}
{{- fail (printf "config.map.%s: a config name must be a valid ConfigMap key (letters, digits, '-', '_', '.')" $name) -}}
{{- end -}}
{{- $parsed := fromYaml (toString $content) -}}
{{- if hasKey $parsed "Error" -}}
{{- fail (printf "config.map.%s is not valid YAML: %s" $name (get $parsed "Error")) -}}
{{- end -}}
{{- $sharing := get $parsed "sharing" -}}
{{- if and (kindIs "map" $sharing) (hasKey $sharing "mps") (not $.Values.mps.enabled) -}}
{{- fail (printf "config.map.%s uses sharing.mps: set mps.enabled=true so nvdp may run the MPS control daemons" $name) -}}
{{- end -}}
{{- end -}}
{{- if .Values.config.default -}}
{{- if not (hasKey .Values.config.map .Values.config.default) -}}
{{- fail (printf "config.default=%s is not a key of config.map (keys: %s)" .Values.config.default (keys .Values.config.map | sortAlpha | join ", ")) -}}
{{- end -}}
{{- else if not (include "nvdp.defaultConfig" .) -}}
{{- fail (printf "a default config must be provided when config.map has more than one config and none is named 'default': set config.default to one of %s" (keys .Values.config.map | sortAlpha | join ", ")) -}}
{{- end -}}
{{- end -}}
{{- if and (or (hasKey .Values.mps "userID") (hasKey .Values.mps "image")) (not .Values.mps.enabled) -}}
{{- fail "mps.userID/mps.image come from the nebuly fork, whose chart ran MPS by default: set mps.enabled=true to keep MPS (nvdp then ignores mps.userID and mps.image), or remove them" -}}
{{- end -}}
{{- if and .Values.probes.enabled (not .Values.metrics.enabled) -}}
{{- fail "probes.enabled=true needs metrics.enabled=true: the probes use the metrics port (to run without metrics, also set probes.enabled=false)" -}}
{{- end -}}
{{- if and .Values.metrics.scrapeAnnotations (not .Values.metrics.enabled) -}}
{{- fail "metrics.scrapeAnnotations=true needs metrics.enabled=true: there is nothing to scrape" -}}
{{- end -}}
{{- $featureFlags := dig "featureFlags" "" (.Values.cdi | default dict) | default "" -}}
{{- range (ternary $featureFlags (splitList "," (toString $featureFlags)) (kindIs "slice" $featureFlags)) -}}
{{- if and (trim .) (not (has (trim .) (list "disable-ipc-discoverer" "disable-nvsandboxutils"))) -}}
{{- fail (printf "cdi.featureFlags=%s: nvdp knows the CDI feature flags disable-ipc-discoverer and disable-nvsandboxutils only; remove the others" (trim .)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
nvdp's container resources: `resources` verbatim when set (as upstream's chart), else requests and a memory limit the
benchmarks justify (values.yaml says which figures). A default inside values.yaml would be merged key by key into a
user's own map (a user's lower limit below our request would make an invalid pod), hence here.
*/}}
{{- define "nvdp.resources" -}}
{{- if .Values.resources -}}
{{- toYaml .Values.resources }}
{{- else -}}
requests:
  cpu: 10m
  memory: 64Mi
limits:
  memory: 256Mi
{{- end -}}
{{- end -}}
