#!/usr/bin/env bash
# Installs what the test suite needs (Debian packages, only when missing;
# apt-get as root, else through sudo) and runs every check and test:
# rustfmt, clippy with warnings as errors, and all unit and integration tests.
# Tests that need pebble or knot start them on free loopback ports and stop
# them; under CI=true a missing one fails the test instead of skipping it.
set -euo pipefail
cd "$(dirname "$0")/.."

# command:package pairs; a command may live in /usr/sbin.
want="pebble:pebble pebble-challtestsrv:pebble knotd:knot kdig:knot-dnsutils keymgr:knot curl:curl"
missing=""
for pair in $want; do
  cmd=${pair%%:*}
  pkg=${pair#*:}
  if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
    case " $missing " in *" $pkg "*) ;; *) missing="$missing $pkg" ;; esac
  fi
done
if [ -n "$missing" ]; then
  echo "installing test dependencies:$missing"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  # shellcheck disable=SC2086
  $sudo apt-get install -y -qq --no-install-recommends $missing
fi

cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked --all-targets
