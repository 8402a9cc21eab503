#!/usr/bin/env bash
# Installs the benchmark's tools when missing (nginx, wrk, h2load) and runs
# the side-by-side benchmark of mtasts and nginx. Arguments go to run.py,
# e.g.: bash bench/run.sh --domains 1 10000 100000 --seconds 5
set -euo pipefail
cd "$(dirname "$0")/.."
missing=""
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$missing nginx-light"
command -v wrk >/dev/null 2>&1 || missing="$missing wrk"
command -v h2load >/dev/null 2>&1 || missing="$missing nghttp2-client"
[ -x /usr/bin/time ] || missing="$missing time"
if [ -n "$missing" ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  # shellcheck disable=SC2086
  $sudo apt-get install -y -qq --no-install-recommends $missing
fi
exec python3 bench/run.py "$@"
