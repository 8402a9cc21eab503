#!/usr/bin/env bash
# Runs the property tests of tests/fuzz.rs with many cases in a release
# build and prints a table: property, cases, result, seconds.
#
#   bash bench/fuzz.sh [CASES_PER_PROPERTY] [DNS_CASES]
#
# Defaults: 100000 cases for each of the 11 in-process properties (1.1
# million inputs) and 20000 DNS answers (each a real UDP exchange with a
# 50 ms timeout for answers that never parse). A failing property prints
# proptest's minimal input and counts as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
cases=${1:-100000}
dns_cases=${2:-20000}
bin=$(cargo test --release --locked --test fuzz --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -1)
[ -x "$bin" ] || { echo "no fuzz test binary" >&2; exit 1; }
tests=$("$bin" --list 2>/dev/null | sed -n 's/: test$//p')
printf '| property | cases | result | seconds |\n|---|---:|---|---:|\n'
total=0
failed=0
for t in $tests; do
  n=$cases
  [ "$t" = dns_answers_from_a_server ] && n=$dns_cases
  start=$(date +%s.%N)
  if out=$(PROPTEST_CASES=$n "$bin" --exact "$t" --nocapture --test-threads 1 2>&1); then
    result=ok
  else
    result=FAILED
    failed=$((failed + 1))
    echo "$out" | tail -20 >&2
  fi
  end=$(date +%s.%N)
  ran=$(echo "$out" | sed -n "s/.*fuzz: $t: \([0-9]*\).*/\1/p" | tail -1)
  ran=${ran:-0}
  total=$((total + ran))
  printf '| %s | %d | %s | %.1f |\n' "$t" "$ran" "$result" "$(echo "$end - $start" | bc)"
done
printf '| **total** | **%d** | %d failed | |\n' "$total" "$failed"
[ "$failed" = 0 ]
