#!/usr/bin/env bash
# Installs what the test suite needs (Debian packages, only when missing;
# apt-get as root, else through sudo) and runs every check and test:
# rustfmt, clippy with warnings as errors, and all unit and integration tests,
# ending with one line "N passed, M failed" for the whole suite.
# Tests that need pebble, knot or PostgreSQL start them on free loopback ports and stop
# them; under CI=true a missing one fails the test instead of skipping it.
set -euo pipefail
cd "$(dirname "$0")/.."

# command:package pairs; a command may live in /usr/sbin.
want="pebble:pebble pebble-challtestsrv:pebble knotd:knot kdig:knot-dnsutils keymgr:knot curl:curl setpriv:util-linux chromium:chromium"
missing=""
for pair in $want; do
  cmd=${pair%%:*}
  pkg=${pair#*:}
  if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
    case " $missing " in *" $pkg "*) ;; *) missing="$missing $pkg" ;; esac
  fi
done
# PostgreSQL's server binaries live off PATH (/usr/lib/postgresql/<v>/bin).
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  missing="$missing postgresql"
fi
if [ -n "$missing" ]; then
  echo "installing test dependencies:$missing"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  # shellcheck disable=SC2086
  $sudo apt-get install -y -qq --no-install-recommends $missing
fi

# octoDNS (PyPI) validates `records --format octodns` in tests/records.rs:
# a throw-away virtualenv under target/, created only when missing.
octodns_venv="$PWD/target/octodns-venv"
if [ ! -x "$octodns_venv/bin/octodns-validate" ]; then
  if ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends python3-venv
  fi
  echo "installing octodns into $octodns_venv"
  rm -rf "$octodns_venv"
  # A failed install leaves no octodns-validate: the octoDNS test then fails
  # under CI=true, and the rest of the suite still runs and is counted.
  if ! { python3 -m venv "$octodns_venv" &&
    "$octodns_venv/bin/pip" install -q 'octodns==1.22.0'; }; then
    echo "error: could not install octodns into $octodns_venv" >&2
    rm -rf "$octodns_venv"
  fi
fi
export MTASTS_OCTODNS_VALIDATE="$octodns_venv/bin/octodns-validate"

# kubernetes-validate (PyPI) checks deploy/kubernetes against the Kubernetes
# schemas offline in tests/deploy.rs: its own throw-away virtualenv.
k8s_venv="$PWD/target/k8s-venv"
if [ ! -x "$k8s_venv/bin/kubernetes-validate" ]; then
  echo "installing kubernetes-validate into $k8s_venv"
  rm -rf "$k8s_venv"
  if ! { python3 -m venv "$k8s_venv" &&
    "$k8s_venv/bin/pip" install -q 'kubernetes-validate==1.37.0'; }; then
    echo "error: could not install kubernetes-validate into $k8s_venv" >&2
    rm -rf "$k8s_venv"
  fi
fi
export MTASTS_K8S_VALIDATE="$k8s_venv/bin/kubernetes-validate"

# tlsrpt-reporter (PyPI, the reporting half of Postfix's TLSRPT support)
# delivers a real report to the running server in tests/tlsrpt.rs.
tlsrpt_venv="$PWD/target/tlsrpt-venv"
if [ ! -x "$tlsrpt_venv/bin/tlsrpt-reportd" ]; then
  echo "installing tlsrpt-reporter into $tlsrpt_venv"
  rm -rf "$tlsrpt_venv"
  if ! { python3 -m venv "$tlsrpt_venv" &&
    "$tlsrpt_venv/bin/pip" install -q 'tlsrpt-reporter==0.6.0'; }; then
    echo "error: could not install tlsrpt-reporter into $tlsrpt_venv" >&2
    rm -rf "$tlsrpt_venv"
  fi
fi
export MTASTS_TLSRPT_REPORTER_BIN="$tlsrpt_venv/bin"

cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings

# Every test binary runs (--no-fail-fast); the run ends with one line
# "N passed, M failed" summing cargo's "test result:" lines, and exits
# non-zero if any test or the build failed.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --locked --all-targets --no-fail-fast 2>&1 | tee "$log" || status=$?
awk '/^test result: /{
  for (i = 1; i <= NF; i++) {
    if ($(i+1) ~ /^passed/) p += $i
    if ($(i+1) ~ /^failed/) f += $i
  }
} END { printf "%d passed, %d failed\n", p, f }' "$log"
if [ "$status" = 0 ] && grep -q '^test result: FAILED' "$log"; then
  status=1
fi
exit "$status"
