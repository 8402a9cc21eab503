#!/usr/bin/env bash
# Kills `mtasts serve` with SIGKILL at random moments (ACME issuance against
# pebble, admin writes, reloads) and restarts it each time: tests/crash.rs
# with many kills. Prints its summary line as a table.
#
#   bash bench/crash.sh [KILLS] [SEED]
#
# Defaults: 60 kills, a seed from the clock (printed; pass it back to replay
# the same moments). Needs pebble (apt-get install pebble).
set -euo pipefail
cd "$(dirname "$0")/.."
kills=${1:-60}
export MTASTS_CRASH_KILLS=$kills
[ -n "${2:-}" ] && export MTASTS_CRASH_SEED=$2
export CI=true
start=$(date +%s)
out=$(cargo test --release --locked --test crash -- --nocapture 2>&1) || {
  echo "$out" | tail -40 >&2
  exit 1
}
end=$(date +%s)
echo "$out" | grep '^|'
printf '| seconds (release build, whole run) | %d |\n' "$((end - start))"
