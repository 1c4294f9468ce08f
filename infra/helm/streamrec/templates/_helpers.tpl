{{/* Names and labels shared by every template. */}}
{{- define "streamrec.fullname" -}}
{{- printf "%s-streamrec" .Release.Name | trunc 53 | trimSuffix "-" -}}
{{- end -}}

{{- define "streamrec.labels" -}}
app.kubernetes.io/name: streamrec
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "api") */}}
{{- define "streamrec.selector" -}}
app.kubernetes.io/name: streamrec
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "streamrec.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{- define "streamrec.kafkaBootstrap" -}}
{{ .Values.kafka.clusterName }}-kafka-bootstrap:9093
{{- end -}}

{{- define "streamrec.redisHost" -}}
{{- if .Values.redis.cluster.enabled -}}
{{ include "streamrec.fullname" . }}-redis-leader
{{- else -}}
{{ include "streamrec.fullname" . }}-redis
{{- end -}}
{{- end -}}

{{- define "streamrec.issuerRef" -}}
{{- if .Values.tls.issuerRef -}}
{{ toYaml .Values.tls.issuerRef }}
{{- else -}}
name: {{ include "streamrec.fullname" . }}-ca
kind: Issuer
{{- end -}}
{{- end -}}

{{/* The Redis password of one identity: kept from the installed Secret, else random (32 characters). */}}
{{- define "streamrec.redisPassword" -}}
{{- $secret := lookup "v1" "Secret" .root.Release.Namespace (printf "%s-redis-%s" (include "streamrec.fullname" .root) .user) -}}
{{- if and $secret $secret.data (hasKey $secret.data "password") -}}
{{ index $secret.data "password" | b64dec }}
{{- else -}}
{{ randAlphaNum 32 }}
{{- end -}}
{{- end -}}

{{/*
Environment, volumes and mounts of a project container: (dict "root" $ "kafkaUser" "streams" "redisUser" "streams").
Settings names are `streamrec settings`'s; the Kafka password is the one Strimzi's User Operator
writes for the KafkaUser, the CA Strimzi's cluster CA; the Redis password the chart's Secret.
*/}}
{{- define "streamrec.env" -}}
- name: STREAMREC_KAFKA__BOOTSTRAP_SERVERS
  value: {{ include "streamrec.kafkaBootstrap" .root }}
- name: STREAMREC_KAFKA__SECURITY_PROTOCOL
  value: SASL_SSL
- name: STREAMREC_KAFKA__SASL_MECHANISM
  value: SCRAM-SHA-512
- name: STREAMREC_KAFKA__SASL_USERNAME
  value: {{ .kafkaUser }}
- name: STREAMREC_KAFKA__SASL_PASSWORD_FILE
  value: /run/secrets/streamrec/kafka/password
- name: STREAMREC_KAFKA__SSL_CA_FILE
  value: /run/secrets/streamrec/kafka-ca/ca.crt
- name: STREAMREC_REDIS__HOST
  value: {{ include "streamrec.redisHost" .root }}
- name: STREAMREC_REDIS__PORT
  value: "6379"
- name: STREAMREC_REDIS__CLUSTER
  value: {{ .root.Values.redis.cluster.enabled | quote }}
- name: STREAMREC_REDIS__USERNAME
  value: {{ .redisUser }}
- name: STREAMREC_REDIS__PASSWORD_FILE
  value: /run/secrets/streamrec/redis/password
{{- if .root.Values.tls.enabled }}
- name: STREAMREC_REDIS__TLS
  value: "true"
- name: STREAMREC_REDIS__CA_FILE
  value: /run/secrets/streamrec/tls/ca.crt
- name: STREAMREC_GRPC__TLS
  value: "true"
- name: STREAMREC_GRPC__CA_FILE
  value: /run/secrets/streamrec/tls/ca.crt
{{- end }}
- name: STREAMREC_MODEL_SERVER__HOST
  value: {{ include "streamrec.fullname" .root }}-tf-serving
- name: STREAMREC_MODEL_SERVER__PORT
  value: {{ .root.Values.tfServing.grpcPort | quote }}
- name: STREAMREC_MODEL_SERVER__MODEL_CONFIG_FILE_POLL_WAIT_SECONDS
  value: {{ .root.Values.tfServing.configPollSeconds | quote }}
- name: STREAMREC_PATHS__STATE_DIR
  value: {{ .root.Values.state.mountPath }}
{{- end -}}

{{- define "streamrec.mounts" -}}
- name: state
  mountPath: {{ .root.Values.state.mountPath }}
- name: kafka-password
  mountPath: /run/secrets/streamrec/kafka
  readOnly: true
- name: kafka-ca
  mountPath: /run/secrets/streamrec/kafka-ca
  readOnly: true
- name: redis-password
  mountPath: /run/secrets/streamrec/redis
  readOnly: true
{{- if .root.Values.tls.enabled }}
- name: tls
  mountPath: /run/secrets/streamrec/tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "streamrec.volumes" -}}
- name: state
  persistentVolumeClaim:
    claimName: {{ include "streamrec.fullname" .root }}-state
- name: kafka-password
  secret:
    secretName: {{ .kafkaUser }}
    items: [{key: password, path: password}]
- name: kafka-ca
  secret:
    secretName: {{ .root.Values.kafka.clusterName }}-cluster-ca-cert
    items: [{key: ca.crt, path: ca.crt}]
- name: redis-password
  secret:
    secretName: {{ include "streamrec.fullname" .root }}-redis-{{ .redisUser }}
{{- if .root.Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "streamrec.fullname" .root }}-{{ .tlsSecret | default "client" }}-tls
{{- end }}
{{- end -}}

{{- define "streamrec.podSecurity" -}}
runAsNonRoot: true
runAsUser: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "streamrec.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: false
capabilities:
  drop: [ALL]
{{- end -}}
