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
want="pebble:pebble pebble-challtestsrv:pebble knotd:knot kdig:knot-dnsutils keymgr:knot curl:curl setpriv:util-linux unshare:util-linux ip:iproute2 chromium:chromium unbound:unbound node:nodejs npm:npm"
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

# Python tools from PyPI, each in a throw-away virtualenv under target/,
# created only when missing. A failed install leaves the tool missing: its
# test then fails under CI=true, and the rest of the suite still runs.
# venv_tool DIR CHECK-FILE PIP-SPEC...
venv_tool() {
  local venv="$PWD/target/$1" check="$2"
  shift 2
  if [ -x "$venv/$check" ]; then
    return
  fi
  if ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends python3-venv
  fi
  echo "installing $* into $venv"
  rm -rf "$venv"
  if ! { python3 -m venv "$venv" && "$venv/bin/pip" install -q "$@"; }; then
    echo "error: could not install $* into $venv" >&2
    rm -rf "$venv"
  fi
}

# octoDNS validates `records --format octodns` in tests/records.rs.
venv_tool octodns-venv bin/octodns-validate 'octodns==1.22.0'
export MTASTS_OCTODNS_VALIDATE="$PWD/target/octodns-venv/bin/octodns-validate"
# kubernetes-validate checks deploy/kubernetes offline in tests/deploy.rs.
venv_tool k8s-venv bin/kubernetes-validate 'kubernetes-validate==1.37.0'
export MTASTS_K8S_VALIDATE="$PWD/target/k8s-venv/bin/kubernetes-validate"
# tlsrpt-reporter (the reporting half of Postfix's TLSRPT support) delivers
# a real report to the running server in tests/tlsrpt.rs.
venv_tool tlsrpt-venv bin/tlsrpt-reportd 'tlsrpt-reporter==0.6.0'
export MTASTS_TLSRPT_REPORTER_BIN="$PWD/target/tlsrpt-venv/bin"
# postfix-mta-sts-resolver (Postfix's MTA-STS resolver) validates a
# delegated customer in tests/senders.rs.
venv_tool sts-venv bin/mta-sts-query 'postfix-mta-sts-resolver==1.5.0'
export MTASTS_STS_RESOLVER_PYTHON="$PWD/target/sts-venv/bin/python"
# mailauth (npm; Node.js MTAs' MTA-STS) in tests/senders.rs too: 4.13.3 is
# the newest that runs on this machine kind's Node.js 20 (5 and later need 22).
mailauth_dir="$PWD/target/mailauth-node"
if [ ! -f "$mailauth_dir/node_modules/mailauth/lib/mta-sts.js" ]; then
  echo "installing mailauth into $mailauth_dir"
  mkdir -p "$mailauth_dir"
  if ! (cd "$mailauth_dir" && npm install --silent --no-audit --no-fund --prefix . 'mailauth@4.13.3'); then
    echo "error: could not install mailauth into $mailauth_dir" >&2
  fi
fi
export MTASTS_MAILAUTH_DIR="$mailauth_dir"

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
