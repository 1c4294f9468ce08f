#!/usr/bin/env bash
# Installs the system packages streamrec runs on, from Debian, if they are missing:
# Java 17 (Kafka), Maven (fetches the Kafka jars), Redis, kcat (a third-party Kafka client the
# tests use), docker-compose (static check of infra/docker-compose.yml; no engine is needed) and
# Prometheus (the stack's metrics server; it brings promtool, which checks and tests the alert rules).
# Idempotent: with everything present it changes nothing and does not touch the network.
set -euo pipefail

declare -A package_for=(
  [java]=openjdk-17-jre-headless
  [mvn]=maven
  [redis-server]=redis-server
  [kcat]=kcat
  [docker-compose]=docker-compose
  [promtool]=prometheus
)
missing=()
for binary in "${!package_for[@]}"; do
  command -v "$binary" >/dev/null 2>&1 || missing+=("${package_for[$binary]}")
done
if ((${#missing[@]})); then
  echo "installing system packages: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
java -version 2>&1 | head -1 | grep -Eq '"(17|21)\.' || {
  echo "Kafka 3.9 here is tested on Java 17; found: $(java -version 2>&1 | head -1)" >&2
  exit 1
}
