#!/usr/bin/env bash
# Makes sure the programs the project runs are on this machine: redis-server and the PostgreSQL server binaries
# (tests, `make run`), Node.js (the benchmark's load generator), promtool (the alert rules' tests; Debian's
# prometheus package) and kubectl (renders the Kubernetes manifests in the tests: `kubectl kustomize`). As root on
# Debian/Ubuntu the missing ones are installed with apt-get, except kubectl, which Debian does not package;
# otherwise this says what to install and fails. promtool and kubectl are checked only with --tests (`make test`):
# `make run` needs neither.
set -euo pipefail
for_tests=false
[ "${1:-}" = "--tests" ] && for_tests=true

have_redis() { command -v redis-server >/dev/null 2>&1; }
have_postgres() {
  command -v initdb >/dev/null 2>&1 && return 0
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null 2>&1
}

# Debian's prometheus package starts a Prometheus server on :9090 when it is installed (systemd or its init
# script). Only promtool is wanted: keep the server from starting, and stop and disable it if it started anyway.
POLICY=/usr/sbin/policy-rc.d
our_policy=""
forbid_prometheus_start() {
  [ -e "$POLICY" ] && return 0 # the machine has its own policy (Docker images: nothing starts); keep it
  printf '#!/bin/sh\n# scripts/system_deps.sh: no Prometheus server while its package installs\n' >"$POLICY"
  printf 'for arg in "$@"; do case "$arg" in prometheus|prometheus.service) exit 101 ;; esac; done\nexit 0\n' \
    >>"$POLICY"
  chmod 755 "$POLICY"
  our_policy=$POLICY
}
remove_policy() { [ -z "$our_policy" ] || rm -f "$our_policy"; }
stop_packaged_prometheus() {
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now prometheus.service >/dev/null 2>&1 || true
  fi
  if [ -x /etc/init.d/prometheus ]; then
    # start-stop-daemon with the package's pid file and user: only the packaged server.
    /etc/init.d/prometheus stop >/dev/null 2>&1 || true
    command -v update-rc.d >/dev/null 2>&1 && update-rc.d prometheus disable >/dev/null 2>&1 || true
  fi
  if [ -s /run/prometheus/prometheus.pid ] && kill -0 "$(cat /run/prometheus/prometheus.pid)" 2>/dev/null; then
    echo "the packaged Prometheus server (pid $(cat /run/prometheus/prometheus.pid)) is still running" >&2
    return 1
  fi
}

missing=()
have_redis || missing+=(redis-server)
have_postgres || missing+=(postgresql)
# Node.js runs loadtest/h2gen.mjs, the benchmark's load generator (its built-in http2; no npm packages).
command -v node >/dev/null 2>&1 || missing+=(nodejs)
# promtool checks and unit-tests the Prometheus alert rules (deploy/prometheus-tests).
$for_tests && { command -v promtool >/dev/null 2>&1 || missing+=(prometheus); }

no_kubectl() {
  echo "missing: kubectl (the tests render deploy/k8s with \`kubectl kustomize\`). Debian does not package it:" \
       "install it from https://kubernetes.io/docs/tasks/tools/ (e.g. the pkgs.k8s.io apt repository, or the" \
       "single binary into /usr/local/bin) and run this again." >&2
  exit 1
}

need_kubectl() { $for_tests && ! command -v kubectl >/dev/null 2>&1; }

if [ ${#missing[@]} -eq 0 ]; then
  need_kubectl && no_kubectl
  exit 0
fi

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  trap remove_policy EXIT
  case " ${missing[*]} " in *" prometheus "*) forbid_prometheus_start ;; esac
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts the packaged Redis and Postgres; the project runs its own instances on other ports, so leave
  # those alone. The Prometheus server is not wanted at all (it would hold port 9090).
  case " ${missing[*]} " in *" prometheus "*) stop_packaged_prometheus ;; esac
  need_kubectl && no_kubectl
  exit 0
fi
need_kubectl && echo "also missing: kubectl (https://kubernetes.io/docs/tasks/tools/)" >&2
echo "missing: ${missing[*]}. Install them (Debian/Ubuntu: sudo apt-get install ${missing[*]};" \
     "macOS: brew install redis postgresql@15 node prometheus) or set RGW_REDIS_URL / RGW_DATABASE_URL (and" \
     "RGW_TEST_REDIS_URL / RGW_TEST_DATABASE_URL for the tests) to servers you already run." >&2
exit 1
