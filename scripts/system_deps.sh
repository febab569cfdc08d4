#!/usr/bin/env bash
# Makes sure redis-server and the PostgreSQL server binaries are on this machine. As root on Debian/Ubuntu they
# are installed with apt-get when missing; otherwise this says what to install and fails.
set -euo pipefail

have_redis() { command -v redis-server >/dev/null 2>&1; }
have_postgres() {
  command -v initdb >/dev/null 2>&1 && return 0
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null 2>&1
}

missing=()
have_redis || missing+=(redis-server)
have_postgres || missing+=(postgresql)
# Node.js runs loadtest/h2gen.mjs, the benchmark's load generator (its built-in http2; no npm packages).
command -v node >/dev/null 2>&1 || missing+=(nodejs)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts the packaged services; the project runs its own instances, so leave those alone.
  exit 0
fi
echo "missing: ${missing[*]}. Install them (Debian/Ubuntu: sudo apt-get install ${missing[*]};" \
     "macOS: brew install redis postgresql@15 node) or set RGW_REDIS_URL / RGW_DATABASE_URL (and" \
     "RGW_TEST_REDIS_URL / RGW_TEST_DATABASE_URL for the tests) to servers you already run." >&2
exit 1
