#!/usr/bin/env python3
"""Reload and memory benchmark of mtasts alone at many domains.

Generates a config (a main mtasts.toml plus `domains_dir`), starts the
release binary and measures, over plain HTTP (`behind_proxy = true`) and the
admin API on loopback:

  start          process start until the last domain's policy is served (s)
  rss-start      resident memory once serving (MB)
  one-changed    one domain's file rewritten (mode changed), SIGHUP, until
                 the new policy is served (s)
  one-removed    one domain taken out of its file, SIGHUP, until it is
                 refused (404) (s)
  add-1000       1,000 domains added as new files, SIGHUP, until the last one
                 is served (s)
  noop-sighup    SIGHUP with nothing changed, until /metrics counts it (s)
  noop-admin     POST /v1/reload with nothing changed (s, one HTTP call)
  rss-10         resident memory after 10 reloads in a row, each changing
                 one domain (MB)
  under-load     9 reloads (a domain changed, a file added, removed) while
                 two load generators run (HTTP keep-alive, new HTTPS
                 connections; names spread over all domains): requests and
                 failed requests of each (needs the loadgen example built)

Layouts: `per-file` (one file per domain, what the admin API writes) or
`files:K` (the domains spread over K big files).

    python3 bench/reload.py --domains 100000 --layout per-file
    python3 bench/reload.py --domains 100000 --layout files:10

Only the processes this script starts are signalled or stopped. The file
watcher stays on, as in production: a watch event for the change a SIGHUP
already applied must not cause a second reload (`reloads_total` shows it).
"""

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from common import rss_mb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MTASTS = os.path.join(ROOT, "target/release/mtasts")
LOADGEN = os.path.join(ROOT, "target/release/examples/loadgen")
SUFFIX = ".bench.test"
POLICY_PATH = "/.well-known/mta-sts.txt"
TOKEN = "bench-token-0123456789abcdef"


def name(i):
    return f"d{i}{SUFFIX}"


def entry(i, mode=None):
    extra = f'mode = "{mode}"\n' if mode else ""
    return f'[[domain]]\nname = "{name(i)}"\n{extra}'


def generate(work, n, layout, ports):
    """Writes work/mtasts.toml and work/domains.d; returns a writer of one
    domain's entry (for the one-changed scenario)."""
    https, http, admin = ports
    dd = os.path.join(work, "domains.d")
    os.makedirs(dd, exist_ok=True)
    with open(os.path.join(work, "admin.token"), "w") as f:
        f.write(TOKEN + "\n")
    with open(os.path.join(work, "mtasts.toml"), "w") as f:
        f.write(f"""domains_dir = "domains.d"
[server]
https = "127.0.0.1:{https}"
http = "127.0.0.1:{http}"
state_dir = "state"
behind_proxy = true
max_connections = 100000
[admin]
listen = "127.0.0.1:{admin}"
token_file = "admin.token"
[defaults]
mode = "enforce"
max_age = "1w"
mx = ["mx1.provider.example", "*.mx.provider.example"]
""")
    if layout == "per-file":
        for i in range(n):
            with open(os.path.join(dd, f"{name(i)}.toml"), "w") as f:
                f.write(entry(i))
    else:
        k = int(layout.split(":", 1)[1])
        per = (n + k - 1) // k
        for j in range(k):
            with open(os.path.join(dd, f"part{j:03}.toml"), "w") as f:
                f.write("".join(entry(i) for i in range(j * per, min(n, (j + 1) * per))))


def change_one(work, n, layout, i, mode):
    """Rewrites the file holding domain i so that i gets `mode`."""
    dd = os.path.join(work, "domains.d")
    if layout == "per-file":
        with open(os.path.join(dd, f"{name(i)}.toml"), "w") as f:
            f.write(entry(i, mode))
        return
    k = int(layout.split(":", 1)[1])
    per = (n + k - 1) // k
    j = i // per
    with open(os.path.join(dd, f"part{j:03}.toml"), "w") as f:
        f.write("".join(entry(x, mode if x == i else None)
                        for x in range(j * per, min(n, (j + 1) * per))))


def remove_one(work, n, layout, i):
    """Takes domain i out of the config."""
    dd = os.path.join(work, "domains.d")
    if layout == "per-file":
        os.unlink(os.path.join(dd, f"{name(i)}.toml"))
        return
    k = int(layout.split(":", 1)[1])
    per = (n + k - 1) // k
    j = i // per
    with open(os.path.join(dd, f"part{j:03}.toml"), "w") as f:
        f.write("".join(entry(x) for x in range(j * per, min(n, (j + 1) * per)) if x != i))


def http_get(port, host, path, headers=(), method="GET", timeout=5.0):
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}"
                     f"Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    return status, body


def policy(port, i):
    try:
        return http_get(port, f"mta-sts.{name(i)}", POLICY_PATH, timeout=1.0)
    except OSError:
        return 0, b""


def wait_for(pred, what, limit=60.0, pause=0.002):
    t0 = time.time()
    while time.time() - t0 < limit:
        if pred():
            return time.time() - t0
        time.sleep(pause)
    raise SystemExit(f"timed out waiting for {what}")



def metrics(admin):
    _, body = http_get(admin, "127.0.0.1", "/metrics",
                       headers=[("Authorization", f"Bearer {TOKEN}")])
    out = {}
    for line in body.decode().splitlines():
        m = re.match(r'mtasts_reloads_total\{trigger="(\w+)",result="(\w+)"\} (\d+)', line)
        if m:
            out[(m.group(1), m.group(2))] = int(m.group(3))
        m = re.match(r"mtasts_snapshot_generation (\d+)", line)
        if m:
            out["generation"] = int(m.group(1))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--domains", type=int, default=100_000)
    ap.add_argument("--layout", default="per-file")
    ap.add_argument("--ports", default="19443,19080,19081")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--mtasts", default=MTASTS, help="the binary to measure")
    args = ap.parse_args()
    ports = [int(p) for p in args.ports.split(",")]
    https, http, admin = ports
    n = args.domains
    work = tempfile.mkdtemp(prefix="mtasts-reload-")
    rows = []
    proc = None
    try:
        t = time.time()
        generate(work, n, args.layout, ports)
        print(f"generated {n} domains ({args.layout}) in {time.time() - t:.1f} s", file=sys.stderr)
        # Files modified within 2 s of being read are compared by content at
        # the next reload (racy stamps); production files are older.
        time.sleep(2.5)
        log = open(os.path.join(work, "stderr.log"), "w")
        t0 = time.time()
        proc = subprocess.Popen([args.mtasts, "serve", "--config", "mtasts.toml"], cwd=work,
                                stdout=subprocess.DEVNULL, stderr=log)
        wait_for(lambda: policy(http, n - 1)[0] == 200, "start", limit=120)
        rows.append(("start", "s", time.time() - t0))
        time.sleep(1.0)
        rows.append(("rss-start", "MB", rss_mb(proc.pid)))

        # (a) one domain changed.
        change_one(work, n, args.layout, 7, "testing")
        t0 = time.time()
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: b"mode: testing" in policy(http, 7)[1], "one-changed")
        rows.append(("one-changed", "s", time.time() - t0))
        time.sleep(1.0)  # the watch event of the same change comes and goes

        # (a2) one domain removed: its file rewritten without it (or, one
        # file per domain, deleted), SIGHUP until it is refused (404).
        remove_one(work, n, args.layout, 11)
        t0 = time.time()
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: policy(http, 11)[0] == 404, "one-removed")
        rows.append(("one-removed", "s", time.time() - t0))
        time.sleep(1.0)

        # (b) 1,000 domains added as new files.
        dd = os.path.join(work, "domains.d")
        for i in range(n, n + 1000):
            with open(os.path.join(dd, f"{name(i)}.toml"), "w") as f:
                f.write(entry(i))
        t0 = time.time()
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: policy(http, n + 999)[0] == 200, "add-1000")
        rows.append(("add-1000", "s", time.time() - t0))
        time.sleep(1.0)

        # (c) nothing changed.
        before = metrics(admin)
        t0 = time.time()
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: sum(v for k, v in metrics(admin).items()
                             if isinstance(k, tuple) and k[0] == "sighup")
                 > sum(v for k, v in before.items() if isinstance(k, tuple) and k[0] == "sighup"),
                 "noop-sighup")
        rows.append(("noop-sighup", "s", time.time() - t0))
        t0 = time.time()
        status, body = http_get(admin, "127.0.0.1", "/v1/reload", method="POST",
                                headers=[("Authorization", f"Bearer {TOKEN}")], timeout=30)
        rows.append(("noop-admin", "s", time.time() - t0))
        after = metrics(admin)
        rows.append(("generation-after-noop", "", after.get("generation", -1)))
        rows.append(("generation-before-noop", "", before.get("generation", -1)))

        # Ten reloads in a row, each changing one domain.
        times = []
        for r in range(10):
            mode = "testing" if r % 2 else "none"
            change_one(work, n, args.layout, 100 + r, mode)
            t0 = time.time()
            proc.send_signal(signal.SIGHUP)
            wait_for(lambda: f"mode: {mode}".encode() in policy(http, 100 + r)[1], "reload")
            times.append(time.time() - t0)
        times.sort()
        rows.append(("10 reloads: min", "s", times[0]))
        rows.append(("10 reloads: median", "s", (times[4] + times[5]) / 2))
        rows.append(("10 reloads: max", "s", times[-1]))
        time.sleep(2.0)
        rows.append(("rss-10", "MB", rss_mb(proc.pid)))
        final = metrics(admin)
        for k, v in sorted((k, v) for k, v in final.items() if isinstance(k, tuple)):
            rows.append((f"reloads {k[0]}/{k[1]}", "", v))
        rows.append(("generation", "", final.get("generation", -1)))

        # (e) Reloads under load: two load generators for the whole of 9
        # reloads (a domain changed, a file added, that file removed), names
        # spread over all domains: HTTP keep-alive and a new HTTPS
        # connection per request. Every request must get its policy.
        if not os.path.exists(LOADGEN):
            sys.exit(f"{LOADGEN} is missing: cargo build --release --example loadgen")
        ca = os.path.join(work, "state/ca/ca.pem")
        secs = 12
        loads = {
            "http-ka": subprocess.Popen(
                [LOADGEN, "--addr", f"127.0.0.1:{http}", "--domains", str(n),
                 "--connections", "16", "--seconds", str(secs)],
                stdout=subprocess.PIPE, text=True),
            "https-new": subprocess.Popen(
                [LOADGEN, "--addr", f"127.0.0.1:{https}", "--tls", "--ca", ca,
                 "--domains", str(n), "--connections", "8", "--seconds", str(secs),
                 "--new-conn"],
                stdout=subprocess.PIPE, text=True),
        }
        time.sleep(1.0)
        extra = os.path.join(dd, "under-load.toml")
        done = 0
        for r in range(9):
            if r % 3 == 0:
                mode = "testing" if r % 2 else "none"
                change_one(work, n, args.layout, 200 + r, mode)
                check = (lambda i, m: lambda: f"mode: {m}".encode() in policy(http, i)[1])(200 + r, mode)
            elif r % 3 == 1:
                with open(extra, "w") as f:
                    f.write(entry(n + 5000 + r))
                check = (lambda i: lambda: policy(http, i)[0] == 200)(n + 5000 + r)
            else:
                os.unlink(extra)
                check = (lambda i: lambda: policy(http, i)[0] == 404)(n + 5000 + r - 1)
            proc.send_signal(signal.SIGHUP)
            wait_for(check, "reload under load")
            done += 1
            time.sleep(0.8)
        rows.append(("under-load: reloads applied", "", done))
        for what, p in loads.items():
            out, _ = p.communicate(timeout=secs + 120)
            m = re.search(r"requests=(\d+) .*errors=(\d+)", out)
            rows.append((f"under-load: {what} requests", "", int(m.group(1)) if m else -1))
            rows.append((f"under-load: {what} failed", "", int(m.group(2)) if m else -1))
    finally:
        if proc:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if args.keep:
            print(f"work directory: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    print(f"| measure ({n} domains, {args.layout}) | unit | value |")
    print("|---|---|---:|")
    for what, unit, v in rows:
        print(f"| {what} | {unit} | {v:.3f} |" if isinstance(v, float) else f"| {what} | {unit} | {v} |")


if __name__ == "__main__":
    main()
