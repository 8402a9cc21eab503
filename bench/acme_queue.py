#!/usr/bin/env python3
"""The ACME manager's scheduling and progress bookkeeping at N pending
domains, without a CA (docs/PERFORMANCE.md, "ACME scheduling at 100,000
domains").

    cargo build --release --example acme_queue
    python3 bench/acme_queue.py
    # before/after: build each commit's example, copy it, then
    python3 bench/acme_queue.py --bin before=/tmp/acme_queue.before \\
                                --bin after=target/release/examples/acme_queue

For each binary and N, a first issuance is drained: every domain pending,
`--concurrency` attempts at once, one manager turn per finished attempt
(every 10th domain fails once and is retried after a backoff). Columns:
  first_turn_us  one turn with all N pending (start due hosts, count the
                 progress, find the next due time), mean of the first 100;
  per_turn_us    mean over the whole drain;
  total_s        bookkeeping CPU for the whole first issuance; marked ~
                 when extrapolated from a drain cut at --max-seconds.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", action="append", default=[],
                    help="label=path of an acme_queue example (repeatable)")
    ap.add_argument("--domains", default="1000,10000,100000")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-seconds", type=float, default=120)
    args = ap.parse_args()
    bins = [b.split("=", 1) for b in args.bin] or [
        ["current", os.path.join(ROOT, "target/release/examples/acme_queue")]]

    rows = []
    for label, path in bins:
        out = subprocess.run(
            [path, "--domains", args.domains, "--concurrency", str(args.concurrency),
             "--max-seconds", str(args.max_seconds)],
            check=True, capture_output=True, text=True).stdout
        for line in out.splitlines():
            r = json.loads(line)
            if not r["counts_ok"]:
                sys.exit(f"{label}: counters differ from a recount at N={r['domains']}")
            r["label"] = label
            rows.append(r)

    print("| build | N | build s | first turn µs | mean turn µs | turns | total s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        total = f"{r['total_s']:.3f}" if r["complete"] else f"~{r['total_s']:.0f}"
        print(f"| {r['label']} | {r['domains']:,} | {r['build_s']:.3f} | "
              f"{r['first_turn_us']:.1f} | {r['per_turn_us']:.1f} | "
              f"{r['turns']:,} | {total} |")


if __name__ == "__main__":
    main()
